//! The registry state machine and the drain, over a real listener and a real SQLite file.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use common::{committed_count, config, CounterHost};
use keel_core::{ActorType, Registry, RuntimeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn registry(host: Arc<CounterHost>) -> Arc<Registry> {
    let registry = Registry::new(host);
    registry
        .register(ActorType::new("counter", common::ACTIONS.iter().copied()))
        .unwrap();
    Arc::new(registry)
}

/// Sends one HTTP/1.1 request over a fresh connection and returns (status, body).
async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// Starts serving in the background and returns the bound address.
async fn serve(
    registry: &Arc<Registry>,
    config: RuntimeConfig,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<keel_core::Result<()>>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let serving = {
        let registry = registry.clone();
        tokio::spawn(async move {
            registry
                .serve(config, move |addr| {
                    tx.send(addr).unwrap();
                })
                .await
        })
    };
    (rx.await.unwrap(), serving)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_http_and_shutdown_drains() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(CounterHost::new());
    let (addr, serving) = serve(&registry, config(dir.path())).await;
    assert_eq!(registry.state_name(), "running_serve");

    let (status, body) = post(
        addr,
        "/v1/actors/counter/actions/increment",
        r#"{"key":["h"],"args":[4]}"#,
    )
    .await;
    assert_eq!((status, body.as_str()), (200, r#"{"output":4}"#));

    // Every cell of the table that `serve` and `register` have in `Running(Serve)`.
    let err = registry
        .serve(config(dir.path()), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), "already_running");
    let err = registry
        .register(ActorType::new("late", ["x"]))
        .unwrap_err();
    assert_eq!(err.code(), "not_idle");
    let request = axum::http::Request::post("/health")
        .body(Body::empty())
        .unwrap();
    let err = registry
        .handle(&config(dir.path()), request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "wrong_mode");

    registry.shutdown().await;
    assert_eq!(registry.state_name(), "shutting_down");
    serving.await.unwrap().unwrap();
    let err = registry
        .serve(config(dir.path()), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), "shut_down");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
    // The data directory is released: a new registry can open it at once.
    let again = registry_with(dir.path()).await;
    again.shutdown().await;
}

async fn registry_with(dir: &std::path::Path) -> Arc<Registry> {
    let registry = registry(CounterHost::new());
    let request = axum::http::Request::post("/v1/actors/counter/actions/get")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"key":["h"]}"#))
        .unwrap();
    let response = registry.handle(&config(dir), request).await.unwrap();
    assert_eq!(response.status(), 200);
    registry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_actions_and_persists_them() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let registry = registry(host.clone());
    let (addr, serving) = serve(&registry, config(dir.path())).await;
    let calls: Vec<_> = ["s1", "s2", "s3"]
        .into_iter()
        .map(|key| {
            tokio::spawn(async move {
                post(
                    addr,
                    "/v1/actors/counter/actions/slow",
                    &format!(r#"{{"key":["{key}"],"args":[300]}}"#),
                )
                .await
            })
        })
        .collect();
    // The drain must find all three in flight.
    common::eventually("the three slow calls run", || host.runs("slow") == 3).await;
    registry.shutdown().await;
    for call in calls {
        assert_eq!(call.await.unwrap(), (200, r#"{"output":1}"#.to_string()));
    }
    serving.await.unwrap().unwrap();
    for key in ["s1", "s2", "s3"] {
        assert_eq!(committed_count(dir.path(), key), Some(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_cannot_finish_is_forced_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let registry = registry(host.clone());
    let mut config = config(dir.path());
    config.drain_timeout = Duration::from_millis(300);
    let (addr, serving) = serve(&registry, config).await;
    let acknowledged = post(
        addr,
        "/v1/actors/counter/actions/increment",
        r#"{"key":["f"]}"#,
    )
    .await;
    assert_eq!(acknowledged.0, 200);
    let blocked = tokio::spawn(async move {
        post(addr, "/v1/actors/counter/actions/block", r#"{"key":["f"]}"#).await
    });
    common::eventually("the blocked call runs", || host.runs("block") == 1).await;
    let started = std::time::Instant::now();
    registry.shutdown().await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "drain took {took:?}"
    );
    serving.await.unwrap().unwrap();
    // The blocked request was failed with `registry.shut_down`, and the acknowledged increment
    // is on disk.
    let (status, body) = blocked.await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains(r#""code":"shut_down""#), "{body}");
    assert_eq!(committed_count(dir.path(), "f"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_serverless_requests_build_once() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(CounterHost::new());
    let config = config(dir.path());
    let requests = (0..20).map(|i| {
        let registry = registry.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let request = axum::http::Request::post("/v1/actors/counter/actions/increment")
                .header("content-type", "application/json")
                .body(Body::from(format!(r#"{{"key":["k{i}"]}}"#)))
                .unwrap();
            registry.handle(&config, request).await.unwrap().status()
        })
    });
    for status in futures::future::join_all(requests).await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(registry.build_count(), 1);
    assert_eq!(registry.state_name(), "running_serverless");
    let err = registry.serve(config.clone(), |_| {}).await.unwrap_err();
    assert_eq!(err.code(), "wrong_mode");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_returns_to_idle_and_a_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let holder = registry(CounterHost::new());
    let held = registry_with(dir.path()).await;
    let registry = holder;
    let config = config(dir.path());
    let request = || {
        axum::http::Request::get("/health")
            .body(Body::empty())
            .unwrap()
    };
    let err = registry.handle(&config, request()).await.unwrap_err();
    assert_eq!((err.group(), err.code()), ("storage", "locked"));
    assert_eq!(registry.state_name(), "idle");
    held.shutdown().await;
    assert_eq!(
        registry.handle(&config, request()).await.unwrap().status(),
        200
    );
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stopped_latch_holds_for_early_and_late_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(CounterHost::new());
    let (_addr, serving) = serve(&registry, config(dir.path())).await;
    let early = {
        let registry = registry.clone();
        tokio::spawn(async move { registry.wait_stopped().await })
    };
    let (a, b) = tokio::join!(registry.shutdown(), registry.shutdown());
    let _ = (a, b);
    early.await.unwrap();
    serving.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Long after the stop, with nobody having waited in between.
    tokio::time::timeout(Duration::from_secs(1), registry.wait_stopped())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), registry.shutdown())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_idle_is_immediate_and_final() {
    let registry = registry(CounterHost::new());
    registry.shutdown().await;
    let err = registry.register(ActorType::new("x", ["y"])).unwrap_err();
    assert_eq!(err.code(), "not_idle");
    let request = axum::http::Request::post("/health")
        .body(Body::empty())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = registry
        .handle(&config(dir.path()), request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "shut_down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_structured() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.limits.max_body_bytes = 1024;
    let registry = registry(CounterHost::new());
    let (addr, serving) = serve(&registry, config).await;
    let cases = [
        (
            "/v1/actors/counter/actions/increment",
            "{not json",
            400,
            "malformed",
        ),
        (
            "/v1/actors/counter/actions/increment",
            r#"{"key":["a"],"args":5}"#,
            400,
            "malformed",
        ),
        (
            "/v1/actors/counter/actions/increment",
            r#"{"args":[]}"#,
            400,
            "malformed",
        ),
        (
            "/v1/actors/ghost/actions/increment",
            r#"{"key":[]}"#,
            404,
            "type_not_found",
        ),
        (
            "/v1/actors/counter/actions/ghost",
            r#"{"key":[]}"#,
            404,
            "action_not_found",
        ),
        (
            "/v1/actors/counter/actions/fail",
            r#"{"key":[]}"#,
            400,
            "nope",
        ),
        ("/nowhere", "{}", 404, "route_not_found"),
    ];
    for (path, body, status, code) in cases {
        let (got_status, got_body) = post(addr, path, body).await;
        let json: serde_json::Value = serde_json::from_str(&got_body).unwrap();
        assert_eq!(
            (got_status, json["code"].as_str().unwrap()),
            (status, code),
            "{path} {body}"
        );
        assert!(json["group"].is_string() && json["message"].is_string());
    }
    let big = format!(r#"{{"key":["a"],"args":["{}"]}}"#, "x".repeat(2048));
    let (status, body) = post(addr, "/v1/actors/counter/actions/increment", &big).await;
    assert_eq!(status, 413);
    assert!(body.contains("body_too_large"));
    registry.shutdown().await;
    serving.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_never_misses_the_builder_settling() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.durability = keel_core::Durability::Relaxed;
    for iteration in 0..1000 {
        let registry = registry(CounterHost::new());
        let request = || {
            axum::http::Request::get("/health")
                .body(Body::empty())
                .unwrap()
        };
        // Two first requests race: one builds, the other parks in `BuildingServerless` (or
        // finds the runtime already built). Neither may hang.
        let first_request = || {
            let registry = registry.clone();
            let config = config.clone();
            tokio::spawn(async move {
                registry
                    .handle(&config, request())
                    .await
                    .map(|r| r.status())
            })
        };
        let (a, b) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(first_request(), first_request())
        })
        .await
        .unwrap_or_else(|_| panic!("a request hung in iteration {iteration}"));
        assert_eq!(a.unwrap().unwrap(), 200);
        assert_eq!(b.unwrap().unwrap(), 200);
        assert_eq!(registry.build_count(), 1);
        registry.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_slow_build_drains_what_the_builder_built() {
    let dir = tempfile::tempdir().unwrap();
    // Another SQLite user holds the database file exclusively, so the build waits on it. It
    // rolls back, so what keel then opens is an empty file, not another program's database.
    let blocker = rusqlite::Connection::open(dir.path().join(keel_core::store::DB_FILE)).unwrap();
    blocker
        .execute_batch("BEGIN EXCLUSIVE; CREATE TABLE other (x);")
        .unwrap();
    let registry = registry(CounterHost::new());
    let config = config(dir.path());
    let requests: Vec<_> = (0..3)
        .map(|_| {
            let registry = registry.clone();
            let config = config.clone();
            tokio::spawn(async move {
                let request = axum::http::Request::get("/health")
                    .body(Body::empty())
                    .unwrap();
                registry.handle(&config, request).await.map(|r| r.status())
            })
        })
        .collect();
    common::eventually("the first request builds", || {
        registry.state_name() == "building_serverless"
    })
    .await;
    // The table's cells for `BuildingServerless`.
    let err = registry.serve(config.clone(), |_| {}).await.unwrap_err();
    assert_eq!(err.code(), "wrong_mode");
    let err = registry
        .register(ActorType::new("late", ["x"]))
        .unwrap_err();
    assert_eq!(err.code(), "not_idle");
    let shutdown = tokio::spawn({
        let registry = registry.clone();
        async move { registry.shutdown().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!shutdown.is_finished(), "shutdown waits for the builder");
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap()
        .unwrap();
    for request in requests {
        let err = request.await.unwrap().unwrap_err();
        assert_eq!((err.group(), err.code()), ("registry", "shut_down"));
    }
    assert_eq!(registry.state_name(), "shutting_down");
    assert_eq!(registry.build_count(), 1);
    // Nothing was left running: the data directory is free again.
    drop(keel_core::store::Store::open(dir.path(), keel_core::Durability::Full).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_opens_storage_without_holding_the_state_lock() {
    let dir = tempfile::tempdir().unwrap();
    // Another SQLite user holds the database file exclusively, so opening storage waits on
    // SQLite's busy timeout. It rolls back, so what keel then opens is an empty file.
    let blocker = rusqlite::Connection::open(dir.path().join(keel_core::store::DB_FILE)).unwrap();
    blocker
        .execute_batch("BEGIN EXCLUSIVE; CREATE TABLE other (x);")
        .unwrap();
    let registry = registry(CounterHost::new());
    let serving = tokio::spawn({
        let registry = registry.clone();
        let config = config(dir.path());
        async move { registry.serve(config, |_| {}).await }
    });
    // Every look at the state takes the state lock: if `serve` held it while opening, none
    // of these would answer before the open gave up.
    common::eventually("serve is opening storage", || {
        registry.state_name() == "starting_serve"
    })
    .await;
    let err = registry
        .serve(config(dir.path()), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), "already_running");
    let err = registry
        .register(ActorType::new("late", ["x"]))
        .unwrap_err();
    assert_eq!(err.code(), "not_idle");
    let request = axum::http::Request::get("/health")
        .body(Body::empty())
        .unwrap();
    let err = registry
        .handle(&config(dir.path()), request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "wrong_mode");
    // A shutdown meanwhile waits for the starter, which drains what it opened.
    let shutdown = tokio::spawn({
        let registry = registry.clone();
        async move { registry.shutdown().await }
    });
    common::eventually("the shutdown has begun", || {
        registry.state_name() == "shutting_down"
    })
    .await;
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap()
        .unwrap();
    let err = serving.await.unwrap().unwrap_err();
    assert_eq!((err.group(), err.code()), ("registry", "shut_down"));
    // Nothing was left running: the data directory is free again.
    drop(keel_core::store::Store::open(dir.path(), keel_core::Durability::Full).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_reaches_keel_during_the_drain_is_answered_503_shutting_down() {
    // docs/protocol.md, "Shutdown", step 1: once the drain has begun, a request that reaches
    // keel is answered `503 registry.shutting_down`, while the call in progress finishes.
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let registry = registry(host.clone());
    let (addr, serving) = serve(&registry, config(dir.path())).await;
    // A call in progress holds the drain open until the gate opens.
    let blocked = tokio::spawn(async move {
        post(addr, "/v1/actors/counter/actions/block", r#"{"key":["d"]}"#).await
    });
    common::eventually("the blocked call runs", || host.runs("block") == 1).await;
    // A request whose head is in and whose body is still on its way: it reaches keel's
    // routes only once the body is complete, after the drain has begun.
    let body = r#"{"key":["late"],"args":[1]}"#;
    let (first, rest) = body.split_at(10);
    let mut late = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/actors/counter/actions/increment HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{first}",
        body.len()
    );
    late.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let shutdown = {
        let registry = registry.clone();
        tokio::spawn(async move { registry.shutdown().await })
    };
    common::eventually("the drain begins", || {
        registry.state_name() == "shutting_down"
    })
    .await;
    late.write_all(rest.as_bytes()).await.unwrap();
    let mut response = vec![0; 4096];
    let read = late.read(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response[..read]).to_string();
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    let body: serde_json::Value =
        serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        (&body["group"], &body["code"]),
        (
            &serde_json::json!("registry"),
            &serde_json::json!("shutting_down")
        ),
        "{response}"
    );
    // The call in progress finishes normally, after its commit.
    host.gate.add_permits(1);
    assert_eq!(blocked.await.unwrap().0, 200);
    shutdown.await.unwrap();
    serving.await.unwrap().unwrap();
    assert_eq!(
        committed_count(dir.path(), "late"),
        None,
        "the late request ran nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_answers_messages_queued_behind_a_running_call_after_their_commits() {
    // docs/protocol.md, "Shutdown", step 2: messages already in an actor's mailbox, and the
    // one running, finish and are answered normally, each after its commit.
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let registry = registry(host.clone());
    let (addr, serving) = serve(&registry, config(dir.path())).await;
    let running = tokio::spawn(async move {
        post(
            addr,
            "/v1/actors/counter/actions/slow",
            r#"{"key":["q"],"args":[400]}"#,
        )
        .await
    });
    common::eventually("the slow call runs", || host.runs("slow") == 1).await;
    let queued: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(async move {
                post(
                    addr,
                    "/v1/actors/counter/actions/increment",
                    r#"{"key":["q"],"args":[10]}"#,
                )
                .await
            })
        })
        .collect();
    // In the mailbox behind the slow call by then.
    tokio::time::sleep(Duration::from_millis(100)).await;
    registry.shutdown().await;
    assert_eq!(running.await.unwrap(), (200, r#"{"output":1}"#.to_string()));
    let mut outputs: Vec<String> = Vec::new();
    for call in queued {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200, "{body}");
        outputs.push(body);
    }
    outputs.sort();
    assert_eq!(
        outputs,
        [r#"{"output":11}"#, r#"{"output":21}"#, r#"{"output":31}"#]
    );
    serving.await.unwrap().unwrap();
    assert_eq!(committed_count(dir.path(), "q"), Some(31));
}
