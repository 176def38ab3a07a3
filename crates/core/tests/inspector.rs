//! The inspector against a real runtime: its access rules (off, loopback only, bearer token)
//! over a real listener and over serverless requests, and every route.

mod common;

use common::{eventually, handle};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use common::{call, counter, CounterHost};
use keel_core::config::InspectorConfig;
use keel_core::{InspectorToken, Runtime, RuntimeConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "s3cr3t-t0ken-for-tests-0123456789";

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, HashMap<String, String>, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, mut body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: HashMap<String, String> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    let mut decoded = String::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v == "chunked")
    {
        loop {
            let (size, rest) = body.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size, 16).unwrap();
            if size == 0 {
                break;
            }
            decoded.push_str(&rest[..size]);
            body = &rest[size + 2..];
        }
    } else {
        decoded = body.to_string();
    }
    (status, headers, decoded)
}

fn json_body(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|err| panic!("not JSON ({err}): {body}"))
}

fn base64_decode(text: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let value = alphabet
            .iter()
            .position(|a| *a == c)
            .expect("standard base64") as u32;
        acc = (acc << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn config_with(dir: &std::path::Path, inspector: InspectorConfig) -> RuntimeConfig {
    RuntimeConfig {
        inspector,
        ..common::config(dir)
    }
}

fn token_config(allow_remote: bool) -> InspectorConfig {
    InspectorConfig {
        token: Some(InspectorToken::new(TOKEN)),
        allow_remote,
    }
}

// ---------------------------------------------------------------------------------------
// The inspector's access rules.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_outside_dev_mode_the_inspector_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), InspectorConfig::default());
    let runtime = Runtime::open(
        config,
        common::types(),
        CounterHost::new(),
        &CancellationToken::new(),
    )
    .unwrap();
    let auth = format!("Bearer {TOKEN}");
    let (status, _, body) = handle(
        &runtime,
        "GET",
        "/v1/inspector/actors",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(json_body(&body)["code"], "route_not_found");
    runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serverless_requests_reach_the_inspector_only_when_remote_peers_are_allowed() {
    for allow_remote in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let config = config_with(dir.path(), token_config(allow_remote));
        let runtime = Runtime::open(
            config,
            common::types(),
            CounterHost::new(),
            &CancellationToken::new(),
        )
        .unwrap();
        let auth = format!("Bearer {TOKEN}");
        let (status, _, body) = handle(
            &runtime,
            "GET",
            "/v1/inspector/actors",
            &[("authorization", &auth)],
        )
        .await;
        if allow_remote {
            assert_eq!(status, 200, "{body}");
            let (status, headers, _) = handle(&runtime, "GET", "/v1/inspector/actors", &[]).await;
            assert_eq!(status, 401);
            assert_eq!(
                headers["www-authenticate"],
                "Bearer realm=\"keel-inspector\""
            );
        } else {
            assert_eq!(status, 403, "{body}");
            let body = json_body(&body);
            assert_eq!(
                (body["group"].as_str(), body["code"].as_str()),
                (Some("auth"), Some("forbidden"))
            );
        }
        runtime.drain().await;
    }
}

#[test]
fn the_token_never_shows_in_a_configuration_dump() {
    let config = RuntimeConfig {
        inspector: token_config(false),
        ..RuntimeConfig::default()
    };
    let dump = format!("{config:?}");
    assert!(!dump.contains(TOKEN), "{dump}");
    assert!(dump.contains("<redacted>"));
    for (token, ok) in [
        ("short", false),
        ("has a space in it!!", false),
        (TOKEN, true),
    ] {
        let config = RuntimeConfig {
            inspector: InspectorConfig {
                token: Some(InspectorToken::new(token)),
                allow_remote: false,
            },
            ..RuntimeConfig::default()
        };
        match config.validate() {
            Ok(()) => assert!(ok, "{token:?} was accepted"),
            Err(err) => {
                assert!(!ok, "{token:?} was refused: {err}");
                assert_eq!(err.code(), "invalid_config");
                assert!(
                    !err.to_string().contains(token),
                    "the message repeats the token"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The inspector over a real loopback listener.

struct Served {
    runtime: Runtime,
    addr: SocketAddr,
    host: Arc<CounterHost>,
}

async fn serve(dir: &std::path::Path) -> Served {
    let host = CounterHost::new();
    let config = config_with(dir, token_config(false));
    let runtime = Runtime::open(
        config,
        common::types(),
        host.clone(),
        &CancellationToken::new(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.serve(listener);
    Served {
        runtime,
        addr,
        host,
    }
}

impl Served {
    async fn get(&self, path: &str) -> (u16, Value) {
        let auth = format!("Bearer {TOKEN}");
        let (status, _, body) = http(self.addr, "GET", path, &[("authorization", &auth)], "").await;
        (status, json_body(&body))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inspector_wants_the_exact_token() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path()).await;
    let mut wrong_last = TOKEN.to_string();
    wrong_last.pop();
    wrong_last.push('!');
    let cases: Vec<(Vec<(&str, String)>, u16)> = vec![
        (vec![], 401),
        (vec![("authorization", format!("Bearer {wrong_last}"))], 401),
        (
            vec![(
                "authorization",
                format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]),
            )],
            401,
        ),
        (vec![("authorization", format!("Bearer {TOKEN}x"))], 401),
        (vec![("authorization", format!("Basic {TOKEN}"))], 401),
        (vec![("authorization", format!("Bearer {TOKEN}"))], 200),
        (vec![("authorization", format!("bearer {TOKEN}"))], 200),
    ];
    for (headers, expected) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let (status, response_headers, body) =
            http(served.addr, "GET", "/v1/inspector/actors", &headers, "").await;
        assert_eq!(status, expected, "{headers:?}: {body}");
        if expected == 401 {
            let body = json_body(&body);
            assert_eq!(body["group"], "auth");
            assert_eq!(body["code"], "unauthorized");
            assert!(!body.to_string().contains(TOKEN));
            assert_eq!(
                response_headers["www-authenticate"],
                "Bearer realm=\"keel-inspector\""
            );
        }
    }
    // The public routes and /metrics need no token.
    let (status, _, _) = http(served.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    served.runtime.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inspector_lists_reads_and_calls() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path()).await;
    let runtime = &served.runtime;
    for (i, key) in ["k0", "k1", "k2", "k3", "k4"].iter().enumerate() {
        call(runtime, counter(key), "increment", &format!("[{}]", i + 1))
            .await
            .unwrap();
    }
    // Stored keys in core's KV key codec: `s` then a string key, `b` then a byte key; and one
    // in no format the codec knows.
    for (key, value) in [("sa", "1"), ("sb", "2")] {
        call(
            runtime,
            counter("k1"),
            "kv_put",
            &json!([key, value]).to_string(),
        )
        .await
        .unwrap();
    }
    for (key, value) in [("b\u{1}", "3"), ("xraw", "4")] {
        call(
            runtime,
            counter("k2"),
            "kv_put",
            &json!([key, value]).to_string(),
        )
        .await
        .unwrap();
    }
    let far = keel_core::writer::now_ms() + 3_600_000;
    call(
        runtime,
        counter("k1"),
        "schedule",
        &format!(r#"["s1", {far}, "append", 5]"#),
    )
    .await
    .unwrap();
    call(runtime, counter("k4"), "sleep", "[]").await.unwrap();
    eventually("k4 sleeps", || served.runtime.live_actors() == 4).await;

    // Every actor, awake or not, in key order, two at a time.
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/v1/inspector/actors?limit=2&cursor={cursor}"),
            None => "/v1/inspector/actors?limit=2".to_string(),
        };
        let (status, body) = served.get(&path).await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        listed.extend(body["actors"].as_array().unwrap().iter().cloned());
        match body["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let keys: Vec<_> = listed
        .iter()
        .map(|a| a["key"][0].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4"]);
    let awake: Vec<_> = listed
        .iter()
        .map(|a| a["awake"].as_bool().unwrap())
        .collect();
    assert_eq!(awake, [true, true, true, true, false]);
    assert!(listed
        .iter()
        .all(|a| a["name"] == "counter" && a["createdAt"].as_i64().unwrap() > 0));
    let (_, only) = served.get("/v1/inspector/actors?name=nobody").await;
    assert_eq!(only, json!({ "actors": [], "nextCursor": null }));

    let k1 = listed[1]["actorId"].as_str().unwrap().to_string();
    let k4 = listed[4]["actorId"].as_str().unwrap().to_string();
    let (status, one) = served.get(&format!("/v1/inspector/actors/{k4}")).await;
    assert_eq!((status, &one), (200, &listed[4]));

    // State: committed, read without waking a sleeping actor.
    let (status, state) = served
        .get(&format!("/v1/inspector/actors/{k4}/state"))
        .await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["encoding"], "json");
    let decoded: Value =
        serde_json::from_slice(&base64_decode(state["state"].as_str().unwrap())).unwrap();
    assert_eq!(decoded["count"], 5);
    assert_eq!(served.runtime.live_actors(), 4, "reading did not wake k4");

    // KV, one entry per page.
    let (status, page) = served
        .get(&format!("/v1/inspector/actors/{k1}/kv?limit=1"))
        .await;
    assert_eq!(status, 200, "{page}");
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["key"], "a", "a string key, decoded");
    assert_eq!(entries[0]["keyType"], "string");
    assert_eq!(base64_decode(entries[0]["value"].as_str().unwrap()), b"1");
    let next = page["nextCursor"].as_str().unwrap();
    let (_, page) = served
        .get(&format!(
            "/v1/inspector/actors/{k1}/kv?limit=1&cursor={next}"
        ))
        .await;
    assert_eq!(page["entries"][0]["key"], "b");
    let (_, page) = served
        .get(&format!("/v1/inspector/actors/{k1}/kv?prefix=b"))
        .await;
    assert_eq!(
        page["entries"].as_array().unwrap().len(),
        1,
        "prefix b: {page}"
    );
    assert_eq!(page["nextCursor"], Value::Null);
    // A byte key shows as base64, and sorts before the key in no known format.
    let k2 = listed[2]["actorId"].as_str().unwrap().to_string();
    let (_, page) = served.get(&format!("/v1/inspector/actors/{k2}/kv")).await;
    assert_eq!(
        page["entries"],
        json!([
            { "key": "AQ==", "keyType": "bytes", "value": "Mw==" },
            { "key": "eHJhdw==", "keyType": "raw", "value": "NA==" },
        ]),
        "{page}"
    );
    let (_, page) = served
        .get(&format!("/v1/inspector/actors/{k2}/kv?bytesPrefix=AQ"))
        .await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 1, "{page}");
    let (status, _) = served
        .get(&format!(
            "/v1/inspector/actors/{k2}/kv?prefix=a&bytesPrefix=AQ"
        ))
        .await;
    assert_eq!(status, 400, "both prefixes at once");

    // Schedules and connections.
    let (_, schedules) = served
        .get(&format!("/v1/inspector/actors/{k1}/schedules"))
        .await;
    let listed_schedules = schedules["schedules"].as_array().unwrap();
    assert_eq!(listed_schedules.len(), 1, "{schedules}");
    assert_eq!(listed_schedules[0]["id"], "s1");
    assert_eq!(listed_schedules[0]["at"], far);
    assert_eq!(listed_schedules[0]["action"], "append");
    assert_eq!(listed_schedules[0]["attempts"], 0);
    assert!(base64_decode(listed_schedules[0]["args"].as_str().unwrap()).ends_with(b"[5]"));
    let (_, connections) = served
        .get(&format!("/v1/inspector/actors/{k1}/connections"))
        .await;
    assert_eq!(connections, json!({ "actorId": k1, "connections": [] }));

    // Calling an action: the same reply as the public route.
    let auth = format!("Bearer {TOKEN}");
    let (status, _, body) = http(
        served.addr,
        "POST",
        &format!("/v1/inspector/actors/{k1}/actions/increment"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        r#"{"args":[10]}"#,
    )
    .await;
    assert_eq!((status, json_body(&body)), (200, json!({ "output": 12 })));

    // Errors.
    let (status, missing) = served
        .get("/v1/inspector/actors/ffffffffffffffffffffffffffffffff/state")
        .await;
    assert_eq!((status, missing["code"].as_str()), (404, Some("not_found")));
    let (status, missing) = served.get("/v1/inspector/actors/nobody/kv").await;
    assert_eq!((status, missing["code"].as_str()), (404, Some("not_found")));
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "cursor=%%",
        "cursor=bm90IGpzb24",
    ] {
        let (status, body) = served.get(&format!("/v1/inspector/actors?{bad}")).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("malformed")),
            "{bad}: {body}"
        );
    }
    assert!(served
        .host
        .log
        .lock()
        .iter()
        .any(|line| line.contains("increment:[10]")));
    served.runtime.drain().await;
}
