//! Calls made on behalf of other actors' calls (`Runtime::call_from`): a target already in
//! the chain of awaiting actors fails at once with `actor.call_cycle`; any other target is
//! called as usual.

mod common;

use common::{call, committed_count, counter, open, CounterHost};
use keel_core::{Encoding, Error, Payload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_in_the_chain_fails_at_once_and_others_are_called() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = open(dir.path(), host.clone());
    call(&runtime, counter("a"), "increment", "[1]")
        .await
        .unwrap();
    let a = runtime.resolve(counter("a")).await.unwrap().id.to_string();

    let err = runtime
        .call_from(
            counter("a"),
            "increment",
            Payload::json("[1]"),
            Encoding::Json,
            vec!["someone-else".into(), a.clone()],
        )
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::ActorCallCycle { actor_id } if *actor_id == a));
    assert_eq!(
        (err.group(), err.code(), err.http_status()),
        ("actor", "call_cycle", 409)
    );
    assert_eq!(
        host.runs("increment"),
        1,
        "the refused call never reached the host"
    );

    let output = runtime
        .call_from(
            counter("b"),
            "increment",
            Payload::json("[2]"),
            Encoding::Json,
            vec![a],
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8(output.bytes).unwrap(), "2");
    runtime.drain().await;
    assert_eq!(committed_count(dir.path(), "a"), Some(1));
    assert_eq!(committed_count(dir.path(), "b"), Some(2));
}
