//! Failed commits and injected faults: a commit SQLite refuses changes nothing (not the
//! database, not the actor's memory, not a destroy it asked for), the calls pipelined behind
//! it fail too, the instance's connections close retryably, the writer recovers once the
//! fault is gone, and a commit whose sync failed stays failed across a crash.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use common::{call, committed_count, counter, CounterHost};
use keel_core::faults::{Failpoint, Fault, FaultInjector, Faults};
use keel_core::{Runtime, RuntimeConfig};
use tokio_util::sync::CancellationToken;

/// Fails commits before their WAL write: every one while `failing` is set, and the next
/// `fail_next` ones.
#[derive(Default)]
struct Switch {
    failing: AtomicBool,
    fail_next: AtomicU32,
}

impl Faults for Switch {
    fn check(&self, point: Failpoint) -> Fault {
        if point != Failpoint::BeforeWalWrite {
            return Fault::Continue;
        }
        let next = self
            .fail_next
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if next || self.failing.load(Ordering::Acquire) {
            Fault::Fail
        } else {
            Fault::Continue
        }
    }
}

fn open_with(dir: &std::path::Path, host: Arc<CounterHost>, faults: Arc<dyn Faults>) -> Runtime {
    let config = RuntimeConfig {
        faults: Some(FaultInjector(faults)),
        ..common::config(dir)
    };
    Runtime::open(config, common::types(), host, &CancellationToken::new()).unwrap()
}

fn assert_storage_error(result: keel_core::Result<String>) {
    let err = result.expect_err("the commit was refused");
    assert_eq!((err.group(), err.code()), ("storage", "sqlite"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_changes_nothing_and_the_writer_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Switch::default());
    let runtime = open_with(dir.path(), CounterHost::new(), faults.clone());
    assert_eq!(
        call(&runtime, counter("c"), "increment", "[1]")
            .await
            .unwrap(),
        "1"
    );

    faults.failing.store(true, Ordering::Release);
    for _ in 0..3 {
        assert_storage_error(call(&runtime, counter("c"), "increment", "[1]").await);
    }
    assert_storage_error(call(&runtime, counter("c"), "kv_put", r#"["k","v"]"#).await);
    let at = runtime.now_ms() + 60_000;
    let schedule = format!(r#"["s1",{at},"increment","1"]"#);
    assert_storage_error(call(&runtime, counter("c"), "schedule", &schedule).await);
    // Reads still work while commits fail, and show the last committed state.
    assert_eq!(
        call(&runtime, counter("c"), "get", "[]").await.unwrap(),
        "1"
    );
    let info = runtime.resolve(counter("c")).await.unwrap();
    assert_eq!(
        runtime.kv_get(&info.id, vec![b"k".to_vec()]).await.unwrap(),
        vec![None]
    );
    assert!(runtime.schedules(&info.id).await.unwrap().is_empty());
    assert_eq!(runtime.pending_schedules(), 0);
    assert_eq!(committed_count(dir.path(), "c"), Some(1));

    // Once the fault is gone, the same runtime commits again.
    faults.failing.store(false, Ordering::Release);
    assert_eq!(
        call(&runtime, counter("c"), "increment", "[1]")
            .await
            .unwrap(),
        "2"
    );
    runtime.drain().await;

    // After a restart, exactly the acknowledged writes are there.
    assert_eq!(committed_count(dir.path(), "c"), Some(2));
    let runtime = open_with(dir.path(), CounterHost::new(), faults);
    assert_eq!(
        call(&runtime, counter("c"), "get", "[]").await.unwrap(),
        "2"
    );
    let info = runtime.resolve(counter("c")).await.unwrap();
    assert_eq!(
        runtime.kv_get(&info.id, vec![b"k".to_vec()]).await.unwrap(),
        vec![None]
    );
    runtime.drain().await;
}

/// Holds the next commit before its WAL write until the test lets it go, then fails it.
#[derive(Default)]
struct Hold {
    step: std::sync::Mutex<HoldStep>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum HoldStep {
    #[default]
    Idle,
    Armed,
    Holding,
    Released,
}

impl Hold {
    fn set(&self, step: HoldStep) {
        *self.step.lock().unwrap() = step;
        self.changed.notify_all();
    }

    fn is(&self, step: HoldStep) -> bool {
        *self.step.lock().unwrap() == step
    }
}

impl Faults for Hold {
    fn check(&self, point: Failpoint) -> Fault {
        let mut step = self.step.lock().unwrap();
        if point != Failpoint::BeforeWalWrite || *step != HoldStep::Armed {
            return Fault::Continue;
        }
        *step = HoldStep::Holding;
        self.changed.notify_all();
        let mut step = self
            .changed
            .wait_while(step, |step| *step != HoldStep::Released)
            .unwrap();
        *step = HoldStep::Idle;
        Fault::Fail
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_ran_on_top_of_a_failed_commit_fails_too() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(Hold::default());
    let host = CounterHost::new();
    let runtime = Arc::new(open_with(dir.path(), host.clone(), hold.clone()));
    assert_eq!(
        call(&runtime, counter("p"), "increment", "[1]")
            .await
            .unwrap(),
        "1"
    );

    // The next commit is held in the writer. The call behind it runs on the same instance,
    // on top of that change, before the commit fails.
    let busy = common::block_a_call(&runtime, &host, "neighbour").await;
    hold.set(HoldStep::Armed);
    let spawn_increment = || {
        let runtime = runtime.clone();
        tokio::spawn(async move { call(&runtime, counter("p"), "increment", "[1]").await })
    };
    let first = spawn_increment();
    common::eventually("the first commit is held", || hold.is(HoldStep::Holding)).await;
    let second = spawn_increment();
    common::eventually("the second call ran", || host.runs("increment") == 3).await;
    hold.set(HoldStep::Released);
    assert_storage_error(first.await.unwrap());
    assert_storage_error(second.await.unwrap());
    host.gate.add_permits(1);
    busy.await.unwrap().unwrap();

    assert_eq!(
        call(&runtime, counter("p"), "get", "[]").await.unwrap(),
        "1"
    );
    assert_eq!(
        call(&runtime, counter("p"), "increment", "[1]")
            .await
            .unwrap(),
        "2"
    );
    runtime.drain().await;
    assert_eq!(committed_count(dir.path(), "p"), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_that_ran_on_top_of_a_failed_commit_does_not_happen() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(Hold::default());
    let host = CounterHost::new();
    let runtime = Arc::new(open_with(dir.path(), host.clone(), hold.clone()));
    assert_eq!(
        call(&runtime, counter("d"), "increment", "[5]")
            .await
            .unwrap(),
        "5"
    );
    let busy = common::block_a_call(&runtime, &host, "neighbour").await;
    hold.set(HoldStep::Armed);
    let spawn_call = |action: &'static str| {
        let runtime = runtime.clone();
        tokio::spawn(async move { call(&runtime, counter("d"), action, "[1]").await })
    };
    let increment = spawn_call("increment");
    common::eventually("the increment's commit is held", || {
        hold.is(HoldStep::Holding)
    })
    .await;
    let destroy = spawn_call("destroy");
    common::eventually("the destroy ran", || {
        host.log.lock().iter().any(|line| line == "d:destroy:[1]")
    })
    .await;
    hold.set(HoldStep::Released);
    assert_storage_error(increment.await.unwrap());
    assert_storage_error(destroy.await.unwrap());
    host.gate.add_permits(1);
    busy.await.unwrap().unwrap();
    common::eventually("the instance is discarded", || {
        host.stop_log.lock().iter().any(|line| line == "d:reset")
    })
    .await;

    // The actor is still there, as last committed.
    assert_eq!(
        call(&runtime, counter("d"), "get", "[]").await.unwrap(),
        "5"
    );
    runtime.drain().await;
    assert_eq!(committed_count(dir.path(), "d"), Some(5));
    assert!(!host.stop_log.lock().iter().any(|line| line == "d:destroy"));
}

/// Fails the next sync of the WAL, or crashes the next commit before its WAL write.
#[derive(Default)]
struct SyncThenCrash {
    fail_sync: AtomicBool,
    crash: AtomicBool,
}

impl Faults for SyncThenCrash {
    fn check(&self, point: Failpoint) -> Fault {
        match point {
            Failpoint::AfterWriteBeforeSync if self.fail_sync.swap(false, Ordering::AcqRel) => {
                Fault::Fail
            }
            Failpoint::BeforeWalWrite if self.crash.swap(false, Ordering::AcqRel) => Fault::Crash,
            _ => Fault::Continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_sync_failed_stays_failed_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(SyncThenCrash::default());
    let config = RuntimeConfig {
        durability: keel_core::Durability::Full,
        faults: Some(FaultInjector(faults.clone())),
        ..common::config(dir.path())
    };
    let runtime = Runtime::open(
        config,
        common::types(),
        CounterHost::new(),
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(
        call(&runtime, counter("s"), "increment", "[1]")
            .await
            .unwrap(),
        "1"
    );
    // The WAL frames of this commit are written, then their sync fails: the call fails.
    faults.fail_sync.store(true, Ordering::Release);
    assert_storage_error(call(&runtime, counter("s"), "increment", "[1]").await);
    // The process dies at the next commit, before it writes anything.
    faults.crash.store(true, Ordering::Release);
    call(&runtime, counter("s"), "increment", "[1]")
        .await
        .expect_err("a crashed writer acknowledges nothing");
    runtime.drain().await;
    drop(runtime);

    // Recovery must not bring the failed commit back.
    let runtime = common::open(dir.path(), CounterHost::new());
    assert_eq!(
        call(&runtime, counter("s"), "get", "[]").await.unwrap(),
        "1"
    );
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_closes_the_connections_of_the_discarded_instance() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Switch::default());
    let runtime = open_with(dir.path(), CounterHost::new(), faults.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}/v1/actors/counter/connect",
        listener.local_addr().unwrap()
    );
    runtime.serve(listener);
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let init = serde_json::json!({ "t": "init", "key": ["w"] });
    socket.send(Message::text(init.to_string())).await.unwrap();
    // The next frame that is not a ping or a pong.
    async fn next_text(
        socket: &mut tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    ) -> Message {
        loop {
            match socket.next().await.expect("the socket is open").unwrap() {
                Message::Ping(_) | Message::Pong(_) => continue,
                message => return message,
            }
        }
    }
    let frame = |message: Message| -> serde_json::Value {
        serde_json::from_str(message.to_text().unwrap()).unwrap()
    };
    assert_eq!(frame(next_text(&mut socket).await)["t"], "ready");
    let increment = |id: u64| {
        serde_json::json!({ "t": "call", "id": id, "action": "increment", "args": [1] }).to_string()
    };

    socket.send(Message::text(increment(1))).await.unwrap();
    let reply = frame(next_text(&mut socket).await);
    assert_eq!(
        (reply["id"].as_u64(), reply["output"].as_i64()),
        (Some(1), Some(1))
    );

    faults.failing.store(true, Ordering::Release);
    socket.send(Message::text(increment(2))).await.unwrap();
    let reply = frame(next_text(&mut socket).await);
    assert_eq!(reply["id"].as_u64(), Some(2));
    assert_eq!(reply["error"]["code"], "sqlite");
    faults.failing.store(false, Ordering::Release);

    // The next message replaces the instance; its connection goes with it, retryably.
    assert_eq!(
        call(&runtime, counter("w"), "get", "[]").await.unwrap(),
        "1",
        "the refused increment is gone from memory"
    );
    match next_text(&mut socket).await {
        Message::Close(Some(close)) => {
            assert_eq!(u16::from(close.code), 1011);
            assert_eq!(close.reason.as_str(), "actor reset after a failed commit");
        }
        other => panic!("expected a close, got {other:?}"),
    }
    runtime.drain().await;
}
