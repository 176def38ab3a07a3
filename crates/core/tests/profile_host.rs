//! A server for profiling core without JS: the Rust counter host behind keel's own HTTP
//! server, run by `bench/profile.sh` and driven by `bench/seq-client.mjs` like the JS-hosted
//! runtime and the plain Node baseline, so the three can be compared call for call.
//!
//! It is `#[ignore]`d: it serves until its stdin closes, so it only runs when asked for:
//! `KEEL_PROFILE_DIR=/tmp/x KEEL_PROFILE_DURABILITY=relaxed cargo test --release -p keel-core
//! --test profile_host -- --ignored --nocapture`. It prints `{"ready":true,"port":N}` once
//! listening. `KEEL_PROFILE_WORKERS` sets the tokio worker threads (default 2, as the
//! binding's runtime has on this machine).

mod common;

use std::io::Read;

use keel_core::{Durability, Runtime};
use tokio_util::sync::CancellationToken;

#[test]
#[ignore = "a server for bench/profile.sh; serves until stdin closes"]
fn serve_for_profiling() {
    let workers = std::env::var("KEEL_PROFILE_WORKERS").map_or(2, |n| n.parse().unwrap());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
        .block_on(serve());
}

async fn serve() {
    let dir = std::env::var("KEEL_PROFILE_DIR").expect("KEEL_PROFILE_DIR names the data dir");
    let durability = std::env::var("KEEL_PROFILE_DURABILITY").unwrap_or_else(|_| "full".into());
    let mut config = common::config(std::path::Path::new(&dir));
    config.durability = Durability::parse(&durability).unwrap();
    let root = CancellationToken::new();
    let runtime =
        Runtime::open(config, common::types(), common::CounterHost::new(), &root).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.serve(listener);
    println!("{{\"ready\":true,\"port\":{port}}}");
    // Serve until the parent closes stdin; reading it blocks, so on a thread of its own.
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await
    .unwrap();
    root.cancel();
    runtime.drain().await;
}
