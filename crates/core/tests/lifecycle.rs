//! Actor life cycles under paused tokio time: sleep and wake, durable schedules, destroy,
//! failed creation, and KV reads. The writer runs on the blocking pool, which keeps tokio's
//! paused clock from auto-advancing, so time moves only when a test advances it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{call, counter, CounterHost};
use keel_core::{Payload, Resolve, Runtime, Target};
use tokio::time::advance;

/// Waits (bounded) for the runtime's tasks to act on what just happened.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..5000 {
        if condition() {
            return;
        }
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_micros(200));
    }
    panic!("timed out waiting for: {what}");
}

/// Lets every ready task run without moving the clock.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn open(dir: &std::path::Path, host: Arc<CounterHost>) -> Runtime {
    common::open(dir, host)
}

fn rows(dir: &std::path::Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join(keel_core::store::DB_FILE)).unwrap();
    conn.query_row(sql, [], |row| row.get(0)).unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_idle_actor_sleeps_after_its_timeout_and_wakes_on_the_next_message() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = open(dir.path(), host.clone());
    assert_eq!(
        call(&runtime, counter("a"), "increment", "[5]")
            .await
            .unwrap(),
        "5"
    );
    advance(Duration::from_secs(29)).await;
    settle().await;
    assert_eq!(
        (*host.stops.lock(), runtime.live_actors()),
        (0, 1),
        "awake before the timeout"
    );

    advance(Duration::from_secs(2)).await;
    eventually("the actor sleeps", || runtime.live_actors() == 0).await;
    assert_eq!(*host.stop_log.lock(), ["a:sleep"]);

    // The next message wakes it with the same state.
    assert_eq!(
        call(&runtime, counter("a"), "increment", "[1]")
            .await
            .unwrap(),
        "6"
    );
    assert_eq!(*host.starts.lock(), 2);
    runtime.drain().await;
}

#[tokio::test(start_paused = true)]
async fn an_actor_with_a_pending_action_does_not_sleep() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = Arc::new(open(dir.path(), host.clone()));
    let blocked = tokio::spawn({
        let runtime = runtime.clone();
        async move { call(&runtime, counter("busy"), "block", "[]").await }
    });
    eventually("the action starts", || host.log.lock().len() == 1).await;
    // Past the sleep timeout (30 s), within the action timeout (60 s).
    advance(Duration::from_secs(45)).await;
    settle().await;
    assert_eq!(*host.stops.lock(), 0, "no sleep while an action runs");
    host.gate.add_permits(1);
    assert_eq!(blocked.await.unwrap().unwrap(), "1");
    advance(Duration::from_secs(31)).await;
    eventually("the actor sleeps once idle", || runtime.live_actors() == 0).await;
    runtime.drain().await;
}

#[tokio::test(start_paused = true)]
async fn sleep_requested_by_the_actor_happens_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = open(dir.path(), host.clone());
    call(&runtime, counter("s"), "increment", "[2]")
        .await
        .unwrap();
    call(&runtime, counter("s"), "sleep", "[]").await.unwrap();
    eventually("the actor sleeps", || runtime.live_actors() == 0).await;
    assert_eq!(*host.stop_log.lock(), ["s:sleep"]);
    assert_eq!(
        call(&runtime, counter("s"), "get", "[]").await.unwrap(),
        "2"
    );
    runtime.drain().await;
}

fn schedule_args(id: &str, at_ms: i64, action: &str, arg: &str) -> String {
    format!(r#"["{id}", {at_ms}, "{action}", {arg}]"#)
}

#[tokio::test(start_paused = true)]
async fn schedules_fire_in_time_order_and_wake_a_sleeping_actor() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = open(dir.path(), host.clone());
    let now = runtime.now_ms();
    for (id, offset, value) in [("one", 40_000, 1), ("two", 35_000, 2), ("three", 50_000, 3)] {
        let args = schedule_args(id, now + offset, "append", &value.to_string());
        call(&runtime, counter("alarm"), "schedule", &args)
            .await
            .unwrap();
    }
    assert_eq!(runtime.pending_schedules(), 3);
    advance(Duration::from_secs(31)).await;
    eventually("the actor sleeps", || runtime.live_actors() == 0).await;

    advance(Duration::from_secs(5)).await; // 36 s: "two" is due and wakes the actor.
    eventually("the first schedule runs", || {
        runtime.pending_schedules() == 2
    })
    .await;
    assert_eq!(*host.starts.lock(), 2, "the schedule woke the actor");
    advance(Duration::from_secs(20)).await; // 56 s: the other two are due.
    eventually("every schedule runs", || runtime.pending_schedules() == 0).await;
    settle().await;
    let seen = call(&runtime, counter("alarm"), "seen", "[]")
        .await
        .unwrap();
    assert_eq!(seen, "[2,1,3]");
    assert_eq!(rows(dir.path(), "SELECT count(*) FROM schedules"), 0);
    runtime.drain().await;
}

#[tokio::test(start_paused = true)]
async fn an_after_schedule_is_due_its_delay_after_the_call_on_cores_clock() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = open(dir.path(), host.clone());
    // Core's clock runs an hour ahead of the system clock now: a time stamped on any other
    // clock would be an hour off.
    advance(Duration::from_secs(3600)).await;
    let before = runtime.now_ms();
    call(
        &runtime,
        counter("after"),
        "schedule_after",
        r#"["later", 10000, "append", 5]"#,
    )
    .await
    .unwrap();
    let after = runtime.now_ms();
    let at_ms = rows(dir.path(), "SELECT at_ms FROM schedules WHERE id = 'later'");
    assert!(
        (before + 10_000..=after + 10_000).contains(&at_ms),
        "due at {at_ms}, the call ran from {before} to {after} on core's clock"
    );

    advance(Duration::from_millis(9_000)).await;
    settle().await;
    assert_eq!(runtime.pending_schedules(), 1, "not due before its delay");
    advance(Duration::from_millis(1_500)).await;
    eventually("the schedule runs", || runtime.pending_schedules() == 0).await;
    settle().await;
    assert_eq!(
        call(&runtime, counter("after"), "seen", "[]")
            .await
            .unwrap(),
        "[5]"
    );
    runtime.drain().await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_schedule_never_fires() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = open(dir.path(), host.clone());
    let now = runtime.now_ms();
    call(
        &runtime,
        counter("c"),
        "schedule",
        &schedule_args("x", now + 10_000, "append", "7"),
    )
    .await
    .unwrap();
    call(
        &runtime,
        counter("c"),
        "schedule",
        &schedule_args("y", now + 10_000, "append", "8"),
    )
    .await
    .unwrap();
    call(&runtime, counter("c"), "cancel", r#"["x"]"#)
        .await
        .unwrap();
    advance(Duration::from_secs(20)).await;
    eventually("the other schedule runs", || {
        runtime.pending_schedules() == 0
    })
    .await;
    settle().await;
    assert_eq!(
        call(&runtime, counter("c"), "seen", "[]").await.unwrap(),
        "[8]"
    );
    runtime.drain().await;
}

/// Runs `sql` on keel.db through a connection of its own, as another program would.
fn execute(dir: &std::path::Path, sql: &str) {
    let conn = rusqlite::Connection::open(dir.join(keel_core::store::DB_FILE)).unwrap();
    conn.execute(sql, []).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_due_schedule_whose_read_fails_is_offered_again_without_counting_an_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    let now = runtime.now_ms();
    call(
        &runtime,
        counter("r"),
        "schedule",
        &schedule_args("r1", now + 1_000, "append", "5"),
    )
    .await
    .unwrap();
    // A value out of range in the row: reading the schedule fails with a storage error,
    // not damage, until the row is put right.
    execute(
        dir.path(),
        "UPDATE schedules SET attempts = -1 WHERE id = 'r1'",
    );
    advance(Duration::from_millis(1_000)).await;
    settle().await;
    assert_eq!(
        runtime.pending_schedules(),
        1,
        "the schedule is still on the timer"
    );
    execute(
        dir.path(),
        "UPDATE schedules SET attempts = 0 WHERE id = 'r1'",
    );
    // Offered again after the first retry delay, and run.
    advance(Duration::from_millis(1_000)).await;
    eventually("the schedule runs", || runtime.pending_schedules() == 0).await;
    settle().await;
    assert_eq!(
        call(&runtime, counter("r"), "seen", "[]").await.unwrap(),
        "[5]"
    );
    assert_eq!(rows(dir.path(), "SELECT count(*) FROM schedules"), 0);
    runtime.drain().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_schedule_is_retried_with_backoff_then_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    *host.flaky_failures.lock() = 100;
    let runtime = open(dir.path(), host.clone());
    let now = runtime.now_ms();
    call(
        &runtime,
        counter("f"),
        "schedule",
        &schedule_args("f1", now + 1_000, "flaky", "0"),
    )
    .await
    .unwrap();
    let attempts = || {
        host.log
            .lock()
            .iter()
            .filter(|l| l.contains(":flaky:"))
            .count()
    };
    // Runs at 1 s, then retries 1, 2, 4 and 8 s after each failure: at 2, 4, 8 and 16 s.
    let mut elapsed = 0u64;
    for (attempt, due_at) in [
        (1usize, 1_000u64),
        (2, 2_000),
        (3, 4_000),
        (4, 8_000),
        (5, 16_000),
    ] {
        advance(Duration::from_millis(due_at - 1 - elapsed)).await;
        settle().await;
        assert_eq!(attempts(), attempt - 1, "attempt {attempt} ran early");
        advance(Duration::from_millis(1)).await;
        elapsed = due_at;
        eventually("the next attempt runs", || attempts() == attempt).await;
    }
    eventually("the schedule is given up", || {
        runtime.pending_schedules() == 0
    })
    .await;
    settle().await;
    advance(Duration::from_secs(120)).await;
    settle().await;
    assert_eq!(attempts(), 5, "five runs in all");
    assert_eq!(rows(dir.path(), "SELECT count(*) FROM schedules"), 0);
    assert_eq!(
        call(&runtime, counter("f"), "seen", "[]").await.unwrap(),
        "[]"
    );
    runtime.drain().await;
}

#[tokio::test(start_paused = true)]
async fn a_schedule_that_succeeds_on_retry_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    *host.flaky_failures.lock() = 2;
    let runtime = open(dir.path(), host.clone());
    let now = runtime.now_ms();
    call(
        &runtime,
        counter("r"),
        "schedule",
        &schedule_args("r1", now + 1_000, "flaky", "0"),
    )
    .await
    .unwrap();
    for step in [1_000, 1_000, 2_000] {
        advance(Duration::from_millis(step)).await;
        settle().await;
    }
    eventually("the schedule succeeds", || runtime.pending_schedules() == 0).await;
    settle().await;
    assert_eq!(
        call(&runtime, counter("r"), "seen", "[]").await.unwrap(),
        r#"["flaky"]"#
    );
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_that_fell_due_while_down_fire_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    let now = runtime.now_ms();
    call(
        &runtime,
        counter("late"),
        "schedule",
        &schedule_args("l1", now + 150, "append", "4"),
    )
    .await
    .unwrap();
    runtime.drain().await;
    drop(runtime);
    std::thread::sleep(Duration::from_millis(300));

    let runtime = open(dir.path(), CounterHost::new());
    for _ in 0..500 {
        if runtime.pending_schedules() == 0
            && rows(dir.path(), "SELECT count(*) FROM schedules") == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        call(&runtime, counter("late"), "seen", "[]").await.unwrap(),
        "[4]"
    );
    runtime.drain().await;
}

#[tokio::test(start_paused = true)]
async fn destroy_removes_state_kv_and_schedules() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = open(dir.path(), host.clone());
    call(&runtime, counter("d"), "increment", "[3]")
        .await
        .unwrap();
    call(&runtime, counter("d"), "kv_put", r#"["k", "v"]"#)
        .await
        .unwrap();
    let now = runtime.now_ms();
    call(
        &runtime,
        counter("d"),
        "schedule",
        &schedule_args("d1", now + 3_600_000, "append", "1"),
    )
    .await
    .unwrap();
    let id = runtime.resolve(counter("d")).await.unwrap().id.clone();
    assert_eq!(
        runtime.kv_get(&id, vec![b"k".to_vec()]).await.unwrap(),
        [Some(b"v".to_vec())]
    );

    call(&runtime, counter("d"), "destroy", "[]").await.unwrap();
    eventually("the actor is destroyed", || runtime.live_actors() == 0).await;
    assert_eq!(*host.stop_log.lock(), ["d:destroy"]);
    for table in ["actors", "kv", "schedules"] {
        assert_eq!(
            rows(dir.path(), &format!("SELECT count(*) FROM {table}")),
            0,
            "{table}"
        );
    }
    let get = Target::Key {
        name: "counter".into(),
        key: vec!["d".into()],
        mode: Resolve::Get,
        input: None,
    };
    assert_eq!(
        call(&runtime, get, "get", "[]").await.unwrap_err().code(),
        "not_found"
    );
    let by_id = call(&runtime, Target::Id(id.to_string()), "get", "[]").await;
    assert_eq!(by_id.unwrap_err().code(), "not_found");
    // A getOrCreate makes a fresh actor with a new id.
    assert_eq!(
        call(&runtime, counter("d"), "get", "[]").await.unwrap(),
        "0"
    );
    assert_ne!(runtime.resolve(counter("d")).await.unwrap().id, id);
    runtime.drain().await;
}

#[tokio::test(start_paused = true)]
async fn a_create_hook_that_throws_creates_no_actor() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    let refused = Target::Key {
        name: "counter".into(),
        key: vec!["no".into()],
        mode: Resolve::GetOrCreate,
        input: Some(Payload::json(r#"{"refuse":true}"#)),
    };
    let err = call(&runtime, refused, "get", "[]").await.unwrap_err();
    assert_eq!((err.group(), err.code()), ("user", "refused"));
    eventually("the failed actor leaves", || runtime.live_actors() == 0).await;
    assert_eq!(rows(dir.path(), "SELECT count(*) FROM actors"), 0);
    assert_eq!(
        call(&runtime, counter("no"), "increment", "[1]")
            .await
            .unwrap(),
        "1"
    );
    runtime.drain().await;
}

#[tokio::test(start_paused = true)]
async fn kv_reads_see_the_actors_own_latest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    for (k, v) in [
        ("user/1", "ada"),
        ("user/2", "bob"),
        ("other", "x"),
        ("user/3", "cy"),
    ] {
        call(
            &runtime,
            counter("kv"),
            "kv_put",
            &format!(r#"["{k}", "{v}"]"#),
        )
        .await
        .unwrap();
    }
    let id = runtime.resolve(counter("kv")).await.unwrap().id.clone();
    let listed = runtime
        .kv_list(&id, b"user/".to_vec(), 10, false)
        .await
        .unwrap();
    let keys: Vec<String> = listed
        .iter()
        .map(|(k, _)| String::from_utf8(k.clone()).unwrap())
        .collect();
    assert_eq!(keys, ["user/1", "user/2", "user/3"]);
    let reversed = runtime
        .kv_list(&id, b"user/".to_vec(), 2, true)
        .await
        .unwrap();
    assert_eq!(reversed[0].1, b"cy");
    assert_eq!(reversed.len(), 2);
    let values = runtime
        .kv_get(&id, vec![b"other".to_vec(), b"missing".to_vec()])
        .await
        .unwrap();
    assert_eq!(values, [Some(b"x".to_vec()), None]);
    runtime.drain().await;
}

#[tokio::test(start_paused = true)]
async fn a_keep_awake_hold_blocks_idle_sleep_until_it_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = open(dir.path(), host.clone());
    call(&runtime, counter("held"), "increment", "[1]")
        .await
        .unwrap();
    let id = runtime
        .resolve(counter("held"))
        .await
        .unwrap()
        .id
        .to_string();
    runtime.keep_awake(&id, true).unwrap();
    advance(Duration::from_secs(120)).await;
    settle().await;
    assert_eq!(
        runtime.live_actors(),
        1,
        "held awake well past the sleep timeout"
    );

    // Closing the hold starts the idle time afresh.
    runtime.keep_awake(&id, false).unwrap();
    settle().await;
    advance(Duration::from_secs(29)).await;
    settle().await;
    assert_eq!(
        runtime.live_actors(),
        1,
        "awake before a full timeout since the release"
    );
    advance(Duration::from_secs(2)).await;
    eventually("the actor sleeps", || runtime.live_actors() == 0).await;
    let err = runtime.keep_awake(&id, true).unwrap_err();
    assert_eq!(
        err.code(),
        "stopped",
        "a sleeping actor is not woken by a hold"
    );
    runtime.drain().await;
}

#[tokio::test(start_paused = true)]
async fn a_due_schedule_that_finds_the_mailbox_full_is_offered_again_without_counting_a_failure() {
    // docs/actors.md, "Retries": a run that finds the actor's mailbox full is offered again a
    // second later, without counting as a failure. Held full for 20 s, longer than the five
    // failed runs (at 0, 1, 3, 7 and 15 s) after which a failing schedule is dropped.
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let mut config = common::config(dir.path());
    config.limits.max_mailbox_len = 1;
    let runtime = Arc::new(
        Runtime::open(config, common::types(), host.clone(), &Default::default()).unwrap(),
    );
    let now = runtime.now_ms();
    call(
        &runtime,
        counter("m"),
        "schedule",
        &schedule_args("m1", now + 1_000, "append", "5"),
    )
    .await
    .unwrap();
    let held = common::block_a_call(&runtime, &host, "m").await;
    // One message waits behind the held call: the mailbox is full.
    let queued = {
        let runtime = runtime.clone();
        tokio::spawn(async move { call(&runtime, counter("m"), "increment", "[1]").await })
    };
    settle().await;
    for _ in 0..20 {
        advance(Duration::from_millis(1_000)).await;
        settle().await;
    }
    assert_eq!(
        runtime.pending_schedules(),
        1,
        "the schedule was not given up"
    );
    assert_eq!(
        rows(dir.path(), "SELECT attempts FROM schedules WHERE id = 'm1'"),
        0,
        "no failed run was counted"
    );
    assert_eq!(host.runs("append"), 0);
    host.gate.add_permits(1);
    held.await.unwrap().unwrap();
    queued.await.unwrap().unwrap();
    advance(Duration::from_millis(1_000)).await;
    eventually("the schedule runs", || runtime.pending_schedules() == 0).await;
    settle().await;
    assert_eq!(
        call(&runtime, counter("m"), "seen", "[]").await.unwrap(),
        "[5]",
        "it ran once the mailbox had room"
    );
    assert_eq!(rows(dir.path(), "SELECT count(*) FROM schedules"), 0);
    runtime.drain().await;
}
