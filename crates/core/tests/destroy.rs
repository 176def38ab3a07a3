//! The key of a destroyed actor is free once the destroying call's reply has arrived: a
//! `getOrCreate` or `create` right after it makes a new actor, and a `get` finds none.

mod common;

use common::{call, counter, CounterHost};
use keel_core::{Resolve, Target};

fn by_key(key: &str, mode: Resolve) -> Target {
    Target::Key {
        name: "counter".into(),
        key: vec![key.to_string()],
        mode,
        input: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_key_is_free_as_soon_as_destroy_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = common::open(dir.path(), host.clone());
    for i in 0..100 {
        let key = format!("k{i}");
        let old = runtime.resolve(counter(&key)).await.unwrap();
        assert_eq!(
            call(&runtime, counter(&key), "increment", "[5]")
                .await
                .unwrap(),
            "5"
        );
        call(&runtime, counter(&key), "destroy", "[]")
            .await
            .unwrap();

        let get = runtime
            .resolve(by_key(&key, Resolve::Get))
            .await
            .unwrap_err();
        assert_eq!(get.code(), "not_found", "#{i}: get finds no actor");
        let fresh = if i % 2 == 0 {
            runtime.resolve(by_key(&key, Resolve::Create)).await
        } else {
            runtime.resolve(by_key(&key, Resolve::GetOrCreate)).await
        };
        let fresh = fresh.unwrap_or_else(|err| panic!("#{i}: the key is free: {err}"));
        assert_ne!(fresh.id, old.id, "#{i}: a new actor");
        assert_eq!(
            call(&runtime, by_key(&key, Resolve::Get), "increment", "[1]")
                .await
                .unwrap(),
            "1",
            "#{i}: the new actor starts from scratch"
        );
    }
    runtime.drain().await;
    let destroys = host
        .stop_log
        .lock()
        .iter()
        .filter(|entry| entry.ends_with(":destroy"))
        .count();
    assert_eq!(destroys, 100, "every destroy hook ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_queued_behind_a_destroy_fail_with_not_found_and_change_nothing() {
    // docs/actors.md, "Destroy": messages still waiting in the mailbox fail with
    // `actor.not_found`; none of them runs on the destroyed actor or creates a new one.
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let runtime = std::sync::Arc::new(common::open(dir.path(), host.clone()));
    let old = runtime.resolve(counter("q")).await.unwrap();
    let held = common::block_a_call(&runtime, &host, "q").await;
    let queue = |action: &'static str| {
        let runtime = runtime.clone();
        tokio::spawn(async move { call(&runtime, counter("q"), action, "[1]").await })
    };
    let destroy = queue("destroy");
    // In the mailbox, in this order, behind the held call.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let behind: Vec<_> = (0..3).map(|_| queue("increment")).collect();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    host.gate.add_permits(1);
    assert_eq!(held.await.unwrap().unwrap(), "1");
    destroy.await.unwrap().unwrap();
    for call in behind {
        let err = call.await.unwrap().unwrap_err();
        assert_eq!((err.group(), err.code()), ("actor", "not_found"));
    }
    assert_eq!(
        host.runs("increment"),
        0,
        "nothing queued behind the destroy ran"
    );
    let get = runtime
        .resolve(by_key("q", Resolve::Get))
        .await
        .unwrap_err();
    assert_eq!(
        get.code(),
        "not_found",
        "no actor was created by them either"
    );
    let fresh = runtime.resolve(counter("q")).await.unwrap();
    assert_ne!(fresh.id, old.id);
    runtime.drain().await;
}
