//! The HTTP surface over a real listener: raw paths as sent, the content types of action
//! bodies, origins and CORS, and stalled bodies.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{committed_count, CounterHost};
use keel_core::{
    ActionCall, ActionDone, ActorInfo, AllowedOrigins, Effects, Encoding, Host, RawRequest,
    RawResponse, RawSocketEvent, Result, Runtime, RuntimeConfig, StartRequest, StopReason, Target,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The counter host, plus raw handlers that report what they were given: `onRequest` answers
/// `key path` and raw WebSockets send the path they opened with on a channel.
struct RawHost {
    counter: Arc<CounterHost>,
    opened: mpsc::UnboundedSender<String>,
}

#[async_trait]
impl Host for RawHost {
    async fn start(&self, actor: &Arc<ActorInfo>, request: StartRequest) -> Result<Effects> {
        self.counter.start(actor, request).await
    }

    async fn action(&self, actor: &Arc<ActorInfo>, call: ActionCall) -> Result<ActionDone> {
        self.counter.action(actor, call).await
    }

    async fn stop(&self, actor: &Arc<ActorInfo>, reason: StopReason) -> Result<Effects> {
        self.counter.stop(actor, reason).await
    }

    async fn request(
        &self,
        actor: &Arc<ActorInfo>,
        request: RawRequest,
    ) -> Result<(RawResponse, Effects)> {
        let body = format!("{} {}", actor.key_string, request.path);
        let response = RawResponse {
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: body.into_bytes(),
        };
        Ok((response, Effects::default()))
    }

    async fn raw_socket(&self, _actor: &Arc<ActorInfo>, event: RawSocketEvent) -> Result<Effects> {
        if let RawSocketEvent::Open { path, .. } = event {
            // The test may have stopped listening.
            let _ = self.opened.send(path);
        }
        Ok(Effects::default())
    }

    fn state_encoding(&self) -> Encoding {
        Encoding::Json
    }
}

struct Served {
    runtime: Runtime,
    addr: SocketAddr,
    opened: mpsc::UnboundedReceiver<String>,
}

async fn serve(dir: &std::path::Path, tune: impl FnOnce(&mut RuntimeConfig)) -> Served {
    let mut config = common::config(dir);
    tune(&mut config);
    let (opened_tx, opened) = mpsc::unbounded_channel();
    let host = Arc::new(RawHost {
        counter: CounterHost::new(),
        opened: opened_tx,
    });
    let runtime = Runtime::open(config, common::types(), host, &CancellationToken::new()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.serve(listener);
    Served {
        runtime,
        addr,
        opened,
    }
}

/// A response as read off the socket: status, lowercase header names, body.
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }

    fn code(&self) -> String {
        let json = self.json();
        format!(
            "{}.{}",
            json["group"].as_str().unwrap(),
            json["code"].as_str().unwrap()
        )
    }
}

/// Reads one response head and its `content-length` body (none for a 101 or a 204).
async fn read_reply(stream: &mut TcpStream) -> std::io::Result<Reply> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        raw.push(byte[0]);
    }
    let head = String::from_utf8(raw).unwrap();
    let mut lines = head.trim_end().split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: HashMap<String, String> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    let len = headers
        .get("content-length")
        .map_or(0, |len| len.parse().unwrap());
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    })
}

/// Sends `method path` with `headers` and `body` on a fresh connection and reads the reply.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(name, _)| *name == "connection") {
        head.push_str("connection: close\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.push_str(body);
    stream.write_all(head.as_bytes()).await.unwrap();
    read_reply(&mut stream).await.unwrap()
}

const JSON: (&str, &str) = ("content-type", "application/json");

/// A WebSocket upgrade request; `None` for a 101, else the refusal.
async fn upgrade(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Option<Reply> {
    let reply = exchange(
        addr,
        "GET",
        path,
        &[
            [
                ("upgrade", "websocket"),
                ("connection", "upgrade"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("sec-websocket-version", "13"),
            ]
            .as_slice(),
            headers,
        ]
        .concat(),
        "",
    )
    .await;
    (reply.status != 101).then_some(reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_routes_see_the_path_and_query_as_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve(dir.path(), |_| {}).await;
    let cases = [
        ("k/public%2F..%2Fadmin", "k /public%2F..%2Fadmin"),
        ("k/a%2Fb", "k /a%2Fb"),
        ("k/x%3Fy?z=%3F", "k /x%3Fy?z=%3F"),
        ("k/files/x?v=1&w=a%20b", "k /files/x?v=1&w=a%20b"),
        ("k/a/../b/./c", "k /a/../b/./c"),
        ("k", "k /"),
        ("k?q=1", "k /?q=1"),
        ("a%2Fb/c%2Fd", "a/b /c%2Fd"),
    ];
    for (tail, seen) in cases {
        let path = format!("/v1/actors/counter/raw/{tail}");
        let reply = exchange(served.addr, "PUT", &path, &[], "payload").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, seen), "{path}");
        // Serverless requests go through the same route.
        let (status, _, body) = common::handle(&served.runtime, "GET", &path, &[]).await;
        assert_eq!((status, body.as_str()), (200, seen), "serverless {path}");
    }
    for (tail, seen) in [
        ("public%2F..%2Fadmin", "/public%2F..%2Fadmin"),
        ("x%3Fy?z=1", "/x%3Fy?z=1"),
    ] {
        let path = format!("/v1/actors/counter/raw/k/{tail}");
        assert!(
            upgrade(served.addr, &path, &[]).await.is_none(),
            "{path} upgrades"
        );
        assert_eq!(served.opened.recv().await.unwrap(), seen);
    }
    served.runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_bodies_must_be_json_or_cbor() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), |_| {}).await;
    let addr = served.addr;
    let increment = "/v1/actors/counter/actions/increment";
    let body = r#"{"key":["t"],"args":[1]}"#;
    for refused in [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
        "",
    ] {
        let reply = exchange(addr, "POST", increment, &[("content-type", refused)], body).await;
        assert_eq!(
            (reply.status, reply.code()),
            (415, "request.unsupported_media_type".to_string()),
            "{refused:?}"
        );
    }
    let reply = exchange(addr, "POST", increment, &[], body).await;
    assert_eq!(
        (reply.status, reply.code()),
        (415, "request.unsupported_media_type".to_string())
    );
    assert!(reply.json()["message"]
        .as_str()
        .unwrap()
        .contains("application/json"));
    for route in ["/v1/actors/counter/resolve", "/v1/ids/0123/actions/get"] {
        let reply = exchange(addr, "POST", route, &[("content-type", "text/plain")], body).await;
        assert_eq!(reply.status, 415, "{route}");
    }
    assert_eq!(
        committed_count(dir.path(), "t"),
        None,
        "nothing ran or was created"
    );
    for accepted in [
        "application/json",
        "Application/JSON; charset=utf-8",
        " application/json ",
    ] {
        let reply = exchange(addr, "POST", increment, &[("content-type", accepted)], body).await;
        assert_eq!(reply.status, 200, "{accepted:?}");
    }
    // {"key":["t"]} in CBOR.
    let mut cbor = vec![0xa1, 0x63, b'k', b'e', b'y', 0x81, 0x61, b't'];
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/actors/counter/resolve HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\
         content-type: application/cbor\r\ncontent-length: {}\r\n\r\n",
        cbor.len()
    );
    let mut request = head.into_bytes();
    request.append(&mut cbor);
    stream.write_all(&request).await.unwrap();
    let reply = read_reply(&mut stream).await.unwrap();
    assert_eq!(
        (reply.status, reply.json()["key"].clone()),
        (200, serde_json::json!(["t"]))
    );
    served.runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_from_other_origins_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), |config| {
        config.allowed_origins = AllowedOrigins::parse(["http://app.example"]).unwrap();
    })
    .await;
    let addr = served.addr;
    let own = format!("http://{addr}");
    for path in ["/v1/actors/counter/connect", "/v1/actors/counter/raw/ws"] {
        let refused = upgrade(addr, path, &[("origin", "http://evil.example")])
            .await
            .expect("refused");
        assert_eq!(
            (refused.status, refused.code()),
            (403, "auth.origin_not_allowed".to_string()),
            "{path}"
        );
        assert!(
            !refused.headers.contains_key("access-control-allow-origin"),
            "no CORS headers for an unlisted origin"
        );
        assert!(
            upgrade(addr, path, &[]).await.is_none(),
            "{path} without an origin"
        );
        assert!(
            upgrade(addr, path, &[("origin", "http://app.example")])
                .await
                .is_none(),
            "{path} from a listed origin"
        );
        assert!(
            upgrade(addr, path, &[("origin", &own)]).await.is_none(),
            "{path} from the server's own origin"
        );
    }
    let other_port = format!("http://127.0.0.1:{}", addr.port().wrapping_add(1));
    assert!(upgrade(
        addr,
        "/v1/actors/counter/connect",
        &[("origin", &other_port)]
    )
    .await
    .is_some());
    served.runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_raw_upgrade_creates_no_actor() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), |_| {}).await;
    let refused = upgrade(
        served.addr,
        "/v1/actors/counter/raw/fresh",
        &[("origin", "http://evil.example")],
    )
    .await
    .expect("refused");
    assert_eq!(refused.status, 403);
    served.runtime.drain().await;
    let store = keel_core::store::Store::open(dir.path(), keel_core::Durability::Full).unwrap();
    assert!(store.find_by_key("counter", "fresh").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_routes_of_a_type_without_the_hooks_are_not_found_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut types = keel_core::ActorTypes::default();
    types
        .add(keel_core::ActorType::new(
            "plain",
            common::ACTIONS.iter().copied(),
        ))
        .unwrap();
    let (opened_tx, _opened) = mpsc::unbounded_channel();
    let host = Arc::new(RawHost {
        counter: CounterHost::new(),
        opened: opened_tx,
    });
    let runtime = Runtime::open(
        common::config(dir.path()),
        Arc::new(types),
        host,
        &CancellationToken::new(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.serve(listener);

    for method in ["GET", "POST"] {
        let reply = exchange(addr, method, "/v1/actors/plain/raw/fresh/x", &[], "").await;
        assert_eq!(
            (reply.status, reply.code()),
            (404, "request.route_not_found".to_string()),
            "{method}"
        );
    }
    let (status, _, body) =
        common::handle(&runtime, "GET", "/v1/actors/plain/raw/fresh", &[]).await;
    assert_eq!(status, 404, "serverless: {body}");
    let refused = upgrade(addr, "/v1/actors/plain/raw/fresh", &[])
        .await
        .expect("an upgrade to a type without onWebSocket is refused");
    assert_eq!(
        (refused.status, refused.code()),
        (404, "request.route_not_found".to_string())
    );
    let err = runtime
        .resolve(Target::Key {
            name: "plain".into(),
            key: vec!["fresh".into()],
            mode: keel_core::Resolve::Get,
            input: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "not_found");
    runtime.drain().await;
    let store = keel_core::store::Store::open(dir.path(), keel_core::Durability::Full).unwrap();
    assert!(store.find_by_key("plain", "fresh").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_listed_origins_only() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), |config| {
        config.allowed_origins = AllowedOrigins::parse(["https://app.example"]).unwrap();
    })
    .await;
    let addr = served.addr;
    let increment = "/v1/actors/counter/actions/increment";
    let preflight = |origin: &'static str| async move {
        let headers = [
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type"),
        ];
        exchange(addr, "OPTIONS", increment, &headers, "").await
    };
    let listed = preflight("https://app.example").await;
    assert_eq!(listed.status, 204);
    assert_eq!(
        listed.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(listed.headers["access-control-allow-credentials"], "true");
    assert_eq!(listed.headers["access-control-allow-methods"], "POST");
    assert_eq!(
        listed.headers["access-control-allow-headers"],
        "content-type"
    );
    let unlisted = preflight("https://evil.example").await;
    assert_eq!(
        (unlisted.status, unlisted.code()),
        (403, "auth.origin_not_allowed".to_string())
    );
    assert!(!unlisted.headers.contains_key("access-control-allow-origin"));

    let body = r#"{"key":["c"]}"#;
    let call = exchange(
        addr,
        "POST",
        increment,
        &[JSON, ("origin", "https://app.example")],
        body,
    )
    .await;
    assert_eq!(call.status, 200);
    assert_eq!(
        call.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(call.headers["vary"], "origin");
    let call = exchange(
        addr,
        "POST",
        increment,
        &[JSON, ("origin", "https://evil.example")],
        body,
    )
    .await;
    assert!(!call.headers.contains_key("access-control-allow-origin"));
    let refused = exchange(
        addr,
        "POST",
        increment,
        &[("origin", "https://app.example")],
        body,
    )
    .await;
    assert_eq!(refused.status, 415);
    assert_eq!(
        refused.headers["access-control-allow-origin"], "https://app.example",
        "a listed page can read the error"
    );
    // Serverless requests get the same headers.
    let (status, headers, _) = common::handle(
        &served.runtime,
        "OPTIONS",
        increment,
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
        ],
    )
    .await;
    assert_eq!(
        (status, &headers["access-control-allow-origin"]),
        (204, &"https://app.example".parse().unwrap())
    );
    served.runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_star_lets_any_origin_read_but_never_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), |config| {
        config.allowed_origins = AllowedOrigins::parse(["*"]).unwrap();
    })
    .await;
    let reply = exchange(
        served.addr,
        "GET",
        "/health",
        &[("origin", "https://any.example")],
        "",
    )
    .await;
    assert_eq!(reply.headers["access-control-allow-origin"], "*");
    assert!(!reply
        .headers
        .contains_key("access-control-allow-credentials"));
    assert!(upgrade(
        served.addr,
        "/v1/actors/counter/connect",
        &[("origin", "https://any.example")]
    )
    .await
    .is_none());
    served.runtime.drain().await;
}

/// Connects and sends a request head that promises `length` body bytes, then `sent` of them.
async fn stalled(addr: SocketAddr, length: usize, sent: usize) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/actors/counter/actions/increment HTTP/1.1\r\nhost: {addr}\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n{}",
        " ".repeat(sent)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_answered_and_its_connection_closed() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), |config| {
        config.body_timeout = Duration::from_millis(200);
    })
    .await;
    let mut stalls = Vec::new();
    for sent in [0, 10] {
        stalls.push(stalled(served.addr, 100, sent).await);
    }
    // Others are answered while the stalled bodies wait.
    let reply = exchange(
        served.addr,
        "POST",
        "/v1/actors/counter/actions/get",
        &[JSON],
        r#"{"key":["s"]}"#,
    )
    .await;
    assert_eq!(reply.status, 200);
    for mut stream in stalls {
        let reply = read_reply(&mut stream).await.unwrap();
        assert_eq!(
            (reply.status, reply.code()),
            (408, "request.body_timed_out".to_string())
        );
        assert_eq!(reply.json()["metadata"]["timeoutMs"], 200);
        assert_eq!(reply.headers["connection"], "close");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the connection closed after the answer");
    }
    served.runtime.drain().await;
}
