//! Bad bytes in a CBOR request are the client's bad input: core refuses them as
//! `400 request.malformed` before the host runs any user code.

mod common;

use common::{open, CounterHost};

/// `{"key": ["k"], "args": <args>}` followed by `extra` entries (already encoded), as CBOR.
fn envelope(args: &[u8], extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = vec![0xa2 + extra.len() as u8];
    body.extend_from_slice(&[0x63, b'k', b'e', b'y', 0x81, 0x61, b'k']);
    body.extend_from_slice(&[0x64, b'a', b'r', b'g', b's']);
    body.extend_from_slice(args);
    for (name, value) in extra {
        body.push(0x60 + name.len() as u8);
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(value);
    }
    body
}

async fn post_cbor(runtime: &keel_core::Runtime, body: Vec<u8>) -> (u16, serde_json::Value) {
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/actors/counter/actions/increment")
        .header("content-type", "application/cbor")
        .body(axum::body::Body::from(body))
        .unwrap();
    let response = runtime.handle(request).await;
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cbor_in_args_or_input_is_malformed_and_reaches_no_user_code() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = open(dir.path(), host.clone());
    let cases: &[(&str, Vec<u8>)] = &[
        (
            "invalid UTF-8 in an argument",
            envelope(&[0x81, 0x62, 0xc3, 0x28], &[]),
        ),
        (
            "invalid UTF-8 deep in an argument",
            envelope(&[0x81, 0xa1, 0x61, b'x', 0x81, 0x61, 0xff], &[]),
        ),
        (
            "invalid UTF-8 in the creation input",
            envelope(&[0x80], &[("input", &[0x61, 0xfe])]),
        ),
        (
            "an indefinite-length argument",
            envelope(&[0x81, 0x7f, 0x61, b'a', 0xff], &[]),
        ),
        ("an unknown tag", envelope(&[0x81, 0xc0, 0x60], &[])),
        (
            "a map with an integer key",
            envelope(&[0x81, 0xa1, 0x01, 0x02], &[]),
        ),
    ];
    for (what, body) in cases {
        let (status, error) = post_cbor(&runtime, body.clone()).await;
        assert_eq!(status, 400, "{what}: {error}");
        assert_eq!(error["group"], "request", "{what}");
        assert_eq!(error["code"], "malformed", "{what}");
    }
    assert_eq!(*host.starts.lock(), 0, "no actor was started");
    assert!(host.log.lock().is_empty(), "no action ran");

    // Good bytes reach the actor. The test host reads CBOR args as JSON text after a two-byte
    // prefix, so `["[]"]` is a call with no arguments to it.
    let good = envelope(&[0x81, 0x62, b'[', b']'], &[("x", &[0x61, b'y'])]);
    let (status, output) = post_cbor(&runtime, good).await;
    assert_eq!((status, output), (200, serde_json::json!({ "output": 1 })));
    assert_eq!(*host.starts.lock(), 1);
    runtime.drain().await;
}
