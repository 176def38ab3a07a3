//! keel's runtime as an envoy: the adapter between the engine's commands and keel-core's
//! driven runtime.
//!
//! [`serve`] connects, opens the registry as a driven runtime over [`EngineStorage`], and
//! turns each engine event into keel-core calls: a start opens the actor's fenced store for
//! its generation and starts its task; a stop goes through keel's own stop path for its
//! reason and drops the store; a tunneled request is served by the runtime's routes for the
//! actor the engine resolved. An actor that sleeps or destroys itself tells the engine
//! through [`keel_core::Intents`] (a sleep or stop intent), and the engine answers with the
//! stop.
//!
//! What must stay true:
//! - Every start is answered and every stop completed, also when keel fails them.
//! - A stop completes only after the activation's last commit was acknowledged and its store
//!   dropped: nothing of that generation is written afterwards.
//! - The drain tells the engine first ([`EngineRun::stop`]): the engine stops each actor as
//!   going away (left asleep), then the envoy closes, within the budget given.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keel_core::store::ActorRecord;
use keel_core::{Encoding, Error, Payload, Registry, Result, Runtime, RuntimeConfig};
use rivet_envoy_client::config::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::activation::{
    error_response, retry_response, EngineEvent, Tunnel, TunneledRequest, TunneledResponse,
    ACTOR_ID_HEADER,
};
use crate::config::EngineConfig;
use crate::envoy::{connect_with, Engine, ShutdownOutcome};
use crate::seam::EngineStorage;
use crate::storage::ActorIdentity;

/// The most bytes of one tunneled response: the engine's own limit on a response frame.
const MAX_RESPONSE_BYTES: usize = 20 * 1024 * 1024;

/// A running envoy, for the drain.
#[derive(Clone)]
pub struct EngineRun {
    engine: Engine,
    /// Cancelled once the envoy has closed: the event loop ends.
    done: CancellationToken,
    /// Set by the first stop; later ones return at once.
    stopping: Arc<AtomicBool>,
}

impl EngineRun {
    /// Tells the engine keel is stopping and waits, at most `timeout`, until the engine has
    /// stopped every actor here (each as going away: left asleep, not destroyed) and the envoy
    /// has closed. Only the first call does anything.
    pub async fn stop(&self, timeout: Duration) -> Option<ShutdownOutcome> {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return None;
        }
        let outcome = self.engine.shutdown(timeout).await;
        self.done.cancel();
        Some(outcome)
    }

    /// This envoy's key, unique per connection.
    pub fn envoy_key(&self) -> &str {
        self.engine.envoy_key()
    }
}

/// Runs `registry` as an envoy of the engine in `engine` until the registry has shut down.
/// `state_encoding` is the host's; `on_connected` gets the running envoy once the engine
/// accepted it (the caller's drain stops it with [`EngineRun::stop`] before shutting the
/// registry down). The envoy is stopped before this returns, within `config.drain_timeout`.
pub async fn serve(
    registry: &Registry,
    config: RuntimeConfig,
    engine: EngineConfig,
    state_encoding: Encoding,
    on_connected: impl FnOnce(EngineRun),
) -> Result<()> {
    let drain_timeout = config.drain_timeout;
    let storage = Arc::new(EngineStorage::default());
    let tunnel = Arc::new(RuntimeTunnel {
        runtime: OnceLock::new(),
        storage: storage.clone(),
    });
    let (engine, events) = connect_with(engine, Some(tunnel.clone())).await?;
    let run = EngineRun {
        engine: engine.clone(),
        done: CancellationToken::new(),
        stopping: Arc::default(),
    };
    let intents = Arc::new(EngineIntents {
        engine: engine.clone(),
    });
    let served = registry
        .serve_driven(config, storage.clone(), intents, |runtime| {
            // Set once, before any event is handled: requests tunneled earlier are refused.
            let _ = tunnel.runtime.set(runtime.clone());
            let event_loop = EventLoop {
                runtime,
                engine,
                storage,
                state_encoding,
            };
            tokio::spawn(event_loop.run(events, run.done.clone()).in_current_span());
            on_connected(run.clone());
        })
        .await;
    run.stop(drain_timeout).await;
    served
}

/// Sends the actors' own sleep and destroy decisions to the engine as intents.
struct EngineIntents {
    engine: Engine,
}

impl keel_core::Intents for EngineIntents {
    fn sleep(&self, actor_id: &str, generation: u64) {
        tracing::debug!(%actor_id, generation, "asking the engine to put the actor to sleep");
        self.engine
            .sleep_actor(actor_id, engine_generation(generation));
    }

    fn destroy(&self, actor_id: &str, generation: u64) {
        tracing::debug!(%actor_id, generation, "asking the engine to destroy the actor");
        self.engine
            .stop_actor(actor_id, engine_generation(generation));
    }
}

/// keel-core tags activations with a `u64`; the engine's generations are `u32`, and only
/// those reach keel-core in engine mode.
fn engine_generation(generation: u64) -> u32 {
    u32::try_from(generation).unwrap_or(u32::MAX)
}

/// Drains the engine's events into the runtime.
struct EventLoop {
    runtime: Arc<Runtime>,
    engine: Engine,
    storage: Arc<EngineStorage>,
    state_encoding: Encoding,
}

impl EventLoop {
    async fn run(self, mut events: mpsc::Receiver<EngineEvent>, done: CancellationToken) {
        let this = Arc::new(self);
        loop {
            tokio::select! {
                // The envoy has closed: no more events matter.
                _ = done.cancelled() => return,
                event = events.recv() => match event {
                    // Each event on its own task, so one slow start holds no stop behind it.
                    Some(event) => {
                        tokio::spawn(this.clone().handle(event).in_current_span());
                    }
                    // The envoy dropped its callbacks: it is gone.
                    None => return,
                },
            }
        }
    }

    async fn handle(self: Arc<Self>, event: EngineEvent) {
        match event {
            EngineEvent::Start {
                actor_id,
                name,
                key,
                generation,
                created_at_ms,
                input,
                reply,
            } => {
                let started = self
                    .start(&actor_id, name, key, generation, created_at_ms, input)
                    .await;
                if let Err(err) = &started {
                    tracing::warn!(%actor_id, generation, error = %err, "starting an engine actor failed");
                    self.storage.remove(&actor_id, generation);
                }
                reply.send(started);
            }
            EngineEvent::Stop {
                actor_id,
                generation,
                reason,
                done,
            } => {
                tracing::debug!(%actor_id, generation, reason = reason.as_str(), "stopping engine actor");
                let stopped = self
                    .runtime
                    .stop_actor(&actor_id, u64::from(generation), reason.core())
                    .await;
                self.storage.remove(&actor_id, generation);
                match stopped {
                    Ok(()) => done.complete(),
                    Err(err) => done.fail(&err),
                }
            }
        }
    }

    async fn start(
        &self,
        actor_id: &str,
        name: String,
        key: Option<String>,
        generation: u32,
        created_at_ms: i64,
        input: Option<Vec<u8>>,
    ) -> Result<()> {
        let key = key.unwrap_or_else(|| keel_core::key::encode(&[]));
        let identity = ActorIdentity {
            name: name.clone(),
            key: key.clone(),
            created_at_ms,
            input: input.map(input_payload),
        };
        let (store, mut snapshot) = self
            .engine
            .open_actor(actor_id, generation, &identity, self.state_encoding)
            .await?;
        let record = ActorRecord {
            id: actor_id.to_string(),
            name: name.clone(),
            key: key.clone(),
        };
        let schedules = snapshot
            .schedules
            .iter()
            .map(|stored| (stored.schedule.id.clone(), stored.schedule.at_ms))
            .collect();
        let sockets = std::mem::take(&mut snapshot.sockets);
        self.storage.insert(store, record, created_at_ms, snapshot);
        self.runtime
            .start_actor(actor_id, &name, &key, u64::from(generation))?;
        // Overdue ones fire at once, through the task just started.
        self.runtime.index_schedules(actor_id, schedules);
        // The sockets of the connections it left hibernated here when it slept, restored by
        // the envoy once this start is answered; the task just started has taken the
        // connections themselves back.
        let restored = self.engine.restore_sockets(actor_id, &sockets);
        if restored > 0 {
            tracing::debug!(%actor_id, generation, sockets = restored, "restoring hibernated sockets");
        }
        Ok(())
    }
}

/// The creation input as the creator sent it: JSON if it parses as JSON, CBOR otherwise.
fn input_payload(bytes: Vec<u8>) -> Payload {
    match String::from_utf8(bytes) {
        Ok(text) if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok() => {
            Payload::json(text)
        }
        Ok(text) => Payload::cbor(text.into_bytes()),
        Err(err) => Payload::cbor(err.into_bytes()),
    }
}

/// Serves tunneled requests with the runtime's routes, once it runs.
struct RuntimeTunnel {
    runtime: OnceLock<Arc<Runtime>>,
    /// The stores of the actors this envoy runs, where their hibernatable sockets are
    /// recorded.
    storage: Arc<EngineStorage>,
}

impl Tunnel for RuntimeTunnel {
    fn serves(&self, actor_id: &str) -> bool {
        self.runtime
            .get()
            .is_some_and(|runtime| runtime.serves_actor(actor_id))
    }

    fn hibernates(&self, actor_id: &str, path: &str) -> bool {
        let bare = path.split_once('?').map_or(path, |(bare, _)| bare);
        bare == "/connect"
            && self
                .runtime
                .get()
                .is_some_and(|runtime| runtime.hibernates_connections(actor_id))
    }

    fn hibernatable_opened(&self, actor_id: &str, socket: crate::storage::StoredSocket) {
        match self.storage.store_of(actor_id) {
            Some(store) => store.record_socket(&socket),
            None => {
                tracing::debug!(%actor_id, "a hibernatable socket of an actor without storage here")
            }
        }
    }

    fn hibernatable_ended(&self, actor_id: &str, gateway_id: [u8; 4], request_id: [u8; 4]) {
        if let Some(store) = self.storage.store_of(actor_id) {
            store.forget_socket(gateway_id, request_id);
        }
    }

    fn websocket(&self, actor_id: String, socket: keel_core::TunneledSocket) {
        match self.runtime.get() {
            Some(runtime) => runtime.serve_tunneled_socket(&actor_id, socket),
            None => {
                let err = Error::RegistryShuttingDown;
                let reason = format!("{}.{}", err.group(), err.code());
                socket.peer.close(1008, &reason);
            }
        }
    }

    fn fetch(&self, actor_id: String, request: TunneledRequest) -> BoxFuture<TunneledResponse> {
        let runtime = self.runtime.get().cloned();
        Box::pin(async move {
            let Some(runtime) = runtime else {
                return error_response(&Error::RegistryShuttingDown);
            };
            let mut builder = axum::http::Request::builder()
                .method(request.method.as_str())
                .uri(request.path.as_str());
            for (name, value) in &request.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            let request = match builder.body(axum::body::Body::from(request.body)) {
                Ok(request) => request,
                Err(err) => {
                    return error_response(&Error::malformed(format!(
                        "the tunneled request is not valid HTTP: {err}"
                    )))
                }
            };
            let response = runtime.handle_tunneled(&actor_id, request).await;
            let (parts, body) = response.into_parts();
            let body = match axum::body::to_bytes(body, MAX_RESPONSE_BYTES).await {
                Ok(body) => body.to_vec(),
                Err(err) => {
                    return error_response(&Error::ActorInternal {
                        message: format!("reading the response failed: {err}"),
                    })
                }
            };
            let mut headers = HashMap::new();
            for (name, value) in &parts.headers {
                if let Ok(value) = value.to_str() {
                    headers.insert(name.as_str().to_string(), value.to_string());
                }
            }
            let mut response = TunneledResponse {
                status: parts.status.as_u16(),
                headers,
                body,
            };
            if response.status == 503 && !runtime.serves_actor(&actor_id) {
                // Refused because this activation stopped (it went to sleep by itself, say,
                // and the gateway sent the request before the engine took that in): the
                // request belongs to the next activation, so the gateway is told to retry.
                tracing::debug!(%actor_id, "tunneled request refused by a stopping activation; the gateway retries it");
                return retry_response(response);
            }
            if runtime.serves_actor(&actor_id) {
                // Answered by the actor's activation here: say which actor (the client learns
                // a key's id from it). Without it the answer is keel's for an actor it does
                // not run (`actor.not_found`, say), which the client takes as the engine's.
                if response.headers.contains_key("access-control-allow-origin") {
                    // A page of an allowed origin may read it too.
                    response.headers.insert(
                        "access-control-expose-headers".to_string(),
                        ACTOR_ID_HEADER.to_string(),
                    );
                }
                response
                    .headers
                    .insert(ACTOR_ID_HEADER.to_string(), actor_id);
            }
            response
        })
    }
}
