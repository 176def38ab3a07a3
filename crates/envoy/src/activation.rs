//! Who starts and stops actors in engine mode: the engine, through start and stop commands
//! that carry a generation.
//!
//! [`Callbacks`] implements the client's `EnvoyCallbacks` and turns each command into an
//! [`EngineEvent`] on a bounded channel that the caller of [`crate::connect`] drains. The
//! client reports the actor `Running` only once the start callback returns, so a start event
//! carries a [`StartReply`] that the receiver answers once the actor can take requests; the
//! stop event carries a [`StopDone`], and the client reports `Stopped` only once that is
//! completed (teardown, including the last commit, is done).
//!
//! What must stay true: a stop is always completed, even when nobody answers (a dropped
//! [`StopDone`] completes as failed, which the engine records as a crash and handles by its
//! crash policy) because the engine otherwise waits for it up to its stop threshold (30
//! minutes by default). No protocol type leaves this crate: the reason is keel's
//! [`EngineStopReason`].

use std::collections::HashMap;
use std::sync::Arc;

use rivet_envoy_client::config::{
    ActorStopHandle, BoxFuture, EnvoyCallbacks, HttpRequest, HttpResponse, WebSocketHandler,
    WebSocketSender,
};
use rivet_envoy_client::handle::EnvoyHandle;
use rivet_envoy_client::protocol;
use tokio::sync::{mpsc, oneshot};

/// How many engine events may wait for the receiver before the envoy's callbacks wait too.
pub const MAX_PENDING_EVENTS: usize = 1024;

/// Why the engine stops an actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineStopReason {
    /// keel asked it to sleep; the data is kept and the next request starts it again.
    Sleep,
    /// keel asked for it to be destroyed.
    StopIntent,
    /// The actor was destroyed through the engine's API.
    Destroy,
    /// The envoy is draining (or the engine moves the actor); the actor is left asleep.
    GoingAway,
    /// The engine lost contact with this envoy and may already run the actor elsewhere.
    Lost,
}

impl EngineStopReason {
    fn from_protocol(reason: &protocol::StopActorReason) -> EngineStopReason {
        use protocol::StopActorReason as Reason;
        match reason {
            Reason::SleepIntent => EngineStopReason::Sleep,
            Reason::StopIntent => EngineStopReason::StopIntent,
            Reason::Destroy => EngineStopReason::Destroy,
            Reason::GoingAway => EngineStopReason::GoingAway,
            Reason::Lost => EngineStopReason::Lost,
        }
    }

    /// How keel-core's actor should stop for this reason. A lost actor is discarded without
    /// hooks: a successor may already own it, and its writes would be fenced off anyway.
    pub fn core(self) -> keel_core::StopReason {
        match self {
            EngineStopReason::Sleep => keel_core::StopReason::Sleep,
            EngineStopReason::StopIntent | EngineStopReason::Destroy => {
                keel_core::StopReason::Destroy
            }
            EngineStopReason::GoingAway => keel_core::StopReason::Shutdown,
            EngineStopReason::Lost => keel_core::StopReason::Reset,
        }
    }

    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineStopReason::Sleep => "sleep",
            EngineStopReason::StopIntent => "stop_intent",
            EngineStopReason::Destroy => "destroy",
            EngineStopReason::GoingAway => "going_away",
            EngineStopReason::Lost => "lost",
        }
    }
}

/// A command from the engine for one actor.
#[derive(Debug)]
pub enum EngineEvent {
    /// Start the actor at `generation`.
    Start {
        /// The engine's actor id.
        actor_id: String,
        /// The actor type's name.
        name: String,
        /// The canonical key string (the engine uses keel's key codec); `None` for no key.
        key: Option<String>,
        /// The activation's generation; every storage request of this activation carries it.
        generation: u32,
        /// When the engine created the actor, in epoch milliseconds.
        created_at_ms: i64,
        /// The creation input's bytes, as the creator sent them.
        input: Option<Vec<u8>>,
        /// Answer once the actor takes requests (or failed to start).
        reply: StartReply,
    },
    /// Stop the actor's activation at `generation`.
    Stop {
        /// The engine's actor id.
        actor_id: String,
        /// The activation being stopped.
        generation: u32,
        /// Why.
        reason: EngineStopReason,
        /// Complete once teardown (and its last commit) is done.
        done: StopDone,
    },
}

/// The answer to a start: the envoy reports the actor running (or failed) once it is sent.
#[derive(Debug)]
pub struct StartReply {
    /// The start callback awaits the other end; dropping this fails the start.
    tx: oneshot::Sender<keel_core::Result<()>>,
}

impl StartReply {
    /// Reports the start's outcome. A failed start is reported to the engine as a crash.
    pub fn send(self, result: keel_core::Result<()>) {
        // The callback gave up waiting only if the envoy itself is gone; nothing to tell then.
        let _ = self.tx.send(result);
    }
}

/// Completes one stop. Completing it (or dropping it) lets the envoy report `Stopped`.
pub struct StopDone {
    handle: Option<ActorStopHandle>,
}

impl std::fmt::Debug for StopDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopDone")
            .field("pending", &self.handle.is_some())
            .finish()
    }
}

impl StopDone {
    /// Teardown finished cleanly.
    pub fn complete(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.complete();
        }
    }

    /// Teardown failed; the engine records a crash.
    pub fn fail(mut self, err: &keel_core::Error) {
        if let Some(handle) = self.handle.take() {
            handle.fail(anyhow::anyhow!("{}.{}: {err}", err.group(), err.code()));
        }
    }
}

impl Drop for StopDone {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.fail(anyhow::anyhow!(
                "the actor's stop was dropped without completing"
            ));
        }
    }
}

/// An HTTP request the engine's gateway tunneled to one actor: the path is what followed
/// `/gateway/{actor}`, with the gateway's `rvt-*` query parameters removed.
#[derive(Debug)]
pub struct TunneledRequest {
    /// The HTTP method.
    pub method: String,
    /// The path and query inside the actor.
    pub path: String,
    /// The request's headers.
    pub headers: HashMap<String, String>,
    /// The whole body (streamed bodies are refused before they get here).
    pub body: Vec<u8>,
}

/// The answer to a [`TunneledRequest`], sent back through the engine whole.
#[derive(Debug)]
pub struct TunneledResponse {
    /// The HTTP status.
    pub status: u16,
    /// The response's headers.
    pub headers: HashMap<String, String>,
    /// The whole body.
    pub body: Vec<u8>,
}

/// Where tunneled requests and WebSockets go (keel's runtime, in engine mode). Without one,
/// every tunneled request is answered with keel's `request.route_not_found` and every
/// tunneled WebSocket refused.
pub trait Tunnel: Send + Sync + 'static {
    /// Serves one request for `actor_id`, an actor this envoy was told to start.
    fn fetch(&self, actor_id: String, request: TunneledRequest) -> BoxFuture<TunneledResponse>;
    /// Serves one WebSocket for `actor_id`, already open (see `socket.rs`); returns at once.
    fn websocket(&self, actor_id: String, socket: keel_core::TunneledSocket);
    /// Whether `actor_id`'s activation here takes requests now. `false` once it has begun to
    /// sleep or destroy itself (the engine's stop is on its way) or was stopped: what the
    /// gateway still sends it belongs to the actor's next activation, so it is refused in the
    /// way the gateway retries (see [`retry_response`]).
    fn serves(&self, actor_id: &str) -> bool;
    /// Whether a socket at `path` (with its query) of `actor_id`'s running activation is
    /// hibernatable: the gateway then keeps it open while the actor sleeps, and hands it back
    /// on the next start (see `socket.rs`). keel's `/connect` of a type with hibernatable
    /// connections.
    fn hibernates(&self, actor_id: &str, path: &str) -> bool;
    /// A hibernatable socket of `actor_id` opened: recorded with the actor's data, so that
    /// an activation elsewhere can name it to the envoy (which then closes it, and keel's
    /// client reconnects).
    fn hibernatable_opened(&self, actor_id: &str, socket: crate::storage::StoredSocket);
    /// A hibernatable socket of `actor_id` ended (or is of no use any more): its record goes.
    fn hibernatable_ended(&self, actor_id: &str, gateway_id: [u8; 4], request_id: [u8; 4]);
}

/// The header, and its value, by which the engine's gateway tells a response it should retry
/// (after a backoff, resolving the actor's route afresh: a sleeping actor is started again)
/// from one it passes on: a 503 carrying the gateway's own retryable error code. keel sets it
/// on a request its activation refused because that activation has begun to stop by itself,
/// so the request reaches the next activation, as the next call after a sleep does embedded.
pub const RETRY_HEADER: (&str, &str) = ("x-rivet-error", "guard.service_unavailable");

/// The header on every tunneled response that an actor's activation here answered: that
/// actor's id.
/// keel's client learns from it which actor a key resolved to on its first call by `rvt-*`
/// query, and calls that id afterwards, which spares the engine's gateway the key's
/// resolution on every call. Its absence also tells an answer of the engine (the actor is
/// gone, say) from one of the actor.
pub const ACTOR_ID_HEADER: &str = "x-keel-actor-id";

/// `response` (keel's refusal of a request for an actor this activation no longer serves)
/// marked so the gateway sends the request again, to the actor's next activation.
pub(crate) fn retry_response(mut response: TunneledResponse) -> TunneledResponse {
    response.status = 503;
    response
        .headers
        .insert(RETRY_HEADER.0.to_string(), RETRY_HEADER.1.to_string());
    response
}

/// The envoy's callbacks: forwards commands as [`EngineEvent`]s.
pub(crate) struct Callbacks {
    /// Drained by the caller of `connect`; a closed receiver fails starts and completes stops.
    events: mpsc::Sender<EngineEvent>,
    /// Serves tunneled requests; `None` answers each with a structured 404.
    tunnel: Option<Arc<dyn Tunnel>>,
    /// The tunneled sockets open through this envoy's connection (shared with the
    /// [`crate::Engine`], which hands an actor's hibernated ones back on its start).
    sockets: Arc<crate::socket::Sockets>,
}

impl Callbacks {
    pub fn new(
        tunnel: Option<Arc<dyn Tunnel>>,
        sockets: Arc<crate::socket::Sockets>,
    ) -> (Callbacks, mpsc::Receiver<EngineEvent>) {
        let (events, rx) = mpsc::channel(MAX_PENDING_EVENTS);
        (
            Callbacks {
                events,
                tunnel,
                sockets,
            },
            rx,
        )
    }
}

/// keel's JSON error body for `err`, as a tunneled response.
pub(crate) fn error_response(err: &keel_core::Error) -> TunneledResponse {
    let body = serde_json::to_vec(&err.to_body(false)).unwrap_or_default();
    let mut headers = HashMap::new();
    headers.insert("content-type".to_string(), "application/json".to_string());
    TunneledResponse {
        status: err.http_status(),
        headers,
        body,
    }
}

impl EnvoyCallbacks for Callbacks {
    fn on_actor_start(
        &self,
        _handle: EnvoyHandle,
        actor_id: String,
        generation: u32,
        config: protocol::ActorConfig,
        _preloaded_kv: Option<protocol::PreloadedKv>,
    ) -> BoxFuture<anyhow::Result<()>> {
        let events = self.events.clone();
        Box::pin(async move {
            tracing::debug!(%actor_id, generation, name = %config.name, "engine starts actor");
            let (tx, rx) = oneshot::channel();
            let event = EngineEvent::Start {
                actor_id,
                name: config.name,
                key: config.key,
                generation,
                created_at_ms: config.create_ts,
                input: config.input,
                reply: StartReply { tx },
            };
            events
                .send(event)
                .await
                .map_err(|_| anyhow::anyhow!("keel no longer takes engine events"))?;
            match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(anyhow::anyhow!("{}.{}: {err}", err.group(), err.code())),
                Err(_) => Err(anyhow::anyhow!("the actor's start was dropped unanswered")),
            }
        })
    }

    fn on_actor_stop_with_completion(
        &self,
        _handle: EnvoyHandle,
        actor_id: String,
        generation: u32,
        reason: protocol::StopActorReason,
        stop_handle: ActorStopHandle,
    ) -> BoxFuture<anyhow::Result<()>> {
        let events = self.events.clone();
        let reason = EngineStopReason::from_protocol(&reason);
        Box::pin(async move {
            tracing::debug!(%actor_id, generation, reason = reason.as_str(), "engine stops actor");
            let event = EngineEvent::Stop {
                actor_id,
                generation,
                reason,
                done: StopDone {
                    handle: Some(stop_handle),
                },
            };
            // A closed receiver drops the event, and with it `done`, which completes the stop
            // as failed: nobody is left to tear the actor down.
            let _ = events.send(event).await;
            Ok(())
        })
    }

    fn on_shutdown(&self) {
        tracing::debug!("envoy shut down");
        self.sockets.disconnected();
    }

    fn on_disconnect(&self, _handle: EnvoyHandle) {
        self.sockets.disconnected();
    }

    fn fetch(
        &self,
        _handle: EnvoyHandle,
        actor_id: String,
        _gateway_id: protocol::GatewayId,
        _request_id: protocol::RequestId,
        request: HttpRequest,
    ) -> BoxFuture<anyhow::Result<HttpResponse>> {
        let Some(tunnel) = self.tunnel.clone() else {
            let err = keel_core::Error::RouteNotFound {
                method: request.method.clone(),
                path: request.path.clone(),
            };
            tracing::debug!(%actor_id, method = %request.method, path = %request.path, "tunneled request has no route");
            return Box::pin(async move { Ok(into_http(error_response(&err))) });
        };
        Box::pin(async move {
            if request.body_stream.is_some() {
                // The gateway streams large bodies; keel takes whole bodies only, for now.
                let err = keel_core::Error::malformed("streamed request bodies are not supported");
                return Ok(into_http(error_response(&err)));
            }
            let request = TunneledRequest {
                method: request.method,
                path: request.path,
                headers: request.headers,
                body: request.body.unwrap_or_default(),
            };
            Ok(into_http(tunnel.fetch(actor_id, request).await))
        })
    }

    fn websocket(
        &self,
        handle: EnvoyHandle,
        actor_id: String,
        gateway_id: protocol::GatewayId,
        request_id: protocol::RequestId,
        _request: HttpRequest,
        path: String,
        headers: HashMap<String, String>,
        is_hibernatable: bool,
        is_restoring_hibernatable: bool,
        sender: WebSocketSender,
    ) -> BoxFuture<anyhow::Result<WebSocketHandler>> {
        let Some(tunnel) = self.tunnel.clone() else {
            tracing::debug!(%actor_id, %path, "tunneled websocket has no route");
            return Box::pin(async move { Err(anyhow::anyhow!("no websocket route for {path}")) });
        };
        let key = (gateway_id, request_id);
        if is_restoring_hibernatable {
            // A socket the actor's connection kept while it slept, handed back on its start.
            let restored =
                crate::socket::restore(self.sockets.clone(), tunnel, &actor_id, key, sender);
            return Box::pin(async move { Ok(restored) });
        }
        if !tunnel.serves(&actor_id) {
            // Refused before it opens: the gateway opens it again once the actor's next
            // activation runs, instead of handing the client a socket that closes at once.
            tracing::debug!(%actor_id, %path, "tunneled websocket for an activation that is stopping");
            return Box::pin(
                async move { Err(anyhow::anyhow!("the actor's activation is stopping")) },
            );
        }
        tracing::debug!(%actor_id, %path, hibernatable = is_hibernatable, "tunneled websocket");
        let new = crate::socket::NewSocket {
            sockets: self.sockets.clone(),
            envoy: handle,
            tunnel: tunnel.clone(),
            actor_id: actor_id.clone(),
            key,
            hibernatable: is_hibernatable,
        };
        let handler = crate::socket::handler(new, path, headers, sender, move |socket| {
            tunnel.websocket(actor_id, socket)
        });
        Box::pin(async move { Ok(handler) })
    }

    fn can_hibernate(
        &self,
        actor_id: &str,
        _gateway_id: &protocol::GatewayId,
        _request_id: &protocol::RequestId,
        request: &HttpRequest,
    ) -> BoxFuture<anyhow::Result<bool>> {
        let hibernates = self
            .tunnel
            .as_ref()
            .is_some_and(|tunnel| tunnel.hibernates(actor_id, &request.path));
        Box::pin(async move { Ok(hibernates) })
    }
}

fn into_http(response: TunneledResponse) -> HttpResponse {
    HttpResponse {
        status: response.status,
        headers: response.headers,
        body: Some(response.body),
        body_stream: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_stop_reason_maps_onto_a_core_stop() {
        use keel_core::StopReason as Core;
        let cases = [
            (protocol::StopActorReason::SleepIntent, Core::Sleep),
            (protocol::StopActorReason::StopIntent, Core::Destroy),
            (protocol::StopActorReason::Destroy, Core::Destroy),
            (protocol::StopActorReason::GoingAway, Core::Shutdown),
            (protocol::StopActorReason::Lost, Core::Reset),
        ];
        for (reason, core) in cases {
            assert_eq!(
                EngineStopReason::from_protocol(&reason).core(),
                core,
                "{reason:?}"
            );
        }
    }
}
