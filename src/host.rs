//! Core's [`Host`] implemented by calling JS.
//!
//! Every call into user code (start, action, stop) becomes an [`Invocation`]. Invocations are
//! queued and sent to JS in batches, one threadsafe-function call per batch, and JS reports
//! results back in batches through `CoreRegistry.complete`. So a burst of actions across many
//! actors costs one JS↔Rust hop each way, not one per action. A batch call returns as soon as
//! JS has started the invocations, so a slow action never holds up the others in its batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::{
    ActionCall, ActionDone, ActorInfo, ConnectRequest, Effects, Encoding, Error, Host, KvWrite,
    Outbound, Payload, RawRequest, RawResponse, RawSocketEvent, Schedule, ScheduleOp, StartRequest,
    StopReason,
};
use napi::bindgen_prelude::Buffer;
use napi::threadsafe_function::ThreadsafeFunction;
use napi::Status;
use napi_derive::napi;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::convert::ErrorInfo;
use crate::logging::{ActorSpans, HostCall};

/// The most invocations sent to JS in one call.
const MAX_BATCH_LEN: usize = 1024;

/// One call into user code, as JS receives it.
#[napi(object)]
pub struct Invocation {
    /// Matches the invocation to its [`Completion`].
    pub id: u32,
    /// `start`, `action` or `stop`.
    pub kind: String,
    /// The actor's id.
    pub actor_id: String,
    /// The actor type (on `start` only; JS keeps it with the instance).
    pub actor_type: Option<String>,
    /// The key segments (on `start` only).
    pub key: Option<Vec<String>>,
    /// The action name (on `action`).
    pub action: Option<String>,
    /// The arguments, an encoded array (on `action`).
    pub args: Option<Buffer>,
    /// `json` or `cbor`: how `args` (or `input`) is encoded.
    pub encoding: Option<String>,
    /// `json` or `cbor`: how to encode the output (on `action`).
    pub output_encoding: Option<String>,
    /// The last committed state (on `start`, when the actor has one).
    pub state: Option<Buffer>,
    /// The creation input (on `start` of a new actor created with one), in `encoding`.
    pub input: Option<Buffer>,
    /// Why the instance stops (on `stop`: `sleep`, `shutdown`, `destroy` or `reset`), or the
    /// close reason (on `ws_close`).
    pub reason: Option<String>,
    /// The connection (on `connect`, `disconnect`, and `action` over a connection).
    pub conn_id: Option<String>,
    /// The connection parameters (on `connect`), in `encoding`.
    pub params: Option<Buffer>,
    /// The HTTP method (on `request`).
    pub method: Option<String>,
    /// The path below the actor's raw route, with the query (on `request`, `ws_open`).
    pub path: Option<String>,
    /// Header name and value pairs (on `request`, `ws_open`).
    pub headers: Option<Vec<Vec<String>>>,
    /// The request body (on `request`) or message data (on `ws_message`).
    pub body: Option<Buffer>,
    /// The raw socket (on `ws_open`, `ws_message`, `ws_close`).
    pub socket_id: Option<String>,
    /// Whether the message is binary (on `ws_message`).
    pub binary: Option<bool>,
    /// The close code (on `ws_close`).
    pub code: Option<u32>,
}

/// One key-value write reported by JS; no `value` means delete.
#[napi(object)]
pub struct KvWriteJs {
    pub key: Buffer,
    pub value: Option<Buffer>,
}

/// One schedule change reported by JS: an add (with `atMs`, `action`, `args`) or a cancel.
#[napi(object)]
pub struct ScheduleOpJs {
    pub id: String,
    /// When it falls due, in epoch milliseconds; absent for a cancel.
    pub at_ms: Option<f64>,
    pub action: Option<String>,
    /// The arguments as a CBOR array.
    pub args: Option<Buffer>,
}

/// An event for connections reported by JS: to one connection (`to`) or broadcast.
#[napi(object)]
pub struct OutboundJs {
    pub to: Option<String>,
    pub event: String,
    /// The data as JSON, when a JSON connection wants it.
    pub json: Option<Buffer>,
    /// The data as CBOR, when a CBOR connection wants it.
    pub cbor: Option<Buffer>,
}

/// A connection JS closes, with its reason.
#[napi(object)]
pub struct DisconnectJs {
    pub conn_id: String,
    pub reason: String,
}

/// `onRequest`'s response.
#[napi(object)]
pub struct ResponseJs {
    pub status: u32,
    pub headers: Vec<Vec<String>>,
    pub body: Buffer,
}

/// The result of one invocation, as JS reports it.
#[napi(object)]
pub struct Completion {
    /// The invocation's id.
    pub id: u32,
    /// The encoded result (on `action`).
    pub output: Option<Buffer>,
    /// The new state, when it changed.
    pub state: Option<Buffer>,
    /// Key-value writes, in order.
    pub kv: Option<Vec<KvWriteJs>>,
    /// Schedule changes, in order.
    pub schedules: Option<Vec<ScheduleOpJs>>,
    /// User code asked to sleep.
    pub sleep: Option<bool>,
    /// User code asked to be destroyed.
    pub destroy: Option<bool>,
    /// Events for connections.
    pub messages: Option<Vec<OutboundJs>>,
    /// Connections to close.
    pub disconnects: Option<Vec<DisconnectJs>>,
    /// The response (on `request`).
    pub response: Option<ResponseJs>,
    /// Set when user code failed; the call then has no effects.
    pub error: Option<ErrorInfo>,
}

/// The JS function that receives batches; weak, so it never keeps Node alive by itself.
pub type DispatchFn = ThreadsafeFunction<Vec<Invocation>, (), Vec<Invocation>, Status, false, true>;

/// What a finished invocation carries back to the waiting Rust future.
struct Reply {
    output: Option<Vec<u8>>,
    effects: Effects,
    response: Option<RawResponse>,
    error: Option<ErrorInfo>,
}

impl Reply {
    fn from_completion(completion: Completion) -> Reply {
        let kv = completion
            .kv
            .unwrap_or_default()
            .into_iter()
            .map(|write| match write.value {
                Some(value) => KvWrite::Put {
                    key: write.key.to_vec(),
                    value: value.to_vec(),
                },
                None => KvWrite::Delete {
                    key: write.key.to_vec(),
                },
            })
            .collect();
        let schedules = completion
            .schedules
            .unwrap_or_default()
            .into_iter()
            .map(|op| match (op.at_ms, op.action, op.args) {
                (Some(at_ms), Some(action), Some(args)) => ScheduleOp::Add(Schedule {
                    id: op.id,
                    at_ms: at_ms as i64,
                    action,
                    args: args.to_vec(),
                }),
                _ => ScheduleOp::Cancel { id: op.id },
            })
            .collect();
        let messages = completion
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|message| Outbound {
                to: message.to,
                event: message.event,
                json: message.json.map(|b| b.to_vec()),
                cbor: message.cbor.map(|b| b.to_vec()),
            })
            .collect();
        let disconnects = completion
            .disconnects
            .unwrap_or_default()
            .into_iter()
            .map(|d| (d.conn_id, d.reason))
            .collect();
        Reply {
            output: completion.output.map(|b| b.to_vec()),
            effects: Effects {
                state: completion.state.map(|b| b.to_vec()),
                kv,
                schedules,
                sleep: completion.sleep.unwrap_or(false),
                destroy: completion.destroy.unwrap_or(false),
                messages,
                disconnects,
            },
            response: completion.response.map(|r| RawResponse {
                status: u16::try_from(r.status).unwrap_or(500),
                headers: r
                    .headers
                    .into_iter()
                    .filter_map(|pair| match <[String; 2]>::try_from(pair) {
                        Ok([name, value]) => Some((name, value)),
                        Err(_) => None,
                    })
                    .collect(),
                body: r.body.to_vec(),
            }),
            error: completion.error,
        }
    }

    fn failed(message: String) -> Reply {
        Reply {
            output: None,
            effects: Effects::default(),
            response: None,
            error: Some(ErrorInfo {
                group: "actor".into(),
                code: "internal_error".into(),
                message,
                metadata: None,
            }),
        }
    }
}

/// Calls JS for core.
pub struct JsHost {
    /// Batches leave through this function; JS answers through [`JsHost::complete`].
    dispatch: Arc<DispatchFn>,
    /// Waiting invocations by id; the entry is removed on completion or when the waiter
    /// gives up (a timeout drops it).
    pending: Mutex<HashMap<u32, oneshot::Sender<Reply>>>,
    next_id: AtomicU32,
    /// Feeds the batching task; the task ends when this sender is dropped with the host.
    queue: mpsc::UnboundedSender<Invocation>,
    /// The receiving end, until the batching task takes it on first use.
    queue_rx: Mutex<Option<mpsc::UnboundedReceiver<Invocation>>>,
    started: AtomicBool,
    /// Each live actor's current span, for lines its user code logs.
    pub spans: ActorSpans,
}

impl JsHost {
    /// A host that sends batches to `dispatch`.
    pub fn new(dispatch: DispatchFn) -> Arc<JsHost> {
        let (queue, queue_rx) = mpsc::unbounded_channel();
        Arc::new(JsHost {
            dispatch: Arc::new(dispatch),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            queue,
            queue_rx: Mutex::new(Some(queue_rx)),
            started: AtomicBool::new(false),
            spans: ActorSpans::default(),
        })
    }

    /// Takes completions reported by JS and wakes their waiters.
    pub fn complete(&self, completions: Vec<Completion>) {
        let mut pending = self.pending.lock();
        for completion in completions {
            if let Some(waiter) = pending.remove(&completion.id) {
                // The waiter may have timed out since; its result is no longer wanted.
                let _ = waiter.send(Reply::from_completion(completion));
            }
        }
    }

    fn ensure_batcher(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(rx) = self.queue_rx.lock().take() else {
            return;
        };
        let host = Arc::downgrade(self);
        let dispatch = self.dispatch.clone();
        // Its own span: the batcher serves every actor, so it must not inherit the identity
        // of whichever actor happened to start it.
        let span = tracing::debug_span!(parent: None, "js_batcher");
        tokio::spawn(tracing::Instrument::instrument(
            run_batcher(rx, dispatch, host),
            span,
        ));
    }

    async fn invoke(self: &Arc<Self>, invocation: Invocation) -> Result<Reply, Error> {
        self.ensure_batcher();
        let id = invocation.id;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let _guard = PendingGuard { host: self, id };
        self.queue
            .send(invocation)
            .map_err(|_| Error::RegistryShutDown)?;
        rx.await.map_err(|_| Error::ActorInternal {
            message: "the JS host dropped the invocation".into(),
        })
    }

    fn invocation(&self, kind: &str, actor: &ActorInfo) -> Invocation {
        Invocation {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            kind: kind.to_string(),
            actor_id: actor.id.to_string(),
            actor_type: None,
            key: None,
            action: None,
            args: None,
            encoding: None,
            output_encoding: None,
            state: None,
            input: None,
            reason: None,
            conn_id: None,
            params: None,
            method: None,
            path: None,
            headers: None,
            body: None,
            socket_id: None,
            binary: None,
            code: None,
        }
    }
}

/// Removes a waiter's entry when it stops waiting, whether it got a reply or not.
struct PendingGuard<'a> {
    host: &'a JsHost,
    id: u32,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.host.pending.lock().remove(&self.id);
    }
}

/// Sends queued invocations to JS, one batch per call. While a call is in flight, new
/// invocations accumulate into the next batch.
async fn run_batcher(
    mut rx: mpsc::UnboundedReceiver<Invocation>,
    dispatch: Arc<DispatchFn>,
    host: std::sync::Weak<JsHost>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_LEN {
            match rx.try_recv() {
                Ok(invocation) => batch.push(invocation),
                Err(_) => break,
            }
        }
        let ids: Vec<u32> = batch.iter().map(|invocation| invocation.id).collect();
        if let Err(err) = dispatch.call_async_catch(batch).await {
            tracing::error!(error = %err, invocations = ids.len(), "dispatching to JS failed");
            let Some(host) = host.upgrade() else { return };
            let mut pending = host.pending.lock();
            for id in ids {
                if let Some(waiter) = pending.remove(&id) {
                    // The waiter may have given up already.
                    let _ = waiter.send(Reply::failed(format!("dispatching to JS failed: {err}")));
                }
            }
        }
    }
}

fn check(reply: Reply, what: &str) -> Result<Reply, Error> {
    match reply.error {
        Some(info) => {
            let err = info.into_error();
            if let Error::ActorInternal { message } = &err {
                tracing::warn!(call = what, error = %message, "user code threw");
            }
            Err(err)
        }
        None => Ok(reply),
    }
}

/// The host core holds: the JS host behind an `Arc`, which the binding keeps too.
pub struct SharedHost(pub Arc<JsHost>);

#[async_trait]
impl Host for SharedHost {
    async fn start(
        &self,
        actor: &Arc<ActorInfo>,
        request: StartRequest,
    ) -> keel_core::Result<Effects> {
        let span = self.0.spans.enter(actor, HostCall::Start);
        let mut invocation = self.0.invocation("start", actor);
        invocation.actor_type = Some(actor.name.to_string());
        invocation.key = Some(actor.key.clone());
        invocation.state = request.state.map(Buffer::from);
        if let Some(input) = request.input {
            invocation.encoding = Some(input.encoding.as_str().to_string());
            invocation.input = Some(Buffer::from(input.bytes));
        }
        let reply = check(self.0.invoke(invocation).await?, "start")?;
        span.started();
        Ok(reply.effects)
    }

    async fn action(
        &self,
        actor: &Arc<ActorInfo>,
        call: ActionCall,
    ) -> keel_core::Result<ActionDone> {
        let _span = self.0.spans.enter(actor, HostCall::Action);
        let mut invocation = self.0.invocation("action", actor);
        invocation.action = Some(call.action);
        invocation.encoding = Some(call.args.encoding.as_str().to_string());
        invocation.args = Some(Buffer::from(call.args.bytes));
        invocation.output_encoding = Some(call.output.as_str().to_string());
        invocation.conn_id = call.conn_id;
        let reply = check(self.0.invoke(invocation).await?, "action")?;
        let output = match call.output {
            Encoding::Json => Payload::json(
                reply
                    .output
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                    .unwrap_or_else(|| "null".to_string()),
            ),
            Encoding::Cbor => Payload::cbor(reply.output.unwrap_or_else(|| vec![0xf7])),
        };
        Ok(ActionDone {
            output,
            effects: reply.effects,
        })
    }

    async fn stop(&self, actor: &Arc<ActorInfo>, reason: StopReason) -> keel_core::Result<Effects> {
        let _span = self.0.spans.enter(actor, HostCall::Stop);
        let mut invocation = self.0.invocation("stop", actor);
        invocation.reason = Some(reason.as_str().to_string());
        let reply = check(self.0.invoke(invocation).await?, "stop")?;
        Ok(reply.effects)
    }

    async fn connect(
        &self,
        actor: &Arc<ActorInfo>,
        request: ConnectRequest,
    ) -> keel_core::Result<Effects> {
        let mut invocation = self.0.invocation("connect", actor);
        invocation.conn_id = Some(request.conn_id);
        invocation.encoding = Some(request.params.encoding.as_str().to_string());
        invocation.params = Some(Buffer::from(request.params.bytes));
        let reply = check(self.0.invoke(invocation).await?, "connect")?;
        Ok(reply.effects)
    }

    async fn disconnect(
        &self,
        actor: &Arc<ActorInfo>,
        conn_id: &str,
    ) -> keel_core::Result<Effects> {
        let mut invocation = self.0.invocation("disconnect", actor);
        invocation.conn_id = Some(conn_id.to_string());
        let reply = check(self.0.invoke(invocation).await?, "disconnect")?;
        Ok(reply.effects)
    }

    async fn request(
        &self,
        actor: &Arc<ActorInfo>,
        request: RawRequest,
    ) -> keel_core::Result<(RawResponse, Effects)> {
        let mut invocation = self.0.invocation("request", actor);
        invocation.method = Some(request.method);
        invocation.path = Some(request.path);
        invocation.headers = Some(pairs(request.headers));
        invocation.body = Some(Buffer::from(request.body));
        let reply = check(self.0.invoke(invocation).await?, "request")?;
        let response = reply.response.ok_or_else(|| Error::ActorInternal {
            message: "onRequest returned no Response".into(),
        })?;
        Ok((response, reply.effects))
    }

    async fn raw_socket(
        &self,
        actor: &Arc<ActorInfo>,
        event: RawSocketEvent,
    ) -> keel_core::Result<Effects> {
        let invocation = match event {
            RawSocketEvent::Open {
                socket_id,
                path,
                headers,
            } => {
                let mut invocation = self.0.invocation("ws_open", actor);
                invocation.socket_id = Some(socket_id);
                invocation.path = Some(path);
                invocation.headers = Some(pairs(headers));
                invocation
            }
            RawSocketEvent::Message {
                socket_id,
                data,
                binary,
            } => {
                let mut invocation = self.0.invocation("ws_message", actor);
                invocation.socket_id = Some(socket_id);
                invocation.body = Some(Buffer::from(data));
                invocation.binary = Some(binary);
                invocation
            }
            RawSocketEvent::Close {
                socket_id,
                code,
                reason,
            } => {
                let mut invocation = self.0.invocation("ws_close", actor);
                invocation.socket_id = Some(socket_id);
                invocation.code = Some(u32::from(code));
                invocation.reason = Some(reason);
                invocation
            }
        };
        let reply = check(self.0.invoke(invocation).await?, "websocket")?;
        Ok(reply.effects)
    }
}

fn pairs(headers: Vec<(String, String)>) -> Vec<Vec<String>> {
    headers
        .into_iter()
        .map(|(name, value)| vec![name, value])
        .collect()
}
