//! The connection to the engine: starting the envoy on keel's tokio runtime, the intents keel
//! sends, opening an actor's storage, and a bounded shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{Encoding, Error, Result};
use rivet_envoy_client::config::EnvoyConfig;
use rivet_envoy_client::handle::EnvoyHandle;
use tokio::sync::mpsc;

use crate::activation::{Callbacks, EngineEvent, Tunnel};
use crate::config::{EngineConfig, CONNECT_TIMEOUT};
use crate::relay::Relay;
use crate::remote::Remote;
use crate::storage::{ActorIdentity, ActorStore, Snapshot};

/// The app version the envoy reports; the engine drains older envoys on an upgrade only when
/// the pool asks for it, which keel does not use yet.
const ENVOY_VERSION: u32 = 1;

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// The envoy told the engine it was stopping, every actor was stopped, and it closed.
    Graceful,
    /// The budget ran out first: the envoy was stopped at once; the engine sees it lost.
    Forced,
}

/// A connected envoy. Cloneable; every clone speaks for the same connection. The envoy runs
/// until [`Engine::shutdown`] or [`Engine::abandon`]: dropping every clone does not stop it.
#[derive(Clone)]
pub struct Engine {
    handle: EnvoyHandle,
    namespace: Arc<str>,
    /// The tunneled sockets open through this envoy (shared with its callbacks).
    sockets: Arc<crate::socket::Sockets>,
    /// The loopback relay the client dials instead of an `http://` engine (`relay.rs`);
    /// stopped with the envoy.
    relay: Option<Arc<Relay>>,
}

/// Connects to the engine as an envoy of `config.pool` and waits for the engine's `Init`, at
/// most [`CONNECT_TIMEOUT`]. Must be called within a tokio runtime (keel's); the envoy's tasks
/// run there. The receiver gets every start and stop command; dropping it fails later starts.
pub async fn connect(config: EngineConfig) -> Result<(Engine, mpsc::Receiver<EngineEvent>)> {
    connect_with(config, None).await
}

/// [`connect`], serving tunneled requests with `tunnel`.
pub async fn connect_with(
    config: EngineConfig,
    tunnel: Option<Arc<dyn Tunnel>>,
) -> Result<(Engine, mpsc::Receiver<EngineEvent>)> {
    config.validate()?;
    let sockets = Arc::<crate::socket::Sockets>::default();
    let (callbacks, events) = Callbacks::new(tunnel, sockets.clone());
    let namespace: Arc<str> = config.namespace.as_str().into();
    let endpoint = config.endpoint.clone();
    // The client dials the relay, which reaches the engine as soon as it answers again after
    // an outage, instead of at the client's next backoff step.
    let relay = Relay::start(&endpoint)
        .await
        .map_err(|source| Error::io("starting the engine relay failed", source))?
        .map(Arc::new);
    let client_endpoint = relay
        .as_ref()
        .map_or_else(|| endpoint.clone(), |relay| relay.endpoint().to_string());
    let handle = rivet_envoy_client::envoy::start_envoy_sync(EnvoyConfig {
        version: ENVOY_VERSION,
        endpoint: client_endpoint,
        token: config.token,
        namespace: config.namespace,
        pool_name: config.pool,
        prepopulate_actor_names: HashMap::new(),
        metadata: None,
        // One envoy per `connect`, not a process-wide one: keel owns its lifetime.
        not_global: true,
        debug_latency_ms: None,
        callbacks: Arc::new(callbacks),
    });
    let started = match tokio::time::timeout(CONNECT_TIMEOUT, handle.started()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(std::io::Error::other(format!("{err:#}"))),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        )),
    };
    if let Err(source) = started {
        // Leave nothing behind: the envoy would otherwise keep retrying in the background.
        handle.shutdown(true);
        if let Some(relay) = &relay {
            relay.stop();
        }
        return Err(Error::io(
            format!("connecting to the engine at {endpoint} failed"),
            source,
        ));
    }
    tracing::info!(%endpoint, envoy_key = handle.get_envoy_key(), "connected to the engine");
    Ok((
        Engine {
            handle,
            namespace,
            sockets,
            relay,
        },
        events,
    ))
}

impl Engine {
    /// Opens the storage of the actor's activation at `generation` and loads its snapshot,
    /// creating its schema (and writing `identity`) on its first start. See `storage.rs`.
    pub async fn open_actor(
        &self,
        actor_id: &str,
        generation: u32,
        identity: &ActorIdentity,
        state_encoding: Encoding,
    ) -> Result<(ActorStore, Snapshot)> {
        let remote = Remote::new(
            self.handle.clone(),
            self.namespace.clone(),
            actor_id.into(),
            generation,
        );
        ActorStore::open(remote, identity, state_encoding).await
    }

    /// Hands the envoy the sockets of the actor's hibernated connections that this process
    /// kept while it slept, so that the start now under way restores them (the gateway kept
    /// them open; see `socket.rs`), and those `stored` with the actor's data that it did not
    /// keep, which the envoy closes. Called before every start is answered; returns how many.
    pub fn restore_sockets(
        &self,
        actor_id: &str,
        stored: &[crate::storage::StoredSocket],
    ) -> usize {
        let kept = self.sockets.hibernating(actor_id, stored);
        let count = kept.len();
        self.handle
            .restore_hibernating_requests(actor_id.to_string(), kept);
        count
    }

    /// Asks the engine to put the actor to sleep; it answers with a stop (`Sleep`), keeps the
    /// data and starts the actor again (generation + 1) on the next request or alarm.
    pub fn sleep_actor(&self, actor_id: &str, generation: u32) {
        self.handle
            .sleep_actor(actor_id.to_string(), Some(generation), None);
    }

    /// Asks the engine to destroy the actor; it answers with a stop (`StopIntent`) and
    /// deletes the actor with its data.
    pub fn stop_actor(&self, actor_id: &str, generation: u32) {
        self.handle
            .stop_actor(actor_id.to_string(), Some(generation));
    }

    /// This envoy's key, unique per connection.
    pub fn envoy_key(&self) -> &str {
        self.handle.get_envoy_key()
    }

    /// Tells the engine the envoy is stopping, lets it stop every actor (each as `GoingAway`,
    /// which the event receiver must complete) and waits for the envoy to close, for at most
    /// `timeout`. Past it, the envoy stops at once and the engine later sees it as lost.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownOutcome {
        if tokio::time::timeout(timeout, self.handle.shutdown_and_wait(false))
            .await
            .is_ok()
        {
            self.stop_relay();
            return ShutdownOutcome::Graceful;
        }
        tracing::warn!(
            timeout_ms = timeout.as_millis() as u64,
            "the envoy did not stop within its budget; stopping it at once"
        );
        self.handle.shutdown(true);
        self.stop_relay();
        ShutdownOutcome::Forced
    }

    /// Stops the envoy at once, as a crash would: no stopping message, no actor stops. The
    /// engine keeps the actors assigned until it declares the envoy lost.
    pub fn abandon(&self) {
        self.handle.shutdown(true);
        self.stop_relay();
    }

    /// Stops the relay's listener and any connection of it still waiting for the engine: the
    /// envoy, stopped, dials no more.
    fn stop_relay(&self) {
        if let Some(relay) = &self.relay {
            relay.stop();
        }
    }
}
