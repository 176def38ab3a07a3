//! One connection's output is ordered: on the multi-threaded runtime, over a real loopback
//! socket, a call's events arrive before its reply, replies arrive in call order (error
//! replies that never reached the actor included), and a close that a call causes
//! (`c.sleep()`, `c.destroy()`, `conn.disconnect()`) arrives after that call's reply.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{eventually, CounterHost, ACTIONS};
use futures::{SinkExt, StreamExt};
use keel_core::{ActorType, ActorTypes, Hooks, Runtime};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn serve(dir: &std::path::Path) -> (Runtime, SocketAddr, Arc<CounterHost>) {
    let host = CounterHost::new();
    let runtime = common::open(dir, host.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.serve(listener);
    (runtime, addr, host)
}

/// Opens a connection to `counter` `key`, subscribed to `tick`, and waits for `ready`.
async fn connect(addr: SocketAddr, key: &str) -> Socket {
    let url = format!("ws://{addr}/v1/actors/counter/connect");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let init = json!({ "t": "init", "key": [key], "subs": ["tick"] });
    socket.send(Message::text(init.to_string())).await.unwrap();
    let ready = next(&mut socket).await;
    assert_eq!(ready, Frame::Ready, "the first frame is ready");
    socket
}

async fn send_call(socket: &mut Socket, id: u64, action: &str, args: Value) {
    let call = json!({ "t": "call", "id": id, "action": action, "args": args });
    socket.send(Message::text(call.to_string())).await.unwrap();
}

/// What the server sent, reduced to what the order checks need.
#[derive(Debug, PartialEq)]
enum Frame {
    Ready,
    Event(Value),
    Reply(u64),
    ErrorReply(u64, String),
    Close(u16, String),
}

async fn next(socket: &mut Socket) -> Frame {
    loop {
        let message = match socket.next().await {
            Some(message) => message.unwrap(),
            None => return Frame::Close(0, "dropped".into()),
        };
        match message {
            Message::Text(text) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                return match value["t"].as_str().unwrap() {
                    "ready" => Frame::Ready,
                    "event" => Frame::Event(value["data"].clone()),
                    "reply" if value.get("error").is_some() => Frame::ErrorReply(
                        value["id"].as_u64().unwrap(),
                        value["error"]["code"].as_str().unwrap().to_string(),
                    ),
                    "reply" => Frame::Reply(value["id"].as_u64().unwrap()),
                    other => panic!("unexpected frame {other}: {value}"),
                };
            }
            Message::Close(frame) => {
                let frame = frame.expect("a close frame with a code");
                return Frame::Close(frame.code.into(), frame.reason.to_string());
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_calls_events_arrive_before_its_reply() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, addr, _host) = serve(dir.path()).await;
    let mut socket = connect(addr, "one-by-one").await;
    for i in 1..=500u64 {
        send_call(&mut socket, i, "broadcast", json!([])).await;
        assert_eq!(next(&mut socket).await, Frame::Event(json!(i)), "call {i}");
        assert_eq!(next(&mut socket).await, Frame::Reply(i), "call {i}");
    }
    drop(socket);
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_calls_reply_in_call_order_with_their_events_first() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, addr, _host) = serve(dir.path()).await;
    let mut socket = connect(addr, "pipelined").await;
    // Every tenth call names an unknown action: its error reply is made before the call
    // reaches the actor, and still waits for the replies of the calls sent before it.
    let calls = 300u64;
    for id in 1..=calls {
        let action = if id % 10 == 0 { "nope" } else { "broadcast" };
        send_call(&mut socket, id, action, json!([])).await;
    }
    let mut expected = Vec::new();
    let mut count = 0;
    for id in 1..=calls {
        if id % 10 == 0 {
            expected.push(Frame::ErrorReply(id, "action_not_found".into()));
        } else {
            count += 1;
            expected.push(Frame::Event(json!(count)));
            expected.push(Frame::Reply(id));
        }
    }
    let mut received = Vec::new();
    while received.len() < expected.len() {
        received.push(next(&mut socket).await);
    }
    assert_eq!(received, expected);
    drop(socket);
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_close_a_call_causes_comes_after_that_calls_reply() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, addr, _host) = serve(dir.path()).await;
    let cases = [
        ("sleep", 1001, "actor stopping"),
        ("destroy", 1000, "actor destroyed"),
        ("kick", 1000, "kicked"),
    ];
    for i in 0..60 {
        for (action, code, reason) in cases {
            let mut socket = connect(addr, &format!("{action}-{i}")).await;
            send_call(&mut socket, 1, "broadcast", json!([])).await;
            send_call(&mut socket, 2, action, json!([])).await;
            let frames = [
                next(&mut socket).await,
                next(&mut socket).await,
                next(&mut socket).await,
                next(&mut socket).await,
            ];
            assert_eq!(
                frames,
                [
                    Frame::Event(json!(1)),
                    Frame::Reply(1),
                    Frame::Reply(2),
                    Frame::Close(code, reason.to_string()),
                ],
                "{action} #{i}"
            );
        }
    }
    runtime.drain().await;
}

/// A counter type with the given connection hooks, served on a free port.
async fn serve_with_hooks(
    dir: &std::path::Path,
    hooks: Hooks,
) -> (Runtime, SocketAddr, Arc<CounterHost>) {
    let host = CounterHost::new();
    let mut types = ActorTypes::default();
    types
        .add(ActorType {
            hooks,
            ..ActorType::new("counter", ACTIONS.iter().copied())
        })
        .unwrap();
    let runtime = Runtime::open(
        common::config(dir),
        Arc::new(types),
        host.clone(),
        &CancellationToken::new(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.serve(listener);
    (runtime, addr, host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_type_without_connection_hooks_connects_without_a_host_call() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, addr, host) = serve_with_hooks(dir.path(), Hooks::NONE).await;
    let mut socket = connect(addr, "bare").await;
    send_call(&mut socket, 1, "broadcast", json!([])).await;
    assert_eq!(next(&mut socket).await, Frame::Event(json!(1)));
    assert_eq!(next(&mut socket).await, Frame::Reply(1));
    socket.close(None).await.unwrap();
    eventually("the close reaches the actor", || {
        host.conn_log.lock().len() == 2
    })
    .await;
    let log = host.conn_log.lock().clone();
    assert!(log[0].starts_with("connected:"), "{log:?}");
    assert!(log[1].starts_with("disconnected:"), "{log:?}");
    assert_eq!(
        log[0]["connected:".len()..],
        log[1]["disconnected:".len()..]
    );
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_type_with_only_on_disconnect_runs_only_that_hook() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Hooks {
        on_disconnect: true,
        ..Hooks::NONE
    };
    let (runtime, addr, host) = serve_with_hooks(dir.path(), hooks).await;
    let mut socket = connect(addr, "leaving").await;
    socket.close(None).await.unwrap();
    eventually("the close reaches the actor", || {
        host.conn_log.lock().len() == 2
    })
    .await;
    let log = host.conn_log.lock().clone();
    assert!(log[0].starts_with("connected:"), "{log:?}");
    assert!(log[1].starts_with("disconnect:"), "the hook runs: {log:?}");
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_type_with_connection_hooks_calls_the_host_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, addr, host) = serve_with_hooks(dir.path(), Hooks::ALL).await;
    let mut socket = connect(addr, "hooked").await;
    socket.close(None).await.unwrap();
    eventually("the close reaches the actor", || {
        host.conn_log.lock().len() == 2
    })
    .await;
    let log = host.conn_log.lock().clone();
    assert!(log[0].starts_with("connect:"), "{log:?}");
    assert!(log[1].starts_with("disconnect:"), "{log:?}");
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_socket_the_client_closes_is_let_go_at_once_so_the_drain_does_not_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, addr, _host) = serve(dir.path()).await;
    let mut socket = connect(addr, "leaving").await;
    send_call(&mut socket, 1, "broadcast", json!([])).await;
    assert_eq!(next(&mut socket).await, Frame::Event(json!(1)));
    assert_eq!(next(&mut socket).await, Frame::Reply(1));
    let bye = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 4000.into(),
        reason: "bye".into(),
    };
    socket.send(Message::Close(Some(bye))).await.unwrap();
    // A bound on a hang, not a measure of speed: unanswered, the socket's writer idled
    // (and held the socket open) until the drain was forced.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(Ok(message)) = socket.next().await {
            if message.is_close() {
                break;
            }
        }
    })
    .await;
    ended.expect("the server let go of the socket the client closed");
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_init_is_answered_with_an_error_then_closed_1008() {
    // docs/protocol.md, "Limits and close codes": 1008 `init was already sent`, after an
    // `error` message (`request.malformed`); the actor serves other connections on.
    let dir = tempfile::tempdir().unwrap();
    let (runtime, addr, _host) = serve(dir.path()).await;
    let mut socket = connect(addr, "twice").await;
    let init = json!({ "t": "init", "key": ["twice"] });
    socket.send(Message::text(init.to_string())).await.unwrap();
    let error = loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(text) => break serde_json::from_str::<Value>(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected the error message first, got {other:?}"),
        }
    };
    assert_eq!(error["t"], "error", "{error}");
    assert_eq!(
        (&error["error"]["group"], &error["error"]["code"]),
        (&json!("request"), &json!("malformed")),
        "{error}"
    );
    assert_eq!(
        next(&mut socket).await,
        Frame::Close(1008, "init was already sent".into())
    );
    let mut other = connect(addr, "twice").await;
    send_call(&mut other, 1, "increment", json!([])).await;
    assert_eq!(next(&mut other).await, Frame::Reply(1));
    drop(other);
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_socket_that_sends_no_init_is_closed_1008_after_ten_seconds() {
    // docs/protocol.md: no `init` within 10 seconds closes the socket, 1008 `no init message`.
    let dir = tempfile::tempdir().unwrap();
    let (runtime, addr, _host) = serve(dir.path()).await;
    let url = format!("ws://{addr}/v1/actors/counter/connect");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let opened = std::time::Instant::now();
    let close = tokio::time::timeout(std::time::Duration::from_secs(20), next(&mut socket))
        .await
        .expect("closed within 20 s");
    let waited = opened.elapsed();
    assert_eq!(close, Frame::Close(1008, "no init message".into()));
    assert!(
        waited >= std::time::Duration::from_millis(9_500),
        "closed after {waited:?}, before the 10 s allowed"
    );
    runtime.drain().await;
}
