//! keel's envoy against the real engine binary: activation, fenced storage, group commit,
//! a crash of the engine, and sleep/wake with the stale generation fenced off.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{next_event, TestEngine, STEP_TIMEOUT};
use keel_core::store::{ActorRecord, StoredConn};
use keel_core::writer::{ConnWrite, Settle, Writes};
use keel_core::Storage as _;
use keel_core::{Encoding, Error, KvWrite, Payload, Result, Schedule, ScheduleWrite};
use keel_envoy::{
    ActorIdentity, ActorStore, Engine, EngineEvent, EngineStopReason, EngineStorage,
    ShutdownOutcome, Snapshot,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

/// An activation the engine started on our envoy, with its storage open and its start
/// answered.
struct Started {
    actor_id: String,
    generation: u32,
    store: ActorStore,
    snapshot: Snapshot,
}

/// Waits for the engine's next start, opens the actor's storage and answers the start.
async fn accept_start(engine: &Engine, events: &mut mpsc::Receiver<EngineEvent>) -> Started {
    let EngineEvent::Start {
        actor_id,
        name,
        key,
        generation,
        created_at_ms,
        input,
        reply,
    } = next_event(events).await
    else {
        panic!("expected a start");
    };
    let identity = ActorIdentity {
        name,
        key: key.unwrap_or_default(),
        created_at_ms,
        input: input.map(|bytes| Payload {
            encoding: Encoding::Json,
            bytes,
        }),
    };
    let (store, snapshot) = engine
        .open_actor(&actor_id, generation, &identity, Encoding::Json)
        .await
        .expect("open the actor's storage");
    reply.send(Ok(()));
    Started {
        actor_id,
        generation,
        store,
        snapshot,
    }
}

/// Sends a request to the actor through the engine's gateway, in the background: the gateway
/// holds it until the actor runs somewhere, so it wakes a sleeping actor. keel's envoy does
/// not route tunneled requests yet and answers 404 with keel's error body.
fn wake_through_gateway(
    engine: &TestEngine,
    actor_id: &str,
) -> tokio::task::JoinHandle<std::io::Result<(u16, serde_json::Value)>> {
    let port = engine.guard_port();
    let path = format!("/gateway/{actor_id}/ping");
    tokio::spawn(async move { common::http(port, "GET", &path, None).await })
}

/// One commit, awaited until its release.
async fn commit(store: &ActorStore, writes: Writes) -> Result<()> {
    let (tx, rx) = oneshot::channel();
    store.commit(
        writes,
        Box::new(move |result| {
            let _ = tx.send(result); // The test awaits it below.
        }),
    );
    rx.await.expect("every commit is released")
}

fn state(n: u64) -> Writes {
    Writes {
        state: Some(n.to_string().into_bytes()),
        ..Writes::default()
    }
}

fn state_of(snapshot: &Snapshot) -> Option<u64> {
    let state = snapshot.state.as_ref()?;
    assert_eq!(state.encoding, Encoding::Json);
    Some(
        std::str::from_utf8(&state.bytes)
            .expect("utf-8")
            .parse()
            .expect("a count"),
    )
}

async fn load_count(store: &ActorStore) -> Option<u64> {
    state_of(&store.load().await.expect("load").expect("the actor exists"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_created_through_the_api_commits_100_increments_and_loads_them() {
    let pool = "keel-counter";
    let engine = TestEngine::start(pool).await;
    let connecting = Instant::now();
    let (envoy, mut events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect");
    let connect_latency = connecting.elapsed();

    let created = Instant::now();
    let actor_id = engine
        .create_actor("counter", "room/1", pool, br#"{"start":0}"#)
        .await;
    let started = accept_start(&envoy, &mut events).await;
    let start_latency = created.elapsed();
    assert_eq!(started.actor_id, actor_id);
    assert!(started.generation < u32::MAX);
    assert_eq!(started.snapshot.state, None, "a new actor has no state");
    assert_eq!(
        started.snapshot.input,
        Some(Payload::json(r#"{"start":0}"#)),
        "the creation input is kept until the state is first written"
    );
    assert!(
        started.snapshot.never_alarmed,
        "a new actor has no alarm to clear"
    );

    let store = &started.store;
    let mut round_trips = Vec::new();
    for n in 1..=100u64 {
        let mut writes = state(n);
        writes.kv.push(KvWrite::Put {
            key: b"count".to_vec(),
            value: n.to_string().into_bytes(),
        });
        writes.kv.push(KvWrite::Put {
            key: format!("log/{n:03}").into_bytes(),
            value: vec![1],
        });
        if n == 50 {
            let before = store.load().await.expect("load").expect("the actor exists");
            assert!(before.never_alarmed, "49 commits without schedules");
            writes.kv.push(KvWrite::Delete {
                key: b"log/001".to_vec(),
            });
            writes.schedules.push(ScheduleWrite::Add(Schedule {
                id: "later".into(),
                at_ms: 2_000_000_000_000,
                action: "tick".into(),
                args: vec![0x80],
            }));
            writes.schedules.push(ScheduleWrite::Add(Schedule {
                id: "cancelled".into(),
                at_ms: 1,
                action: "tick".into(),
                args: vec![0x80],
            }));
            writes.schedules.push(ScheduleWrite::Cancel {
                id: "cancelled".into(),
            });
        }
        let sent = Instant::now();
        commit(store, writes).await.expect("commit");
        round_trips.push(sent.elapsed());
    }
    let stats = *store.stats().borrow();
    assert_eq!(
        (stats.batches, stats.acknowledged, stats.failed),
        (100, 100, 0)
    );

    let snapshot = store.load().await.expect("load").expect("the actor exists");
    assert_eq!(state_of(&snapshot), Some(100));
    assert!(
        !snapshot.never_alarmed,
        "a batch changed the schedules: the engine may hold an alarm"
    );
    assert_eq!(
        snapshot.input, None,
        "the input is dropped with the first state"
    );
    let ids: Vec<&str> = snapshot
        .schedules
        .iter()
        .map(|s| s.schedule.id.as_str())
        .collect();
    assert_eq!(ids, ["later"]);
    assert_eq!(
        store
            .kv_get(&[b"count".to_vec(), b"missing".to_vec()])
            .await
            .expect("kv_get"),
        [Some(b"100".to_vec()), None]
    );
    let log = store.kv_list(b"log/", 1000, false).await.expect("kv_list");
    assert_eq!(log.len(), 99, "100 log entries, one deleted");
    assert_eq!(log[0].0, b"log/002");
    let last = store.kv_list(b"log/", 1, true).await.expect("kv_list");
    assert_eq!(last[0].0, b"log/100");

    // Deleting the actor's data goes behind every earlier commit; nothing commits after it.
    let (tx, deleted) = oneshot::channel();
    store.delete(Box::new(move |result| {
        let _ = tx.send(result); // Awaited below.
    }));
    deleted.await.expect("released").expect("delete");
    assert_eq!(store.load().await.expect("load"), None);
    assert!(store
        .kv_list(b"", 10, false)
        .await
        .expect("kv_list")
        .is_empty());
    let err = commit(store, state(101)).await.unwrap_err();
    assert_eq!(err.code(), "not_found", "{err}");

    round_trips.sort();
    eprintln!(
        "measured: connect {connect_latency:?}, start {start_latency:?} (create to storage open), \
         sequential commit round trip p50 {:?} p99 {:?}",
        round_trips[49], round_trips[98]
    );
    let stopping = Instant::now();
    assert_eq!(
        shutdown_answering_stops(&envoy, &mut events).await,
        ShutdownOutcome::Graceful
    );
    eprintln!(
        "measured: graceful shutdown with one actor {:?}",
        stopping.elapsed()
    );
}

/// Shuts the envoy down gracefully, answering the stops the drain sends meanwhile.
async fn shutdown_answering_stops(
    envoy: &Engine,
    events: &mut mpsc::Receiver<EngineEvent>,
) -> ShutdownOutcome {
    let shutdown = envoy.shutdown(STEP_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            // The shutdown finished (or gave up): nothing more to answer.
            outcome = &mut shutdown => return outcome,
            // A stop sent by the drain: tear down (nothing to flush here) and complete it.
            Some(event) = events.recv() => match event {
                EngineEvent::Stop { reason, done, .. } => {
                    assert_eq!(reason, EngineStopReason::GoingAway);
                    done.complete();
                }
                EngineEvent::Start { .. } => panic!("a start during shutdown"),
            },
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn commits_queued_behind_a_batch_in_flight_coalesce_and_release_in_order() {
    let pool = "keel-coalesce";
    let engine = TestEngine::start(pool).await;
    let (envoy, mut events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect");
    engine.create_actor("counter", "c", pool, b"null").await;
    let started = accept_start(&envoy, &mut events).await;
    let store = Arc::new(started.store);

    const COMMITS: u64 = 50;
    let released = Arc::new(Mutex::new(Vec::new()));
    let (all_done, done) = oneshot::channel();
    let mut all_done = Some(all_done);
    let mut enqueue = |n: u64| {
        let mut writes = state(n + 1);
        writes.kv.push(KvWrite::Put {
            key: b"last".to_vec(),
            value: n.to_string().into_bytes(),
        });
        writes.kv.push(KvWrite::Put {
            key: format!("k{n:02}").into_bytes(),
            value: vec![],
        });
        let released = released.clone();
        let stats = store.stats();
        let all_done = (n == COMMITS - 1).then(|| all_done.take().expect("once"));
        store.commit(
            writes,
            Box::new(move |result| {
                // Commit `n` is acknowledged once more than `n` commits are.
                let acknowledged = stats.borrow().acknowledged;
                released.lock().push((n, result.is_ok(), acknowledged));
                if let Some(all_done) = all_done {
                    let _ = all_done.send(()); // The test awaits it below.
                }
            }),
        );
    };

    // The first commit goes out alone; the rest is queued while it is in flight. On this
    // single-threaded runtime nothing else runs between the queued commits.
    enqueue(0);
    let mut stats = store.stats();
    stats
        .wait_for(|stats| stats.in_flight)
        .await
        .expect("the first batch goes out");
    for n in 1..COMMITS {
        enqueue(n);
    }
    tokio::time::timeout(STEP_TIMEOUT, done)
        .await
        .expect("every commit is released in time")
        .expect("released");

    let released = released.lock().clone();
    let order: Vec<u64> = released.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(
        order,
        (0..COMMITS).collect::<Vec<_>>(),
        "released in commit order"
    );
    for (n, ok, acknowledged) in &released {
        assert!(ok, "commit {n} succeeded");
        assert!(
            acknowledged > n,
            "commit {n} was released before its batch was acknowledged ({acknowledged} were)"
        );
    }
    let stats = *store.stats().borrow();
    assert_eq!(stats.acknowledged, COMMITS);
    assert!(
        stats.batches < COMMITS / 2,
        "{COMMITS} commits took {} batches",
        stats.batches
    );
    eprintln!(
        "measured: {COMMITS} commits in {} batches (coalescing factor {:.1}), last batch round \
         trip {:?}",
        stats.batches,
        COMMITS as f64 / stats.batches as f64,
        stats.last_round_trip
    );

    assert_eq!(load_count(&store).await, Some(COMMITS));
    assert_eq!(
        store.kv_get(&[b"last".to_vec()]).await.expect("kv_get"),
        [Some((COMMITS - 1).to_string().into_bytes())],
        "coalesced writes applied in order"
    );
    let keys = store.kv_list(b"k", 100, false).await.expect("kv_list");
    assert_eq!(keys.len() as u64, COMMITS);
    assert_eq!(
        keys[0],
        (b"k00".to_vec(), Vec::new()),
        "an empty value reads as empty"
    );
    envoy.abandon();
}

#[tokio::test]
async fn connect_refuses_a_bad_config_before_dialing() {
    let mut config = keel_envoy::EngineConfig::new("127.0.0.1:6420");
    let err = keel_envoy::connect(config.clone())
        .await
        .err()
        .expect("refused");
    assert_eq!((err.group(), err.code()), ("registry", "invalid_config"));
    config.endpoint = "http://127.0.0.1:6420".into();
    config.namespace = String::new();
    let err = keel_envoy::connect(config).await.err().expect("refused");
    assert_eq!(err.code(), "invalid_config", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_loses_no_acknowledged_commit() {
    let pool = "keel-crash";
    let mut engine = TestEngine::start(pool).await;
    let (envoy, mut events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect");
    engine.create_actor("counter", "crash", pool, b"null").await;
    let started = accept_start(&envoy, &mut events).await;
    for n in 1..=20 {
        commit(&started.store, state(n)).await.expect("commit");
    }

    // One more commit in flight (or not yet sent) when the engine dies: its outcome is
    // unknown, but everything acknowledged before it must survive.
    let (tx, in_doubt) = oneshot::channel();
    started.store.commit(
        state(21),
        Box::new(move |result| {
            let _ = tx.send(result); // Awaited below.
        }),
    );
    engine.kill();
    let in_doubt = in_doubt.await.expect("released");
    if let Err(err) = &in_doubt {
        assert_eq!((err.group(), err.code()), ("storage", "io"), "{err}");
        // The store refuses what comes after a failed batch: those writes were computed on
        // top of one whose outcome is unknown.
        let refused = commit(&started.store, state(22)).await.unwrap_err();
        assert_eq!(refused.code(), "io");
    }

    let restarted = Instant::now();
    engine.restart().await;
    // The engine keeps the actor on this envoy at the same generation; a request queued while
    // the envoy reconnects is sent once it is back.
    let identity = ActorIdentity {
        name: "counter".into(),
        key: "crash".into(),
        created_at_ms: 0,
        input: None,
    };
    let (store, snapshot) = tokio::time::timeout(
        STEP_TIMEOUT,
        envoy.open_actor(
            &started.actor_id,
            started.generation,
            &identity,
            Encoding::Json,
        ),
    )
    .await
    .expect("the envoy reconnects in time")
    .expect("reopen after the restart");
    let recovered = restarted.elapsed();
    let count = state_of(&snapshot).expect("state");
    match in_doubt {
        Ok(()) => assert_eq!(count, 21, "an acknowledged commit survives"),
        Err(_) => assert!(
            (20..=21).contains(&count),
            "acknowledged commits survive: {count}"
        ),
    }
    commit(&store, state(count + 1))
        .await
        .expect("commits go on");
    assert_eq!(load_count(&store).await, Some(count + 1));
    eprintln!("measured: engine restart to the actor's storage reopened {recovered:?}");
    envoy.abandon();
}

/// How soon after the restarted engine answers `/health` keel must be connected and
/// committing again.
const RECONNECTED_WITHIN: Duration = Duration::from_secs(5);

/// How long the engine stays down at each crash before it is started again.
const ENGINE_DOWN: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_each_of_three_engine_crashes_in_a_row_commits_are_acknowledged_within_5_s_of_health()
{
    let pool = "keel-outages";
    let mut engine = TestEngine::start(pool).await;
    let (envoy, mut events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect");
    engine
        .create_actor("counter", "outages", pool, b"null")
        .await;
    let started = accept_start(&envoy, &mut events).await;
    let mut n = 0;
    for _ in 0..5 {
        n += 1;
        commit(&started.store, state(n)).await.expect("commit");
    }
    let mut recoveries = Vec::new();
    for outage in 1..=3 {
        // Nothing in flight at the kill: every commit before it was acknowledged. The engine
        // stays down for a while, as a restart on a loaded machine does: the envoy's attempts
        // meanwhile find nobody.
        engine.kill();
        tokio::time::sleep(ENGINE_DOWN).await;
        engine.restart().await;
        let healthy = Instant::now();
        // Sent while the envoy may still be reconnecting: it waits for the connection, and
        // the engine keeps the actor on this envoy at the same generation.
        n += 1;
        tokio::time::timeout(STEP_TIMEOUT, commit(&started.store, state(n)))
            .await
            .unwrap_or_else(|_| panic!("outage {outage}: no commit acknowledged in time"))
            .unwrap_or_else(|err| panic!("outage {outage}: {err}"));
        let recovered = healthy.elapsed();
        recoveries.push(recovered);
        assert!(
            recovered < RECONNECTED_WITHIN,
            "outage {outage}: the first commit was acknowledged {recovered:?} after the engine \
             answered /health (all: {recoveries:?})"
        );
        for _ in 0..5 {
            n += 1;
            commit(&started.store, state(n)).await.expect("commit");
        }
    }
    assert_eq!(
        load_count(&started.store).await,
        Some(n),
        "every acknowledged commit is there"
    );
    eprintln!("measured: engine /health answering to a commit acknowledged, 3 crashes in a row: {recoveries:?}");
    envoy.abandon();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_then_wake_is_the_next_generation_and_the_stale_one_is_fenced() {
    let pool = "keel-fence";
    let engine = TestEngine::start(pool).await;
    let (envoy, mut events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect");
    let actor_id = engine.create_actor("counter", "fence", pool, b"null").await;
    let first = accept_start(&envoy, &mut events).await;
    commit(&first.store, state(1)).await.expect("commit");

    envoy.sleep_actor(&actor_id, first.generation);
    let EngineEvent::Stop {
        actor_id: stopped,
        generation,
        reason,
        done,
    } = next_event(&mut events).await
    else {
        panic!("expected a stop");
    };
    assert_eq!(
        (stopped.as_str(), generation, reason),
        (actor_id.as_str(), first.generation, EngineStopReason::Sleep)
    );
    done.complete();

    // A request through the gateway wakes the actor as the next generation with its state.
    let gateway = wake_through_gateway(&engine, &actor_id);
    let woken = Instant::now();
    let second = accept_start(&envoy, &mut events).await;
    let wake_latency = woken.elapsed();
    assert_eq!(second.actor_id, actor_id);
    assert_eq!(second.generation, first.generation + 1);
    assert_eq!(state_of(&second.snapshot), Some(1), "the state is kept");
    let (status, body) = gateway.await.expect("joined").expect("gateway answered");
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        body["group"], "request",
        "keel's error body came through the tunnel"
    );

    commit(&second.store, state(2))
        .await
        .expect("the successor commits");

    // The old activation's store still carries the old generation: refused, no effect.
    let err = commit(&first.store, state(999)).await.unwrap_err();
    eprintln!(
        "stale commit refused: {}.{}: {err}",
        err.group(),
        err.code()
    );
    assert_eq!((err.group(), err.code()), ("actor", "stopped"), "{err}");
    assert_eq!(err.http_status(), 503);
    assert!(matches!(err, Error::ActorStopped));
    // A failed batch latches: what comes after it is refused without being sent.
    let sent = first.store.stats().borrow().batches;
    let err = commit(&first.store, state(1000)).await.unwrap_err();
    assert_eq!(err.code(), "stopped");
    assert_eq!(
        first.store.stats().borrow().batches,
        sent,
        "refused without a batch"
    );
    assert_eq!(load_count(&second.store).await, Some(2));
    eprintln!("measured: wake from sleep by a gateway request {wake_latency:?}");

    // A stop intent asks the engine to destroy the actor; it answers with a stop. (The
    // destroy itself completes asynchronously in the engine: a commit right after the stop
    // completed was still accepted, so keel commits nothing after completing a stop.)
    envoy.stop_actor(&actor_id, second.generation);
    let EngineEvent::Stop { reason, done, .. } = next_event(&mut events).await else {
        panic!("expected a stop");
    };
    assert_eq!(reason, EngineStopReason::StopIntent);
    assert_eq!(reason.core(), keel_core::StopReason::Destroy);
    done.complete();
    envoy.abandon();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_envoy_s_actor_restarts_on_another_with_every_acknowledged_commit() {
    let pool = "keel-failover";
    let engine =
        TestEngine::start_with(pool, serde_json::json!({ "envoy_lost_threshold": 2000 })).await;
    let (owner, mut owner_events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect");
    let actor_id = engine.create_actor("counter", "moved", pool, b"null").await;
    let first = accept_start(&owner, &mut owner_events).await;
    for n in 1..=10 {
        commit(&first.store, state(n)).await.expect("commit");
    }
    let (standby, mut standby_events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect the standby");

    // The owner vanishes without telling the engine: no stopping message, no stops. Once the
    // engine declares it lost, the actor sleeps (its crash policy) and the next request
    // starts it on the envoy that is left.
    let abandoned = Instant::now();
    owner.abandon();
    let gateway = wake_through_gateway(&engine, &actor_id);
    let second = accept_start(&standby, &mut standby_events).await;
    let moved_after = abandoned.elapsed();
    assert_eq!(second.actor_id, actor_id);
    assert!(second.generation > first.generation);
    assert_eq!(
        state_of(&second.snapshot),
        Some(10),
        "every acknowledged commit moved"
    );
    commit(&second.store, state(11))
        .await
        .expect("the new owner commits");
    assert_eq!(load_count(&second.store).await, Some(11));
    let (status, _) = gateway.await.expect("joined").expect("gateway answered");
    assert_eq!(status, 404);
    eprintln!("measured: abandoned envoy to the actor started elsewhere {moved_after:?}");

    // A zombie of the old owner: another connection writing with the old generation, as the
    // owner would if it came back. Opening writes (schema, identity): the engine refuses it,
    // and the successor's data is untouched.
    let (zombie, _zombie_events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect the zombie");
    let identity = ActorIdentity {
        name: "counter".into(),
        key: "moved".into(),
        created_at_ms: 0,
        input: None,
    };
    let refused = zombie
        .open_actor(&actor_id, first.generation, &identity, Encoding::Json)
        .await
        .err()
        .expect("a write with the old generation is refused");
    assert_eq!(
        (refused.group(), refused.code()),
        ("actor", "stopped"),
        "{refused}"
    );
    assert_eq!(
        load_count(&second.store).await,
        Some(11),
        "the successor's data is intact"
    );
    commit(&second.store, state(12))
        .await
        .expect("the successor still commits");
    zombie.abandon();

    // A drain whose stops nobody completes is bounded: past the budget the envoy stops at
    // once. The stop sits unanswered in the channel meanwhile.
    let budget = std::time::Duration::from_millis(300);
    assert_eq!(standby.shutdown(budget).await, ShutdownOutcome::Forced);
    let EngineEvent::Stop { reason, .. } = next_event(&mut standby_events).await else {
        panic!("expected the drain's stop");
    };
    assert_eq!(reason, EngineStopReason::GoingAway);
}

fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

fn add_schedule(id: &str, at_ms: i64) -> ScheduleWrite {
    ScheduleWrite::Add(Schedule {
        id: id.into(),
        at_ms,
        action: "tick".into(),
        args: b"[]".to_vec(),
    })
}

/// Stops the activation for the sleep the envoy asked for, as keel's stop path does.
async fn sleep_and_stop(
    envoy: &Engine,
    events: &mut mpsc::Receiver<EngineEvent>,
    started: Started,
) {
    envoy.sleep_actor(&started.actor_id, started.generation);
    let EngineEvent::Stop { reason, done, .. } = next_event(events).await else {
        panic!("expected a stop");
    };
    assert_eq!(reason, EngineStopReason::Sleep);
    drop(started.store);
    done.complete();
}

/// How early the engine's alarm may fire and still be the right one's.
const ALARM_EARLY_MS: i64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_alarm_wakes_a_sleeping_actor_at_its_earliest_schedule_not_a_cancelled_one() {
    let pool = "keel-alarm";
    let engine = TestEngine::start(pool).await;
    let (envoy, mut events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect");
    let actor_id = engine.create_actor("counter", "alarm", pool, b"null").await;
    let first = accept_start(&envoy, &mut events).await;
    assert!(first.snapshot.schedules.is_empty());

    // Three schedules in one commit, then the earliest cancelled in the next: the alarm must
    // follow the cancel to the second one, or the engine would wake the actor at the first.
    let now = epoch_ms();
    let (cancelled, due, far) = (now + 1_500, now + 3_000, now + 600_000);
    commit(
        &first.store,
        Writes {
            schedules: vec![
                add_schedule("cancelled", cancelled),
                add_schedule("due", due),
                add_schedule("far", far),
            ],
            ..Writes::default()
        },
    )
    .await
    .expect("commit the schedules");
    commit(
        &first.store,
        Writes {
            schedules: vec![ScheduleWrite::Cancel {
                id: "cancelled".into(),
            }],
            ..Writes::default()
        },
    )
    .await
    .expect("commit the cancel");
    let generation = first.generation;
    sleep_and_stop(&envoy, &mut events, first).await;

    // No request from here on: only the alarm can start the actor again.
    let second = accept_start(&envoy, &mut events).await;
    let woke_at = epoch_ms();
    assert_eq!(second.actor_id, actor_id);
    assert_eq!(second.generation, generation + 1);
    // The engine's timer may fire a few milliseconds early (3 ms seen in CI); the cancelled
    // schedule's alarm would have fired 1.5 s before `due`.
    assert!(
        woke_at + ALARM_EARLY_MS >= due,
        "woken {} ms before the earliest schedule left: the cancelled one's alarm fired",
        due - woke_at
    );
    let ids: Vec<&str> = second
        .snapshot
        .schedules
        .iter()
        .map(|stored| stored.schedule.id.as_str())
        .collect();
    assert_eq!(ids, ["due", "far"], "the woken actor finds its due work");
    eprintln!(
        "measured: engine alarm wake, due time to start received {} ms",
        woke_at - due
    );

    // The due one ran (settled in the commit of its effects): the alarm moves to the far one,
    // and the actor sleeps again without being woken before it.
    commit(
        &second.store,
        Writes {
            state: Some(b"1".to_vec()),
            settle: Some(("due".into(), Settle::Done)),
            ..Writes::default()
        },
    )
    .await
    .expect("settle the due schedule");
    assert_eq!(load_count(&second.store).await, Some(1));
    let generation = second.generation;
    sleep_and_stop(&envoy, &mut events, second).await;

    // A request wakes it (the far alarm is minutes away) with the effect and the far schedule.
    let gateway = wake_through_gateway(&engine, &actor_id);
    let third = accept_start(&envoy, &mut events).await;
    assert_eq!(third.generation, generation + 1);
    assert_eq!(
        state_of(&third.snapshot),
        Some(1),
        "the schedule's effect is durable"
    );
    let ids: Vec<&str> = third
        .snapshot
        .schedules
        .iter()
        .map(|stored| stored.schedule.id.as_str())
        .collect();
    assert_eq!(ids, ["far"]);
    gateway.await.expect("joined").expect("gateway answered");

    // A schedule due soon, then it and the far one cancelled: with no schedule left the
    // engine's alarm is cleared (docs/engine.md), so nothing starts the sleeping actor, at the
    // cancelled one's time or after it.
    let soon = epoch_ms() + 1_500;
    commit(
        &third.store,
        Writes {
            schedules: vec![add_schedule("soon", soon)],
            ..Writes::default()
        },
    )
    .await
    .expect("commit the soon schedule");
    commit(
        &third.store,
        Writes {
            schedules: vec![
                ScheduleWrite::Cancel { id: "soon".into() },
                ScheduleWrite::Cancel { id: "far".into() },
            ],
            ..Writes::default()
        },
    )
    .await
    .expect("commit the cancels");
    sleep_and_stop(&envoy, &mut events, third).await;
    let quiet_until = tokio::time::Instant::now()
        + Duration::from_millis(u64::try_from(soon - epoch_ms()).unwrap_or(0) + 2_000);
    while let Ok(Some(event)) = tokio::time::timeout_at(quiet_until, events.recv()).await {
        assert!(
            !matches!(event, EngineEvent::Start { .. }),
            "the actor was started with no schedule left: the engine's alarm was not cleared"
        );
    }
    envoy.abandon();
}

/// One commit through keel-core's `Storage` seam, awaited until its release.
async fn seam_commit(storage: &EngineStorage, actor_id: &Arc<str>, writes: Writes) -> Result<()> {
    let (tx, rx) = oneshot::channel();
    storage.commit(
        actor_id.clone(),
        Some(Box::new(writes)),
        None,
        Box::new(move |result| {
            let _ = tx.send(result); // Awaited below.
        }),
        false,
    );
    rx.await.expect("every commit is released")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_batch_lost_to_an_engine_crash_the_reloaded_instance_commits_again() {
    let pool = "keel-renew";
    let mut engine = TestEngine::start(pool).await;
    let (envoy, mut events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect");
    engine.create_actor("counter", "renew", pool, b"null").await;
    let started = accept_start(&envoy, &mut events).await;
    let storage = Arc::new(EngineStorage::default());
    let record = ActorRecord {
        id: started.actor_id.clone(),
        name: "counter".into(),
        key: "renew".into(),
    };
    let id: Arc<str> = started.actor_id.as_str().into();
    storage.insert(started.store, record, 0, started.snapshot);
    assert!(storage.load(&id).await.expect("first load").is_some());

    // Commits back to back, so one is in flight when the engine dies: it fails (its outcome
    // unknown), and the store refuses what follows.
    let (acked_tx, mut acked) = tokio::sync::watch::channel(0u64);
    let writer = {
        let (storage, id) = (storage.clone(), id.clone());
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                n += 1;
                if let Err(err) = seam_commit(&storage, &id, state(n)).await {
                    return (n, err);
                }
                acked_tx.send_replace(n);
            }
        })
    };
    tokio::time::timeout(STEP_TIMEOUT, acked.wait_for(|n| *n >= 10))
        .await
        .expect("10 commits in time")
        .expect("the writer runs");
    engine.kill();
    let (failed_at, err) = tokio::time::timeout(STEP_TIMEOUT, writer)
        .await
        .expect("the commit in flight at the crash fails")
        .expect("joined");
    assert_eq!((err.group(), err.code()), ("storage", "io"), "{err}");
    engine.restart().await;

    // keel-core's task replaces the instance: its load reads what is committed, and from then
    // on its commits land again.
    let snapshot = tokio::time::timeout(STEP_TIMEOUT, storage.load(&id))
        .await
        .expect("the envoy reconnects in time")
        .expect("reload")
        .expect("the actor exists");
    let count: u64 = std::str::from_utf8(snapshot.state.as_deref().expect("state"))
        .expect("utf-8")
        .parse()
        .expect("a count");
    assert!(
        (failed_at - 1..=failed_at).contains(&count),
        "acknowledged commits survive: {count}, failed at {failed_at}"
    );
    seam_commit(&storage, &id, state(count + 1))
        .await
        .expect("the reloaded instance commits again");
    let snapshot = storage.load(&id).await.expect("load").expect("exists");
    assert_eq!(
        snapshot.state.as_deref(),
        Some((count + 1).to_string().as_bytes())
    );
    envoy.abandon();
}

/// A commit of state `n` carrying change `seq` of the actor's SQL database (the changeset's
/// bytes are only stored here, never applied).
fn state_and_sql(n: u64, seq: u64) -> Writes {
    Writes {
        db: Some(keel_core::DbChange {
            seq,
            changeset: format!("changeset {seq} of state {n}").into_bytes(),
            trim_below: 0,
        }),
        ..state(n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_generation_s_batch_carrying_sql_is_refused_and_lands_nothing() {
    let pool = "keel-db-fence";
    let engine = TestEngine::start(pool).await;
    let (envoy, mut events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect");
    let actor_id = engine
        .create_actor("counter", "db-fence", pool, b"null")
        .await;
    let first = accept_start(&envoy, &mut events).await;
    commit(&first.store, state_and_sql(1, 1))
        .await
        .expect("change 1 commits with its state");

    envoy.sleep_actor(&actor_id, first.generation);
    let EngineEvent::Stop { done, .. } = next_event(&mut events).await else {
        panic!("expected a stop");
    };
    done.complete();
    let gateway = wake_through_gateway(&engine, &actor_id);
    let second = accept_start(&envoy, &mut events).await;
    assert_eq!(second.generation, first.generation + 1);
    gateway.await.expect("joined").expect("gateway answered");

    // The zombie's SQL change 2 is refused with its state, by the generation fence.
    let err = commit(&first.store, state_and_sql(999, 2))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ActorStopped), "{err}");
    // It landed nothing: the successor's own change 2 commits (change numbers are a primary
    // key, so a landed change 2 would fail this batch, as the next commit shows).
    commit(&second.store, state_and_sql(2, 2))
        .await
        .expect("the successor's change 2");
    assert_eq!(load_count(&second.store).await, Some(2));
    let err = commit(&second.store, state_and_sql(3, 2))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        "io",
        "a change number logged twice fails its batch: {err}"
    );
    assert_eq!(
        load_count(&second.store).await,
        Some(2),
        "and its state with it"
    );
    envoy.abandon();
}

/// Runs `sql` on the actor's database, without parameters (an empty CBOR array).
async fn run_sql(db: &Arc<dyn keel_core::ActorDb>, sql: &str) -> Result<Vec<u8>> {
    db.execute(sql.to_string(), vec![0x80]).await
}

/// One call of the actor that runs `statements` and commits their change with state `n`,
/// as keel-core's task does: prepare, commit, then finish by the commit's outcome.
async fn sql_call(
    storage: &EngineStorage,
    id: &Arc<str>,
    db: &Arc<dyn keel_core::ActorDb>,
    statements: &[&str],
    n: u64,
) -> Result<()> {
    db.enter();
    for statement in statements {
        run_sql(db, statement).await?;
    }
    let change = db.prepare().await?;
    let seq = change.as_ref().map(|change| change.seq);
    let result = seam_commit(
        storage,
        id,
        Writes {
            db: change,
            ..state(n)
        },
    )
    .await;
    if let Some(seq) = seq {
        db.finish(seq, result.is_ok());
    }
    db.settled().await;
    result
}

/// What a read-only call sees: `sql`'s result, its transaction dropped.
async fn read_sql(db: &Arc<dyn keel_core::ActorDb>, sql: &str) -> Result<Vec<u8>> {
    db.enter();
    let result = run_sql(db, sql).await;
    db.rollback().await;
    result
}

/// A `counter` actor started by a test engine, with engine storage whose SQL copies live in
/// `copies`.
struct DbActor {
    _engine: TestEngine,
    envoy: Engine,
    copies: tempfile::TempDir,
    storage: EngineStorage,
    id: Arc<str>,
    generation: u32,
}

impl DbActor {
    async fn start(pool: &str, key: &str) -> DbActor {
        let engine = TestEngine::start(pool).await;
        let (envoy, mut events) = keel_envoy::connect(engine.config(pool))
            .await
            .expect("connect");
        engine.create_actor("counter", key, pool, b"null").await;
        let started = accept_start(&envoy, &mut events).await;
        let copies = tempfile::tempdir().expect("tempdir");
        let storage = EngineStorage::with_db_dir(copies.path().to_path_buf());
        let record = ActorRecord {
            id: started.actor_id.clone(),
            name: "counter".into(),
            key: key.into(),
        };
        let id: Arc<str> = started.actor_id.as_str().into();
        storage.insert(started.store, record, 0, started.snapshot);
        assert!(storage.load(&id).await.expect("load").is_some());
        DbActor {
            _engine: engine,
            envoy,
            copies,
            storage,
            id,
            generation: started.generation,
        }
    }
}

/// The migration every db test starts with: one table `t (x)`.
async fn create_table(db: &Arc<dyn keel_core::ActorDb>) {
    db.migration(keel_core::MigrationStep::Begin)
        .await
        .expect("begin");
    run_sql(db, "CREATE TABLE IF NOT EXISTS t (x INTEGER NOT NULL)")
        .await
        .expect("create");
    db.migration(keel_core::MigrationStep::Commit)
        .await
        .expect("the migration commits (and its image is written)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_s_sql_database_is_rebuilt_from_the_engine_and_deleted_with_the_actor() {
    let DbActor {
        _engine,
        envoy,
        copies,
        storage,
        id,
        generation: _,
    } = DbActor::start("keel-db-delete", "db-delete").await;
    let config = keel_core::DbConfig::default();
    let db = storage.open_db(id.clone(), config).await.expect("open");
    create_table(&db).await;
    for n in 1..=3 {
        sql_call(
            &storage,
            &id,
            &db,
            &[&format!("INSERT INTO t (x) VALUES ({n})") as &str],
            n,
        )
        .await
        .expect("a call's SQL commits");
    }
    let query = "SELECT count(*) AS n, sum(x) AS s FROM t";
    let written = read_sql(&db, query).await.expect("read");
    db.close().await;
    assert_eq!(
        std::fs::read_dir(copies.path()).expect("dir").count(),
        0,
        "closing removes the local copy"
    );

    // A new opening has no local file: it is rebuilt from the image and the log.
    let db = storage.open_db(id.clone(), config).await.expect("reopen");
    assert_eq!(read_sql(&db, query).await.expect("read"), written);
    db.close().await;

    storage.delete(id.clone()).await.expect("delete");
    let db = storage
        .open_db(id.clone(), config)
        .await
        .expect("open after the delete");
    let err = read_sql(&db, query).await.unwrap_err();
    assert_eq!(err.group(), "db", "{err}");
    assert!(err.to_string().contains("no such table"), "{err}");
    db.close().await;
    envoy.abandon();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_awake_actor_s_sql_log_is_folded_into_an_image_and_stays_bounded() {
    let DbActor {
        _engine,
        envoy,
        copies: _copies,
        storage,
        id,
        generation,
    } = DbActor::start("keel-db-awake", "db-awake").await;
    // A second store of the same activation, to read what the engine holds.
    let identity = ActorIdentity {
        name: "counter".into(),
        key: "db-awake".into(),
        created_at_ms: 0,
        input: None,
    };
    let (reader, _) = envoy
        .open_actor(&id, generation, &identity, Encoding::Json)
        .await
        .expect("a reader");

    let config = keel_core::DbConfig::default();
    let db = storage.open_db(id.clone(), config).await.expect("open");
    create_table(&db).await;
    // More calls than a log may hold past its image (256 changes), all in one activation.
    let calls = 400;
    let mut longest = 0;
    for n in 1..=calls {
        sql_call(
            &storage,
            &id,
            &db,
            &[&format!("INSERT INTO t (x) VALUES ({n})") as &str],
            n,
        )
        .await
        .expect("a call's SQL commits");
        if n % 50 == 0 {
            longest = longest.max(reader.sql_log_len().await.expect("log length"));
        }
    }
    let query = "SELECT count(*) AS n, sum(x) AS s FROM t";
    let written = read_sql(&db, query).await.expect("read");
    // Closing waits for an image being written.
    db.close().await;
    let left = reader.sql_log_len().await.expect("log length");
    longest = longest.max(left);
    assert!(
        left < 256 && longest <= 300,
        "the log holds {left} changes after {calls} calls (at most {longest} on the way): \
         it is folded into images while the actor is awake"
    );

    // A new opening rebuilds every row from the image and what is left of the log.
    let db = storage.open_db(id.clone(), config).await.expect("reopen");
    assert_eq!(read_sql(&db, query).await.expect("read"), written);
    db.close().await;
    eprintln!("measured: SQL log after {calls} calls awake: {left} changes (at most {longest})");
    envoy.abandon();
}

fn stored_conn(id: &str, state: Option<&[u8]>) -> StoredConn {
    StoredConn {
        id: id.into(),
        token: format!("token{id}"),
        encoding: Encoding::Json,
        params: br#"{"name":"ada"}"#.to_vec(),
        state: state.map(<[u8]>::to_vec),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_records_commit_with_their_call_a_refused_batch_lands_none_and_the_next_generation_loads_them(
) {
    let pool = "keel-conns";
    let engine = TestEngine::start(pool).await;
    let (envoy, mut events) = keel_envoy::connect(engine.config(pool))
        .await
        .expect("connect");
    let actor_id = engine.create_actor("room", "conns", pool, b"null").await;
    let first = accept_start(&envoy, &mut events).await;
    assert!(first.snapshot.conns.is_empty());

    // Admitted with the state its connect gave it, in the same batch as the call's state.
    commit(
        &first.store,
        Writes {
            state: Some(b"1".to_vec()),
            conns: vec![
                ConnWrite::Open(stored_conn("c1", Some(br#"{"n":0}"#))),
                ConnWrite::Open(stored_conn("c2", None)),
            ],
            ..Writes::default()
        },
    )
    .await
    .expect("admit two connections");
    // A later call changes one connection's state and closes the other, in one commit.
    commit(
        &first.store,
        Writes {
            conns: vec![
                ConnWrite::State {
                    id: "c1".into(),
                    state: br#"{"n":1}"#.to_vec(),
                },
                ConnWrite::Close { id: "c2".into() },
            ],
            ..Writes::default()
        },
    )
    .await
    .expect("change and close");
    let loaded = first.store.load().await.expect("load").expect("exists");
    assert_eq!(loaded.conns, [stored_conn("c1", Some(br#"{"n":1}"#))]);
    assert_eq!(
        loaded.core().conns,
        loaded.conns,
        "keel-core's snapshot carries them"
    );

    let generation = first.generation;
    let stale = first.store.renewed(&loaded);
    sleep_and_stop(&envoy, &mut events, first).await;
    let gateway = wake_through_gateway(&engine, &actor_id);
    let second = accept_start(&envoy, &mut events).await;
    assert_eq!(second.generation, generation + 1);
    assert_eq!(
        second.snapshot.conns,
        [stored_conn("c1", Some(br#"{"n":1}"#))],
        "the next generation loads the records"
    );
    let _ = gateway.await;

    // The old generation's change of a connection's state is fenced off: nothing of it lands.
    let err = commit(
        &stale,
        Writes {
            state: Some(b"999".to_vec()),
            conns: vec![ConnWrite::State {
                id: "c1".into(),
                state: br#"{"n":999}"#.to_vec(),
            }],
            ..Writes::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), "stopped", "{err}");
    let now = second.store.load().await.expect("load").expect("exists");
    assert_eq!(now.conns, [stored_conn("c1", Some(br#"{"n":1}"#))]);

    // A delete takes the records with the actor.
    let (tx, rx) = oneshot::channel();
    second.store.delete(Box::new(move |result| {
        let _ = tx.send(result); // Awaited below.
    }));
    rx.await.expect("released").expect("deleted");
    let reloaded = second.store.load().await.expect("load");
    assert!(reloaded.is_none(), "the actor row is gone");
    envoy.abandon();
}
