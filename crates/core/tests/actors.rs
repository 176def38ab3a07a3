//! Actors end to end against a real SQLite file: ordering, the output gate, group commit,
//! durability across reopen, mailbox bounds and the error contract.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{call, committed_count, counter, open, CounterHost};
use futures::future::join_all;
use keel_core::faults::{Failpoint, Fault, FaultInjector, Faults};
use keel_core::{Resolve, Target};
use tokio::task::JoinSet;

/// A disk whose WAL syncs take 20 ms while `slow` is set: commits that arrive during a sync
/// wait for the next one, as they do on a real disk under load.
#[derive(Default)]
struct SlowSync {
    slow: AtomicBool,
}

impl Faults for SlowSync {
    fn check(&self, point: Failpoint) -> Fault {
        if point == Failpoint::AfterWriteBeforeSync && self.slow.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Fault::Continue
    }
}

fn key_target(key: &str, mode: Resolve) -> Target {
    Target::Key {
        name: "counter".into(),
        key: vec![key.into()],
        mode,
        input: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_one_actor_run_in_arrival_order() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = open(dir.path(), host.clone());
    // Warm the actor so every call below goes straight to its mailbox.
    call(&runtime, counter("order"), "get", "[]").await.unwrap();
    let args: Vec<String> = (0..200).map(|i| format!("[{i}]")).collect();
    let calls = args
        .iter()
        .map(|a| call(&runtime, counter("order"), "append", a));
    for result in join_all(calls).await {
        result.unwrap();
    }
    let seen = call(&runtime, counter("order"), "seen", "[]")
        .await
        .unwrap();
    let expected: Vec<i64> = (0..200).collect();
    assert_eq!(serde_json::from_str::<Vec<i64>>(&seen).unwrap(), expected);
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reply_leaves_before_its_state_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Arc::new(open(dir.path(), CounterHost::new()));
    let mut tasks = Vec::new();
    for key in ["g0", "g1", "g2", "g3"] {
        let runtime = runtime.clone();
        let path = dir.path().to_path_buf();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                let output = call(&runtime, counter(key), "increment", "[1]")
                    .await
                    .unwrap();
                let replied: i64 = output.parse().unwrap();
                // Read the file through a separate connection the moment the reply arrives:
                // the committed count must already include this increment.
                let committed = committed_count(&path, key).unwrap();
                assert!(
                    committed >= replied,
                    "reply {replied} left before commit ({committed})"
                );
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_from_many_actors_share_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    let keys: Vec<String> = (0..64).map(|i| format!("a{i}")).collect();
    // Create every actor first so the measured round is only state writes.
    join_all(keys.iter().map(|k| call(&runtime, counter(k), "get", "[]"))).await;
    let before = runtime.writer_stats().transactions.load(Ordering::Relaxed);
    let results = join_all(
        keys.iter()
            .map(|k| call(&runtime, counter(k), "increment", "[1]")),
    )
    .await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().ok().map(String::as_str) == Some("1")));
    let transactions = runtime.writer_stats().transactions.load(Ordering::Relaxed) - before;
    assert!(transactions >= 1);
    assert!(
        transactions < 64,
        "64 actors' writes took {transactions} transactions"
    );
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_actor_called_one_call_at_a_time_commits_on_its_own_thread_unless_another_is_busy() {
    // In memory where the machine has it: a commit is applied inline only after a flush
    // within 1 ms, which a disk shared with other work does not always give.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let host = CounterHost::new();
    // `full`, the default: a commit applied by its sender holds the sender's thread for the
    // flush, so only one actor called one call at a time, with no other actor busy, does it.
    let sync = Arc::new(SlowSync::default());
    let config = keel_core::RuntimeConfig {
        faults: Some(FaultInjector(sync.clone())),
        ..common::config(dir.path())
    };
    let runtime = Arc::new(
        keel_core::Runtime::open(config, common::types(), host.clone(), &Default::default())
            .unwrap(),
    );
    call(&runtime, counter("other"), "get", "[]").await.unwrap();
    let inline = || runtime.writer_stats().inline.load(Ordering::Relaxed);
    let slow = || runtime.writer_stats().slow.load(Ordering::Relaxed);
    let (before, slow_before) = (inline(), slow());
    for i in 1..=20 {
        let output = call(&runtime, counter("seq"), "increment", "[1]").await;
        assert_eq!(output.unwrap(), i.to_string());
        // A pause between calls, as a user's: the writer thread, when it applied the commit,
        // releases the reply before it gives up the queue, so a next commit sent at once may
        // still find it applying.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Each after the first (the one before was another actor's) is applied inline, or sent to
    // the writer thread only because the flush before it took longer than the bound: on a
    // loaded machine, or with an unoptimized SQLite, every flush may.
    let (alone, slow_alone) = (inline() - before, slow() - slow_before);
    assert!(
        alone + slow_alone >= 10,
        "of 19 sequential calls, {alone} were applied inline and {slow_alone} were sent to the \
         writer only for a slow flush"
    );
    // Another actor's call in progress: the same sequential calls all go to the writer thread.
    let blocked = common::block_a_call(&runtime, &host, "other").await;
    let (before, slow_before) = (inline(), slow());
    for i in 21..=40 {
        let output = call(&runtime, counter("seq"), "increment", "[1]").await;
        assert_eq!(output.unwrap(), i.to_string());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(
        (inline() - before, slow() - slow_before),
        (0, 0),
        "a commit was applied inline (or refused only for a slow flush) while another actor \
         was busy"
    );
    host.gate.add_permits(1);
    assert_eq!(blocked.await.unwrap().unwrap(), "1");
    assert_eq!(committed_count(dir.path(), "seq").unwrap(), 40);
    // Calls queued behind one another on the same actor, with no other actor busy: each
    // commit has a call waiting behind it, so none is applied inline (nor refused only for a
    // slow flush), whatever the disk; only the last, with nothing behind it, may be.
    let (inlined, refused, _) = queue_behind_a_held_call(&runtime, &host, 10).await;
    assert!(
        inlined + refused <= 1,
        "of 11 queued calls' commits, {inlined} were applied inline and {refused} refused only \
         for a slow flush"
    );
    assert_eq!(committed_count(dir.path(), "seq").unwrap(), 51);
    // So they go to the writer thread and share flushes instead of each holding the worker for
    // a flush of its own. Sharing needs flushes slower than the actor's steps, which a fast
    // disk (or memory) does not always give, so the syncs take 20 ms for this part.
    sync.slow.store(true, Ordering::Relaxed);
    let (inlined, refused, transactions) = queue_behind_a_held_call(&runtime, &host, 10).await;
    assert!(
        inlined + refused <= 1,
        "{inlined} inline, {refused} refused for a slow flush"
    );
    assert!(
        transactions < 11,
        "11 queued calls took {transactions} transactions"
    );
    assert_eq!(committed_count(dir.path(), "seq").unwrap(), 62);
    runtime.drain().await;
}

/// Holds a call of `counter("seq")`, queues `behind` increments behind it, then lets them all
/// run; returns how many of their commits were applied inline, how many were sent to the
/// writer thread only for a slow flush, and how many transactions they took.
async fn queue_behind_a_held_call(
    runtime: &Arc<keel_core::Runtime>,
    host: &Arc<CounterHost>,
    behind: usize,
) -> (u64, u64, u64) {
    let stats = runtime.writer_stats();
    let held = common::block_a_call(runtime, host, "seq").await;
    let queued: Vec<_> = (0..behind)
        .map(|_| {
            let runtime = runtime.clone();
            tokio::spawn(async move { call(&runtime, counter("seq"), "increment", "[1]").await })
        })
        .collect();
    // Delivered to the actor's mailbox behind the held call by then.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let inline = stats.inline.load(Ordering::Relaxed);
    let slow = stats.slow.load(Ordering::Relaxed);
    let transactions = stats.transactions.load(Ordering::Relaxed);
    host.gate.add_permits(1);
    held.await.unwrap().unwrap();
    for call in queued {
        call.await.unwrap().unwrap();
    }
    (
        stats.inline.load(Ordering::Relaxed) - inline,
        stats.slow.load(Ordering::Relaxed) - slow,
        stats.transactions.load(Ordering::Relaxed) - transactions,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_reopening_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    for _ in 0..10 {
        call(&runtime, counter("durable"), "increment", "[3]")
            .await
            .unwrap();
    }
    let id = runtime
        .resolve(counter("durable"))
        .await
        .unwrap()
        .id
        .clone();
    runtime.drain().await;
    drop(runtime);

    let runtime = open(dir.path(), CounterHost::new());
    let output = call(&runtime, counter("durable"), "get", "[]")
        .await
        .unwrap();
    assert_eq!(output, "30");
    let again = runtime.resolve(counter("durable")).await.unwrap();
    assert_eq!(again.id, id, "the id is stable across restarts");
    let by_id = call(&runtime, Target::Id(id.to_string()), "get", "[]")
        .await
        .unwrap();
    assert_eq!(by_id, "30");
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_is_overloaded() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let mut config = common::config(dir.path());
    config.limits.max_mailbox_len = 2;
    let runtime = Arc::new(
        keel_core::Runtime::open(config, common::types(), host.clone(), &Default::default())
            .unwrap(),
    );
    call(&runtime, counter("busy"), "get", "[]").await.unwrap();
    let spawn_block = |calls: &mut JoinSet<_>| {
        let runtime = runtime.clone();
        calls.spawn(async move { call(&runtime, counter("busy"), "block", "[]").await });
    };
    // One call is taken off the mailbox and blocks at the gate, which stays shut until the
    // end: nothing queued behind it can run, so the mailbox only fills.
    let mut pending = JoinSet::new();
    spawn_block(&mut pending);
    host.blocked
        .subscribe()
        .wait_for(|waiting| *waiting == 1)
        .await
        .unwrap();
    // Three more calls race for the two free places: two are queued and cannot finish, so
    // the first to finish is the one refused, whatever order they arrived in.
    for _ in 0..3 {
        spawn_block(&mut pending);
    }
    let refused = pending.join_next().await.unwrap().unwrap().unwrap_err();
    assert_eq!(
        (refused.group(), refused.code(), refused.http_status()),
        ("actor", "overloaded", 429)
    );
    // docs/protocol.md: the metadata names the mailbox's capacity.
    assert_eq!(
        refused.metadata(),
        Some(serde_json::json!({ "capacity": 2 }))
    );
    // The mailbox is now full and stays so: the next call is refused too.
    let err = call(&runtime, counter("busy"), "get", "[]")
        .await
        .unwrap_err();
    assert_eq!(
        (err.group(), err.code(), err.http_status()),
        ("actor", "overloaded", 429)
    );
    host.gate.add_permits(3);
    while let Some(done) = pending.join_next().await {
        done.unwrap().unwrap();
    }
    // The actor keeps working once the queue drains.
    assert_eq!(
        call(&runtime, counter("busy"), "get", "[]").await.unwrap(),
        "3"
    );
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_contract() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());

    let err = call(&runtime, key_target("x", Resolve::Get), "get", "[]")
        .await
        .unwrap_err();
    assert_eq!(
        (err.group(), err.code(), err.http_status()),
        ("actor", "not_found", 404)
    );

    call(
        &runtime,
        key_target("x", Resolve::Create),
        "increment",
        "[1]",
    )
    .await
    .unwrap();
    let err = call(&runtime, key_target("x", Resolve::Create), "get", "[]")
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.http_status()), ("already_exists", 409));
    assert_eq!(
        call(&runtime, key_target("x", Resolve::Get), "get", "[]")
            .await
            .unwrap(),
        "1"
    );

    let err = call(&runtime, counter("x"), "nope", "[]")
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.http_status()), ("action_not_found", 404));

    let err = call(
        &runtime,
        Target::Key {
            name: "ghost".into(),
            key: vec![],
            mode: Resolve::GetOrCreate,
            input: None,
        },
        "get",
        "[]",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), "type_not_found");

    let err = call(&runtime, Target::Id("0".repeat(32)), "get", "[]")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "not_found");

    // A user error reaches the caller intact, and the actor keeps working.
    let err = call(&runtime, counter("x"), "fail", "[]")
        .await
        .unwrap_err();
    assert_eq!(
        (err.group(), err.code(), err.http_status()),
        ("user", "nope", 400)
    );
    assert_eq!(err.metadata().unwrap()["why"], "testing");
    assert_eq!(
        call(&runtime, counter("x"), "increment", "[1]")
            .await
            .unwrap(),
        "2"
    );

    let long_key = Target::Key {
        name: "counter".into(),
        key: vec!["k".repeat(129)],
        mode: Resolve::GetOrCreate,
        input: None,
    };
    let err = call(&runtime, long_key, "get", "[]").await.unwrap_err();
    assert_eq!((err.code(), err.http_status()), ("invalid_key", 400));
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_reaches_the_new_actor_once() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    let with_input = |start: i64| Target::Key {
        name: "counter".into(),
        key: vec!["in".into()],
        mode: Resolve::GetOrCreate,
        input: Some(keel_core::Payload::json(format!(r#"{{"start":{start}}}"#))),
    };
    assert_eq!(
        call(&runtime, with_input(40), "increment", "[2]")
            .await
            .unwrap(),
        "42"
    );
    // A later getOrCreate with other input finds the existing actor.
    assert_eq!(
        call(&runtime, with_input(7), "get", "[]").await.unwrap(),
        "42"
    );
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_get_or_create_of_one_key_makes_one_actor() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    let results =
        join_all((0..32).map(|_| call(&runtime, counter("race"), "increment", "[1]"))).await;
    let mut outputs: Vec<i64> = results
        .into_iter()
        .map(|r| r.unwrap().parse().unwrap())
        .collect();
    outputs.sort();
    assert_eq!(outputs, (1..=32).collect::<Vec<_>>());
    runtime.drain().await;
    let conn = rusqlite::Connection::open(dir.path().join(keel_core::store::DB_FILE)).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM actors", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_user_code_stops_one_actor_and_the_next_call_starts_a_fresh_one() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    call(&runtime, counter("p"), "increment", "[5]")
        .await
        .unwrap();
    let err = call(&runtime, counter("p"), "panic", "[]")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "stopped");
    // Other actors are untouched, and the panicked one comes back from its committed state.
    call(&runtime, counter("other"), "increment", "[1]")
        .await
        .unwrap();
    let again = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        call(&runtime, counter("p"), "get", "[]"),
    )
    .await
    .expect("the next call does not wait on the dead task");
    assert_eq!(again.unwrap(), "5");
    runtime.drain().await;
}
