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
