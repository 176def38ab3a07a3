//! Damage on disk is reported, never served: a write-ahead log that lost acknowledged commits,
//! a damaged key index, a state that does not decode, and another program's `keel.db`. Every
//! case damages a real SQLite file the way a disk or a careless copy would, and every refused
//! file must be left exactly as it was.

mod common;

use std::path::Path;

use common::{call, counter, open, CounterHost};
use keel_core::integrity::COMMITS_FILE;
use keel_core::store::DB_FILE;
use keel_core::{Error, Resolve, Runtime, Target};

const WAL_FILE: &str = "keel.db-wal";
/// Bytes before the first frame of a WAL file, and before each frame's page.
const WAL_HEADER: u64 = 32;
const FRAME_HEADER: u64 = 24;

fn get(key: &str) -> Target {
    Target::Key {
        name: "counter".into(),
        key: vec![key.into()],
        mode: Resolve::Get,
        input: None,
    }
}

/// Opening `dir` must fail; returns the error.
fn open_err(dir: &Path) -> Error {
    match Runtime::open(
        common::config(dir),
        common::types(),
        CounterHost::new(),
        &Default::default(),
    ) {
        Ok(_) => panic!("the damaged database at {} was opened", dir.display()),
        Err(err) => err,
    }
}

fn assert_corrupt(err: &Error, mentions: &str) {
    assert_eq!((err.group(), err.code()), ("storage", "corrupt"), "{err}");
    assert!(err.to_string().contains(mentions), "{err}");
}

/// The files in `dir` that hold data (keel.db, its WAL, the commit record), as (name, length,
/// hash). An empty WAL counts as none: any SQLite reader creates one beside a WAL database.
fn snapshot(dir: &Path) -> Vec<(String, usize, u64)> {
    use std::hash::{Hash, Hasher};
    [DB_FILE, WAL_FILE, COMMITS_FILE]
        .iter()
        .filter_map(|name| {
            let bytes = std::fs::read(dir.join(name)).ok()?;
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut hasher);
            (!bytes.is_empty()).then(|| (name.to_string(), bytes.len(), hasher.finish()))
        })
        .collect()
}

/// Copies keel.db, its WAL and the commit record from a running keel into `to`: the files as
/// a `kill -9` at this moment would leave them.
fn copy_live(from: &Path, to: &Path) {
    for name in [DB_FILE, WAL_FILE, COMMITS_FILE] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

/// The page size the file's header declares.
fn page_size(db: &Path) -> u64 {
    let header = std::fs::read(db).unwrap();
    match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        size => u64::from(size),
    }
}

/// Increments `key` `times` times and returns the last count.
async fn increment(runtime: &Runtime, key: &str, times: usize) -> i64 {
    let mut count = 0;
    for _ in 0..times {
        count = call(runtime, counter(key), "increment", "[1]")
            .await
            .unwrap()
            .parse()
            .unwrap();
    }
    count
}

/// A running keel with acknowledged commits that are still only in the WAL, copied as a
/// crash would leave it into a second directory. Returns (the original, the copy).
async fn crashed_copy() -> (tempfile::TempDir, tempfile::TempDir) {
    let live = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let runtime = open(live.path(), CounterHost::new());
    assert_eq!(increment(&runtime, "acked", 10).await, 10);
    copy_live(live.path(), copy.path());
    runtime.drain().await;
    (live, copy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_wal_is_refused_instead_of_serving_an_older_database() {
    let (_live, copy) = crashed_copy().await;
    // Drop the last frame: the last acknowledged increment's commit.
    let wal = copy.path().join(WAL_FILE);
    let frame = FRAME_HEADER + page_size(&copy.path().join(DB_FILE));
    let len = std::fs::metadata(&wal).unwrap().len();
    assert!(len > WAL_HEADER + 2 * frame, "the commits are in the WAL");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .unwrap()
        .set_len(len - frame)
        .unwrap();
    let before = snapshot(copy.path());

    let err = open_err(copy.path());
    assert_corrupt(&err, "were acknowledged");
    assert_eq!(
        snapshot(copy.path()),
        before,
        "the refused files are untouched"
    );
    // And again: a refusal changes nothing that would let a second open through.
    assert_corrupt(&open_err(copy.path()), "were acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_wal_frame_is_refused() {
    let (_live, copy) = crashed_copy().await;
    let wal = copy.path().join(WAL_FILE);
    let frame = FRAME_HEADER + page_size(&copy.path().join(DB_FILE));
    let mut bytes = std::fs::read(&wal).unwrap();
    let frames = (bytes.len() as u64 - WAL_HEADER) / frame;
    assert!(frames >= 4, "the commits are in the WAL");
    // One flipped byte in the page of a frame halfway through: its checksum fails, and SQLite
    // ends the log there, silently.
    let middle = (WAL_HEADER + (frames / 2) * frame + FRAME_HEADER + 100) as usize;
    bytes[middle] ^= 0x5a;
    std::fs::write(&wal, &bytes).unwrap();
    let before = snapshot(copy.path());

    assert_corrupt(&open_err(copy.path()), "were acknowledged");
    assert_eq!(snapshot(copy.path()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_database_whose_record_is_left_is_refused() {
    let (_live, copy) = crashed_copy().await;
    std::fs::remove_file(copy.path().join(DB_FILE)).unwrap();
    std::fs::remove_file(copy.path().join(WAL_FILE)).unwrap();
    // How many commits that was depends on how they were grouped; at least ten.
    let err = open_err(copy.path());
    assert_corrupt(&err, "is missing, but");
    assert!(
        err.to_string().contains("commits were acknowledged"),
        "{err}"
    );
    assert!(
        !copy.path().join(DB_FILE).exists(),
        "no new database was made"
    );
    // Deleting the record too is how to start afresh.
    std::fs::remove_file(copy.path().join(COMMITS_FILE)).unwrap();
    let fresh = open(copy.path(), CounterHost::new());
    assert_eq!(increment(&fresh, "acked", 1).await, 1);
    fresh.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_commit_and_its_record_is_not_refused() {
    let live = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let runtime = open(live.path(), CounterHost::new());
    assert_eq!(increment(&runtime, "acked", 3).await, 3);
    let stale_record = std::fs::read(live.path().join(COMMITS_FILE)).unwrap();
    assert_eq!(increment(&runtime, "acked", 4).await, 7);
    copy_live(live.path(), copy.path());
    // The record as it was before the last commits: what a crash after those commits but
    // before their records were written leaves behind.
    std::fs::write(copy.path().join(COMMITS_FILE), &stale_record).unwrap();
    runtime.drain().await;

    let reopened = open(copy.path(), CounterHost::new());
    assert_eq!(
        call(&reopened, get("acked"), "get", "[]").await.unwrap(),
        "7"
    );
    reopened.drain().await;
    assert_eq!(
        std::fs::read(copy.path().join(COMMITS_FILE)).unwrap(),
        std::fs::read(live.path().join(COMMITS_FILE)).unwrap(),
        "the record caught up with the database when it was opened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_and_a_crash_copy_both_reopen_with_every_commit() {
    let (live, copy) = crashed_copy().await;
    for dir in [live.path(), copy.path()] {
        let reopened = open(dir, CounterHost::new());
        assert_eq!(
            call(&reopened, get("acked"), "get", "[]").await.unwrap(),
            "10"
        );
        assert_eq!(increment(&reopened, "acked", 1).await, 11);
        reopened.drain().await;
    }
}

/// Creates actors k1, k2, k3 (rowids 1, 2, 3) with counts 1, 2, 3 and shuts down cleanly, so
/// everything is in keel.db itself.
async fn three_actors(dir: &Path) {
    let runtime = open(dir, CounterHost::new());
    for (i, key) in ["k1", "k2", "k3"].iter().enumerate() {
        increment(&runtime, key, i + 1).await;
    }
    runtime.drain().await;
    assert!(!dir.join(WAL_FILE).exists(), "the WAL was checkpointed");
}

/// Points k2's entry in the actors table's (name, key) index at k3's row, by rewriting the
/// rowid at the end of the entry's record in the file.
fn misdirect_k2(dir: &Path) {
    let db = dir.join(DB_FILE);
    let root: u64 = {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row(
            "SELECT s.rootpage FROM sqlite_schema AS s WHERE s.tbl_name = 'actors' \
             AND s.type = 'index' AND (SELECT group_concat(name) FROM pragma_index_info(s.name)) \
             = 'name,key'",
            [],
            |row| row.get(0),
        )
        .unwrap()
    };
    let page = page_size(&db);
    let mut bytes = std::fs::read(&db).unwrap();
    let start = ((root - 1) * page) as usize;
    let leaf = &mut bytes[start..start + page as usize];
    // The record's values follow each other: type name, key, rowid (one byte for 2).
    let entry = b"counterk2\x02";
    let at = leaf
        .windows(entry.len())
        .position(|window| window == entry)
        .expect("k2's index entry is on the index's root page");
    leaf[at + entry.len() - 1] = 3;
    std::fs::write(&db, &bytes).unwrap();
}

fn actor_rows(dir: &Path) -> i64 {
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    conn.query_row("SELECT count(*) FROM actors NOT INDEXED", [], |row| {
        row.get(0)
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_key_index_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    three_actors(dir.path()).await;
    misdirect_k2(dir.path());
    let before = snapshot(dir.path());

    assert_corrupt(&open_err(dir.path()), "is damaged");
    assert_eq!(snapshot(dir.path()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_index_damaged_at_run_time_never_answers_with_another_actor() {
    let dir = tempfile::tempdir().unwrap();
    three_actors(dir.path()).await;
    let runtime = open(dir.path(), CounterHost::new());
    // The disk damages the index under the running keel.
    misdirect_k2(dir.path());

    let err = call(&runtime, get("k2"), "get", "[]").await.unwrap_err();
    assert_corrupt(&err, "key index");
    // From now on nothing is read or created: not even a fresh key, whose absence the damaged
    // index cannot be trusted to report.
    let err = call(&runtime, counter("k4"), "get", "[]")
        .await
        .unwrap_err();
    assert_corrupt(&err, "key index");
    let err = call(&runtime, get("k1"), "get", "[]").await.unwrap_err();
    assert_corrupt(&err, "key index");
    runtime.drain().await;
    assert_eq!(actor_rows(dir.path()), 3, "no actor was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_damage_at_run_time_stops_every_later_commit() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    increment(&runtime, "live", 1).await;
    call(&runtime, counter("live"), "kv_put", r#"["a", "1"]"#)
        .await
        .unwrap();
    let info = runtime.resolve(counter("live")).await.unwrap();
    runtime.drain().await;

    let runtime = open(dir.path(), CounterHost::new());
    assert_eq!(increment(&runtime, "live", 1).await, 2);
    let (status, _, body) = common::handle(&runtime, "GET", "/health", &[]).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    // Everything is in the WAL now except the kv table's page, which is in keel.db: wreck
    // that page's header so SQLite reports it malformed.
    let db = dir.path().join(DB_FILE);
    let root: u64 = {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row(
            "SELECT rootpage FROM sqlite_schema WHERE name = 'kv'",
            [],
            |row| row.get(0),
        )
        .unwrap()
    };
    let mut bytes = std::fs::read(&db).unwrap();
    let start = ((root - 1) * page_size(&db)) as usize;
    bytes[start..start + 12].fill(0xee);
    std::fs::write(&db, &bytes).unwrap();

    let err = runtime
        .kv_get(&info.id, vec![b"a".to_vec()])
        .await
        .unwrap_err();
    assert_corrupt(&err, "SQLite found damage");
    // The actor's next commit is refused rather than written into a damaged file.
    let err = call(&runtime, counter("live"), "increment", "[1]")
        .await
        .unwrap_err();
    assert_corrupt(&err, "SQLite found damage");
    // The health check takes the process out of rotation with the same error.
    let (status, _, body) = common::handle(&runtime, "GET", "/health", &[]).await;
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&body["group"], &body["code"]),
        (&"storage".into(), &"corrupt".into()),
        "{body}"
    );
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_that_does_not_decode_is_a_storage_error_for_its_actor() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    increment(&runtime, "broken", 5).await;
    increment(&runtime, "fine", 2).await;
    let broken = runtime.resolve(counter("broken")).await.unwrap();
    runtime.drain().await;
    {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        // The first bytes of the JSON state survive, the rest is lost.
        conn.execute(
            "UPDATE actors SET state = substr(state, 1, 6) WHERE key = 'broken'",
            [],
        )
        .unwrap();
    }

    let runtime = open(dir.path(), CounterHost::new());
    let err = call(&runtime, get("broken"), "get", "[]")
        .await
        .unwrap_err();
    assert_corrupt(&err, "not well-formed json");
    assert_eq!(
        err.metadata(),
        Some(serde_json::json!({ "actorId": &*broken.id }))
    );
    assert_eq!(err.http_status(), 500);
    // The damage is the actor's own: the others keep working, and it is not reset.
    assert_eq!(call(&runtime, get("fine"), "get", "[]").await.unwrap(), "2");
    let err = call(&runtime, get("broken"), "get", "[]")
        .await
        .unwrap_err();
    assert_corrupt(&err, "not well-formed json");
    runtime.drain().await;
    assert_eq!(actor_rows(dir.path()), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_input_that_does_not_decode_is_a_storage_error_for_its_actor() {
    // docs/configuration.md, "Damage is reported, never served": one actor's stored creation
    // input that does not decode fails only that actor's calls, with its id. The input is kept
    // until the actor's first start has used it, so the actor here is created and not started.
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    let with_input = Target::Key {
        name: "counter".into(),
        key: vec!["given".into()],
        mode: Resolve::GetOrCreate,
        input: Some(keel_core::Payload::json(r#"{"tag":"from the creator"}"#)),
    };
    let given = runtime.resolve(with_input).await.unwrap();
    increment(&runtime, "fine", 2).await;
    runtime.drain().await;
    {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        let changed = conn
            .execute(
                "UPDATE actors SET input = substr(input, 1, 5) \
                 WHERE key = 'given' AND state IS NULL AND input IS NOT NULL",
                [],
            )
            .unwrap();
        assert_eq!(changed, 1, "the created actor's input is stored, unused");
    }

    let runtime = open(dir.path(), CounterHost::new());
    let err = call(&runtime, get("given"), "get", "[]").await.unwrap_err();
    assert_corrupt(&err, "creation input");
    assert_eq!(
        err.metadata(),
        Some(serde_json::json!({ "actorId": &*given.id }))
    );
    assert_eq!(call(&runtime, get("fine"), "get", "[]").await.unwrap(), "2");
    runtime.drain().await;
    assert_eq!(actor_rows(dir.path()), 2, "nothing was reset or deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_programs_database_is_refused_and_left_untouched() {
    for user_version in [0, 1] {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(&format!(
                "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL);
                 INSERT INTO users (email) VALUES ('a@example.com'), ('b@example.com');
                 PRAGMA user_version = {user_version};"
            ))
            .unwrap();
        }
        let before = std::fs::read(dir.path().join(DB_FILE)).unwrap();

        assert_corrupt(&open_err(dir.path()), "not a keel database");
        assert!(std::fs::read(dir.path().join(DB_FILE)).unwrap() == before);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["LOCK", DB_FILE], "keel wrote nothing beside it");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_file_is_initialised() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(DB_FILE), b"").unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    assert_eq!(increment(&runtime, "new", 2).await, 2);
    runtime.drain().await;
}
