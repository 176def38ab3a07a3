//! Each actor's SQL database, through core alone: a call's SQL commits with the call and only
//! then reaches the actor's file; a failed commit leaves neither; a change whose keel.db commit
//! landed but whose file commit did not is applied on the next start; a missing file is
//! reported, not reset; destroy removes the file.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::faults::{Failpoint, Fault, FaultInjector, Faults};
use keel_core::host::{ActionCall, ActionDone, ActorInfo, Effects, Host, StartRequest, StopReason};
use keel_core::{
    ActorType, ActorTypes, DbConfig, Encoding, MigrationStep, Payload, Result, Runtime,
    RuntimeConfig, Target,
};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// Runs each action's SQL through the runtime, as the JS host does: `insert` adds a row,
/// `count` counts them, `insert_then_fail` inserts and then fails, `destroy` destroys.
#[derive(Default)]
struct SqlHost {
    runtime: OnceLock<Arc<Runtime>>,
    tokens: Mutex<HashMap<String, u64>>,
}

impl SqlHost {
    async fn sql(&self, actor: &ActorInfo, sql: &str, params: &[u8]) -> Result<Vec<u8>> {
        let token = self.tokens.lock()[&*actor.id];
        self.runtime
            .get()
            .unwrap()
            .db_execute(&actor.id, token, sql.to_string(), params.to_vec())
            .await
    }
}

/// `[]` in CBOR: no parameters.
const NO_PARAMS: &[u8] = &[0x80];

#[async_trait]
impl Host for SqlHost {
    async fn start(&self, actor: &Arc<ActorInfo>, request: StartRequest) -> Result<Effects> {
        let token = request.db_token.expect("the type has a database");
        self.tokens.lock().insert(actor.id.to_string(), token);
        let runtime = self.runtime.get().unwrap();
        runtime
            .db_migration(&actor.id, token, MigrationStep::Begin)
            .await?;
        self.sql(
            actor,
            "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, v TEXT)",
            NO_PARAMS,
        )
        .await?;
        runtime
            .db_migration(&actor.id, token, MigrationStep::Commit)
            .await?;
        Ok(Effects {
            state: request.state.or(Some(b"{}".to_vec())),
            ..Effects::default()
        })
    }

    async fn action(&self, actor: &Arc<ActorInfo>, call: ActionCall) -> Result<ActionDone> {
        let output = match call.action.as_str() {
            "insert" => {
                // `["x"]` in CBOR.
                self.sql(
                    actor,
                    "INSERT INTO items (v) VALUES (?)",
                    &[0x81, 0x61, b'x'],
                )
                .await?;
                "null".to_string()
            }
            "insert_then_fail" => {
                self.sql(actor, "INSERT INTO items (v) VALUES ('y')", NO_PARAMS)
                    .await?;
                return Err(keel_core::Error::ActorInternal {
                    message: "failed after inserting".into(),
                });
            }
            "count" => {
                let rows = self
                    .sql(actor, "SELECT count(*) AS n FROM items", NO_PARAMS)
                    .await?;
                // [["n"], [count], changes, rowid]: the count is the byte after the columns.
                let at = rows.iter().position(|b| *b == 0x81).unwrap();
                let at = at + 1 + rows[at + 1..].iter().position(|b| *b == 0x81).unwrap();
                rows[at + 1].to_string()
            }
            "destroy" => {
                return Ok(ActionDone {
                    output: Payload::json("null"),
                    effects: Effects {
                        destroy: true,
                        ..Effects::default()
                    },
                })
            }
            other => panic!("no action {other}"),
        };
        Ok(ActionDone {
            output: Payload::json(output),
            effects: Effects::default(),
        })
    }

    async fn stop(&self, _actor: &Arc<ActorInfo>, _reason: StopReason) -> Result<Effects> {
        Ok(Effects::default())
    }

    fn state_encoding(&self) -> Encoding {
        Encoding::Json
    }
}

/// Fails commits before their WAL write while `failing` is set.
#[derive(Default)]
struct Switch {
    failing: AtomicBool,
}

impl Faults for Switch {
    fn check(&self, point: Failpoint) -> Fault {
        if point == Failpoint::BeforeWalWrite && self.failing.load(Ordering::Acquire) {
            Fault::Fail
        } else {
            Fault::Continue
        }
    }
}

fn open(dir: &std::path::Path, faults: Option<Arc<Switch>>) -> Arc<Runtime> {
    let mut types = ActorTypes::default();
    types
        .add(ActorType {
            db: Some(DbConfig::default()),
            ..ActorType::new("notes", ["insert", "insert_then_fail", "count", "destroy"])
        })
        .unwrap();
    let config = RuntimeConfig {
        faults: faults.map(|faults| FaultInjector(faults as Arc<dyn Faults>)),
        ..common::config(dir)
    };
    let host = Arc::new(SqlHost::default());
    let runtime = Arc::new(
        Runtime::open(
            config,
            Arc::new(types),
            host.clone(),
            &CancellationToken::new(),
        )
        .unwrap(),
    );
    host.runtime.set(runtime.clone()).ok().unwrap();
    runtime
}

fn notes(key: &str) -> Target {
    Target::Key {
        name: "notes".into(),
        key: vec![key.to_string()],
        mode: keel_core::Resolve::GetOrCreate,
        input: None,
    }
}

async fn call(runtime: &Runtime, key: &str, action: &str) -> Result<String> {
    let output = runtime
        .call(notes(key), action, Payload::json("[]"), Encoding::Json)
        .await?;
    Ok(String::from_utf8(output.bytes).unwrap())
}

/// The rows of the actor's file itself, read with a plain connection.
fn file_rows(dir: &std::path::Path, actor_id: &str) -> i64 {
    let path = keel_core::actor_db::db_path(&dir.join(keel_core::actor_db::DB_DIR), actor_id);
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT count(*) FROM items", [], |row| row.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_sql_commits_with_it_and_a_failed_commit_leaves_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Switch::default());
    let runtime = open(dir.path(), Some(faults.clone()));
    call(&runtime, "a", "insert").await.unwrap();
    assert_eq!(call(&runtime, "a", "count").await.unwrap(), "1");

    // The commit fails: the reply is the commit's error, not the action's success, and the
    // row is not in the database, not even for the same instance's next call.
    faults.failing.store(true, Ordering::Release);
    let err = call(&runtime, "a", "insert").await.unwrap_err();
    assert_eq!((err.group(), err.code()), ("storage", "sqlite"), "{err}");
    faults.failing.store(false, Ordering::Release);
    assert_eq!(call(&runtime, "a", "count").await.unwrap(), "1");

    // A call that fails after its SQL leaves nothing either.
    let err = call(&runtime, "a", "insert_then_fail").await.unwrap_err();
    assert_eq!(err.code(), "internal_error");
    assert_eq!(call(&runtime, "a", "count").await.unwrap(), "1");
    let id = runtime.resolve(notes("a")).await.unwrap().id.to_string();
    runtime.drain().await;
    assert_eq!(file_rows(dir.path(), &id), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_logged_in_keel_db_but_missing_from_the_file_is_applied_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), None);
    call(&runtime, "a", "insert").await.unwrap();
    let id = runtime.resolve(notes("a")).await.unwrap().id.to_string();
    runtime.drain().await;
    // The file as it was after the first change.
    let db_dir = dir.path().join(keel_core::actor_db::DB_DIR);
    let path = keel_core::actor_db::db_path(&db_dir, &id);
    let saved = std::fs::read(&path).unwrap();

    let runtime = open(dir.path(), None);
    call(&runtime, "a", "insert").await.unwrap();
    call(&runtime, "a", "insert").await.unwrap();
    runtime.drain().await;
    assert_eq!(file_rows(dir.path(), &id), 3);

    // Put the older file back: as if the process died after keel.db's commits of the later
    // changes and before the file's.
    std::fs::write(&path, saved).unwrap();
    assert_eq!(file_rows(dir.path(), &id), 1);
    let runtime = open(dir.path(), None);
    assert_eq!(call(&runtime, "a", "count").await.unwrap(), "3");
    runtime.drain().await;
    assert_eq!(file_rows(dir.path(), &id), 3);
}

/// The log rows of one actor's SQL changes in keel.db.
fn log_rows(dir: &std::path::Path, actor_id: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("keel.db")).unwrap();
    conn.query_row(
        "SELECT count(*) FROM db_log WHERE actor_id = ?1",
        [actor_id],
        |row| row.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_lost_its_unflushed_commits_is_repaired_from_the_log() {
    // The file's commits are not flushed one by one: a power loss can take it back to its
    // last checkpoint (the one at open). The log must still hold every change since then.
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), None);
    call(&runtime, "a", "insert").await.unwrap();
    let id = runtime.resolve(notes("a")).await.unwrap().id.to_string();
    runtime.drain().await;
    let path = keel_core::actor_db::db_path(&dir.path().join(keel_core::actor_db::DB_DIR), &id);
    let flushed = std::fs::read(&path).unwrap();

    let runtime = open(dir.path(), None);
    for _ in 0..5 {
        call(&runtime, "a", "insert").await.unwrap();
    }
    runtime.drain().await;
    assert_eq!(file_rows(dir.path(), &id), 6);
    // The power loss: the file as it was flushed at its last checkpoint.
    std::fs::write(&path, flushed).unwrap();
    let runtime = open(dir.path(), None);
    assert_eq!(call(&runtime, "a", "count").await.unwrap(), "6");
    runtime.drain().await;
    assert_eq!(file_rows(dir.path(), &id), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_trimmed_after_each_checkpoint_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), None);
    let calls = 2 * keel_core::actor_db::SYNC_EVERY as i64 + 10;
    for _ in 0..calls {
        call(&runtime, "a", "insert").await.unwrap();
    }
    let id = runtime.resolve(notes("a")).await.unwrap().id.to_string();
    runtime.drain().await;
    let rows = log_rows(dir.path(), &id);
    // What the file held at its last checkpoint, plus every change after it.
    assert!(
        (1..=keel_core::actor_db::SYNC_EVERY as i64 + 1).contains(&rows),
        "{rows} log rows after {calls} changes"
    );
    assert_eq!(file_rows(dir.path(), &id), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_is_reported_and_destroy_removes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), None);
    call(&runtime, "a", "insert").await.unwrap();
    call(&runtime, "b", "insert").await.unwrap();
    let a = runtime.resolve(notes("a")).await.unwrap().id.to_string();
    let b = runtime.resolve(notes("b")).await.unwrap().id.to_string();
    runtime.drain().await;
    let db_dir = dir.path().join(keel_core::actor_db::DB_DIR);
    std::fs::remove_file(keel_core::actor_db::db_path(&db_dir, &a)).unwrap();

    let runtime = open(dir.path(), None);
    let err = call(&runtime, "a", "count").await.unwrap_err();
    assert_eq!((err.group(), err.code()), ("storage", "corrupt"), "{err}");

    call(&runtime, "b", "destroy").await.unwrap();
    runtime.drain().await;
    assert!(!keel_core::actor_db::db_path(&db_dir, &b).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_older_than_the_log_reaches_is_reported_not_waited_on() {
    // The log keeps changes back to the file's last checkpoint only: a file put back from
    // before that (an old backup) cannot be brought up to date, and the call says so.
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), None);
    call(&runtime, "a", "insert").await.unwrap();
    let id = runtime.resolve(notes("a")).await.unwrap().id.to_string();
    runtime.drain().await;
    let path = keel_core::actor_db::db_path(&dir.path().join(keel_core::actor_db::DB_DIR), &id);
    let old = std::fs::read(&path).unwrap();

    let runtime = open(dir.path(), None);
    for _ in 0..2 * keel_core::actor_db::SYNC_EVERY + 10 {
        call(&runtime, "a", "insert").await.unwrap();
    }
    runtime.drain().await;
    std::fs::write(&path, old).unwrap();

    let runtime = open(dir.path(), None);
    let answer = tokio::time::timeout(Duration::from_secs(30), call(&runtime, "a", "count"))
        .await
        .expect("a call to an actor whose file cannot be repaired never answered");
    let err = answer.unwrap_err();
    assert_eq!((err.group(), err.code()), ("storage", "corrupt"), "{err}");
    // And the next call is refused the same way, at once.
    let err = tokio::time::timeout(Duration::from_secs(30), call(&runtime, "a", "count"))
        .await
        .expect("the second call never answered")
        .unwrap_err();
    assert_eq!((err.group(), err.code()), ("storage", "corrupt"), "{err}");
    runtime.drain().await;
}
