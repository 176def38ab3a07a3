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

/// A host that skips the KV limits still cannot store past them: core checks every commit,
/// refuses the whole call with the limit error, and keeps what was committed before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_writes_past_the_limits_are_refused_by_core_whatever_the_host_checks() {
    use keel_core::Limits;
    let dir = tempfile::tempdir().unwrap();
    let runtime = open(dir.path(), CounterHost::new());
    let limits = Limits::default();
    let put = |key: String, value: String| {
        let args = serde_json::json!([key, value]).to_string();
        let runtime = &runtime;
        async move { common::call(runtime, common::counter("kv"), "kv_put", &args).await }
    };
    // The key limit does not count the one kind byte in front of the key.
    let longest_key = "k".repeat(limits.max_kv_key_bytes + 1);
    put(longest_key.clone(), "v".into()).await.unwrap();
    let largest_value = "v".repeat(limits.max_kv_value_bytes);
    put("big".into(), largest_value).await.unwrap();

    let err = put(format!("{longest_key}k"), "v".into())
        .await
        .unwrap_err();
    assert_eq!((err.group(), err.code()), ("kv", "key_too_large"));
    assert_eq!(err.http_status(), 413);
    let too_large = "v".repeat(limits.max_kv_value_bytes + 1);
    let err = put("big".into(), too_large).await.unwrap_err();
    assert_eq!((err.group(), err.code()), ("kv", "value_too_large"));
    // A refused call changes nothing, in memory either: the count it raised is forgotten.
    let args = serde_json::json!(["big", "v".repeat(limits.max_kv_value_bytes + 1)]).to_string();
    let err = common::call(&runtime, common::counter("kv"), "increment_and_put", &args)
        .await
        .unwrap_err();
    assert_eq!((err.group(), err.code()), ("kv", "value_too_large"));
    // The actor survives, and its committed entries are the ones from before.
    let count = common::call(&runtime, common::counter("kv"), "increment", "[1]").await;
    assert_eq!(count.unwrap(), "1");
    let info = runtime.resolve(common::counter("kv")).await.unwrap();
    runtime.drain().await;

    let store = keel_core::store::Store::open(dir.path(), keel_core::Durability::Full).unwrap();
    let entries = store.kv_page(&info.id, b"", None, 10).unwrap();
    let sizes: Vec<(usize, usize)> = entries.iter().map(|(k, v)| (k.len(), v.len())).collect();
    assert_eq!(
        sizes,
        [
            (3, limits.max_kv_value_bytes),
            (limits.max_kv_key_bytes + 1, 1)
        ]
    );
}
