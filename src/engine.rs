//! Engine mode: `serve` as an envoy of a Rivet Engine. The adapter itself is keel-envoy's
//! (`keel_envoy::serve`); this module only hands it the registry and the host's state
//! encoding, announces the engine's address to JS, and keeps the envoy so the shutdown can
//! tell the engine first.

use std::sync::Arc;
use std::time::Duration;

use keel_core::{Host, Registry, Result, RuntimeConfig};
use keel_envoy::{EngineConfig, EngineRun};
use parking_lot::Mutex;

use crate::host::{JsHost, SharedHost};

/// The running envoy and its drain budget, shared with the shutdown.
pub type EngineSlot = Arc<Mutex<Option<(EngineRun, Duration)>>>;

/// Runs `registry` as an envoy of `engine` until shutdown; `announce` gets the engine's
/// `host:port` once the engine accepted the envoy.
pub async fn serve(
    registry: &Registry,
    host: &Arc<JsHost>,
    slot: &EngineSlot,
    config: RuntimeConfig,
    engine: EngineConfig,
    announce: impl FnOnce(String),
) -> Result<()> {
    let address = engine
        .endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let drain_timeout = config.drain_timeout;
    let state_encoding = SharedHost(host.clone()).state_encoding();
    keel_envoy::serve(registry, config, engine, state_encoding, |run| {
        tracing::info!(
            envoy_key = run.envoy_key(),
            "serving as an envoy of the engine"
        );
        *slot.lock() = Some((run, drain_timeout));
        announce(address);
    })
    .await
}

/// Tells the engine keel is stopping and waits (within the drain timeout) until it has
/// stopped every actor here; nothing when not in engine mode, or already done.
pub async fn stop(slot: &EngineSlot) {
    let run = slot.lock().clone();
    if let Some((run, drain_timeout)) = run {
        run.stop(drain_timeout).await;
    }
}
