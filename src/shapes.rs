//! What crosses between core and JS: the napi shapes of invocations (core → JS) and
//! completions (JS → core), and their one conversion into core's types.
//!
//! Each kind of call is one variant with exactly its fields (napi structured enums, which JS
//! sees as unions discriminated by `kind`). What must stay true: every conversion of a
//! completion into core's [`Effects`] happens here, once, and a completion of the wrong kind
//! for its call is an `actor.internal_error`, never a guess.

use keel_core::kv_key::{self, KvKey, StoredKey};
use keel_core::{
    Effects, Error, KvWrite, Outbound, RawResponse, RequestHead, Schedule, ScheduleOp,
};
use napi::bindgen_prelude::{Buffer, Either};
use napi::threadsafe_function::ThreadsafeFunction;
use napi::Status;
use napi_derive::napi;

use crate::convert::ErrorInfo;

/// One call into user code, as JS receives it: one variant per kind, each with exactly its
/// fields. JS sees a union discriminated by `kind` (`start`, `action`, `stop`, `connect`,
/// `disconnect`, `request`, `ws_open`, `ws_message`, `ws_close`); every variant carries the
/// `id` that matches it to its [`Completion`] and the `actorId` it is for.
#[napi(
    discriminant = "kind",
    discriminant_case = "snake_case",
    object_from_js = false
)]
pub enum Invocation {
    /// Brings up an actor's instance.
    Start {
        id: u32,
        actor_id: String,
        /// The actor type (JS keeps it with the instance).
        actor_type: String,
        /// The key segments.
        key: Vec<String>,
        /// The last committed state; absent for a new actor.
        state: Option<Buffer>,
        /// The creation input of a new actor created with one, in `inputEncoding`.
        input: Option<Buffer>,
        /// `json` or `cbor`: how `input` is encoded (with `input` only).
        input_encoding: Option<String>,
        /// The durable connections the instance starts with (hibernatable connections).
        conns: Option<Vec<RestoredConnJs>>,
    },
    /// Runs one action.
    Action {
        id: u32,
        actor_id: String,
        /// The action's name.
        action: String,
        /// The arguments, an encoded array.
        args: Buffer,
        /// `json` or `cbor`: how `args` is encoded.
        encoding: String,
        /// `json` or `cbor`: how to encode the output.
        output_encoding: String,
        /// The connection the call came over, if any.
        conn_id: Option<String>,
        /// The HTTP request the call came with, if it came over HTTP.
        request: Option<RequestHeadJs>,
        /// The ids of the actors whose calls await this one, nearest caller last.
        chain: Vec<String>,
    },
    /// Runs the sleep or destroy hook and drops the instance.
    Stop {
        id: u32,
        actor_id: String,
        /// `sleep`, `shutdown`, `destroy` or `reset`.
        reason: String,
    },
    /// Admits a connection.
    Connect {
        id: u32,
        actor_id: String,
        conn_id: String,
        /// The connection parameters, in `encoding`.
        params: Buffer,
        /// `json` or `cbor`: how `params`, and the connection's frames, are encoded.
        encoding: String,
        /// The WebSocket upgrade request.
        request: Option<RequestHeadJs>,
    },
    /// A connection closed.
    Disconnect {
        id: u32,
        actor_id: String,
        conn_id: String,
    },
    /// A connection asks to subscribe to an event with `canSubscribe`.
    Subscribe {
        id: u32,
        actor_id: String,
        conn_id: String,
        event: String,
    },
    /// A raw HTTP request for `onRequest`.
    Request {
        id: u32,
        actor_id: String,
        method: String,
        /// The path below the actor's raw route, with the query.
        path: String,
        /// Header name and value pairs.
        headers: Vec<Vec<String>>,
        body: Buffer,
    },
    /// A raw WebSocket opened on the actor's raw route.
    WsOpen {
        id: u32,
        actor_id: String,
        socket_id: String,
        /// The path below the actor's raw route, with the query.
        path: String,
        /// The upgrade request's header name and value pairs.
        headers: Vec<Vec<String>>,
    },
    /// A message on a raw WebSocket.
    WsMessage {
        id: u32,
        actor_id: String,
        socket_id: String,
        /// The message's bytes (UTF-8 for a text message).
        data: Buffer,
        binary: bool,
    },
    /// A raw WebSocket closed.
    WsClose {
        id: u32,
        actor_id: String,
        socket_id: String,
        code: u32,
        reason: String,
    },
    /// A notice, not a call (no id, no completion): a connection was admitted to an actor
    /// whose type has no connect hook. It reaches JS just before the actor's next call.
    ConnOpened {
        actor_id: String,
        conn_id: String,
        /// The connection parameters, in `encoding`.
        params: Buffer,
        /// `json` or `cbor`: how `params`, and the connection's frames, are encoded.
        encoding: String,
    },
    /// A notice, not a call: a connection closed on an actor whose type has no
    /// `onDisconnect`. It reaches JS just before the actor's next call.
    ConnClosed { actor_id: String, conn_id: String },
}

impl Invocation {
    /// The id that matches the invocation to its completion; `None` for a notice.
    pub(crate) fn id(&self) -> Option<u32> {
        match self {
            Invocation::Start { id, .. }
            | Invocation::Action { id, .. }
            | Invocation::Stop { id, .. }
            | Invocation::Connect { id, .. }
            | Invocation::Disconnect { id, .. }
            | Invocation::Subscribe { id, .. }
            | Invocation::Request { id, .. }
            | Invocation::WsOpen { id, .. }
            | Invocation::WsMessage { id, .. }
            | Invocation::WsClose { id, .. } => Some(*id),
            Invocation::ConnOpened { .. } | Invocation::ConnClosed { .. } => None,
        }
    }
}

/// One key-value write reported by JS; no `value` means delete.
#[napi(object, object_to_js = false)]
pub struct KvWriteJs {
    /// The user's key, a string or bytes; core's KV key codec stores it.
    pub key: Either<String, Buffer>,
    pub value: Option<Buffer>,
}

/// A user's KV key from JS, as core's codec knows it.
pub fn kv_key_of(key: Either<String, Buffer>) -> KvKey {
    match key {
        Either::A(text) => KvKey::Text(text),
        Either::B(bytes) => KvKey::Bytes(bytes.to_vec()),
    }
}

/// A stored key as JS shows it: a string key as a string, anything else as bytes (a key in
/// no format the codec knows never comes from the JS host; it shows as its stored bytes).
pub fn kv_key_to_js(stored: &[u8]) -> Either<String, Buffer> {
    match kv_key::decode(stored) {
        StoredKey::Key(KvKey::Text(text)) => Either::A(text),
        StoredKey::Key(KvKey::Bytes(bytes)) => Either::B(bytes.into()),
        StoredKey::Raw(raw) => Either::B(raw.into()),
    }
}

/// Core's KV writes from what JS reported.
pub fn kv_writes(writes: Vec<KvWriteJs>) -> Vec<KvWrite> {
    writes
        .into_iter()
        .map(|write| {
            let key = kv_key::encode(&kv_key_of(write.key));
            match write.value {
                Some(value) => KvWrite::Put {
                    key,
                    value: value.to_vec(),
                },
                None => KvWrite::Delete { key },
            }
        })
        .collect()
}

/// One schedule change reported by JS, discriminated by `op`: `at` an absolute time,
/// `after` a delay that core resolves on its own clock, or `cancel`.
#[napi(
    discriminant = "op",
    discriminant_case = "snake_case",
    object_to_js = false
)]
pub enum ScheduleOpJs {
    /// `c.schedule.at`.
    At {
        id: String,
        /// When it falls due, in epoch milliseconds.
        at_ms: f64,
        action: String,
        /// The arguments as a CBOR array.
        args: Buffer,
    },
    /// `c.schedule.after`.
    After {
        id: String,
        /// How long after the call it falls due, in milliseconds.
        after_ms: f64,
        action: String,
        /// The arguments as a CBOR array.
        args: Buffer,
    },
    /// `c.schedule.cancel`.
    Cancel { id: String },
}

/// An event for connections reported by JS: to one connection (`to`) or broadcast.
/// The HTTP request behind a call or connection (`c.request`), as core hands it over: the
/// headers stay one HTTP/1 header block, which JS parses only if user code reads them.
#[napi(object, object_from_js = false)]
pub struct RequestHeadJs {
    pub method: String,
    /// The path and query string, as sent.
    pub url: String,
    /// `name: value\r\n` per header.
    pub headers: String,
}

impl From<RequestHead> for RequestHeadJs {
    fn from(head: RequestHead) -> Self {
        RequestHeadJs {
            method: head.method,
            url: head.url,
            headers: head.headers,
        }
    }
}

#[napi(object, object_to_js = false)]
pub struct OutboundJs {
    pub to: Option<String>,
    pub event: String,
    /// The data as JSON, when a JSON connection wants it.
    pub json: Option<Buffer>,
    /// The data as CBOR, when a CBOR connection wants it.
    pub cbor: Option<Buffer>,
}

/// A connection an instance starts with, restored from storage (hibernatable connections).
#[napi(object, object_from_js = false)]
pub struct RestoredConnJs {
    pub conn_id: String,
    /// The parameters the client connected with, in `encoding`.
    pub params: Buffer,
    /// `json` or `cbor`.
    pub encoding: String,
    /// `conn.state`, CBOR; absent when it has none.
    pub state: Option<Buffer>,
}

/// A connection's `conn.state` that a call changed (hibernatable connections), CBOR.
#[napi(object, object_to_js = false)]
pub struct ConnStateJs {
    pub conn_id: String,
    pub state: Buffer,
}

/// A connection JS closes, with its reason.
#[napi(object, object_to_js = false)]
pub struct DisconnectJs {
    pub conn_id: String,
    pub reason: String,
}

/// `onRequest`'s response.
#[napi(object, object_to_js = false)]
pub struct ResponseJs {
    pub status: u32,
    pub headers: Vec<Vec<String>>,
    pub body: Buffer,
}

/// What a successful call changed; every field is absent when that part did not change.
#[napi(object, object_to_js = false)]
pub struct EffectsJs {
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
    /// `conn.state` of the connections whose state changed (hibernatable connections).
    pub conn_states: Option<Vec<ConnStateJs>>,
}

/// The result of one invocation, as JS reports it, discriminated by `kind`: `ok` for a call
/// without a result (start, stop, connect, disconnect, raw socket events), `returned` for an
/// action, `responded` for a raw request, and `failed` for a call whose user code threw
/// (it then has no effects).
#[napi(
    discriminant = "kind",
    discriminant_case = "snake_case",
    object_to_js = false
)]
pub enum Completion {
    /// The call succeeded.
    Ok { id: u32, effects: Option<EffectsJs> },
    /// An action returned.
    Returned {
        id: u32,
        /// The encoded result, in the invocation's `outputEncoding`.
        output: Buffer,
        effects: Option<EffectsJs>,
    },
    /// `onRequest` answered.
    Responded {
        id: u32,
        response: ResponseJs,
        effects: Option<EffectsJs>,
    },
    /// User code failed.
    Failed { id: u32, error: ErrorInfo },
}

impl Completion {
    pub(crate) fn id(&self) -> u32 {
        match self {
            Completion::Ok { id, .. }
            | Completion::Returned { id, .. }
            | Completion::Responded { id, .. }
            | Completion::Failed { id, .. } => *id,
        }
    }
}

/// The JS function that receives batches; weak, so it never keeps Node alive by itself.
pub type DispatchFn = ThreadsafeFunction<Vec<Invocation>, (), Vec<Invocation>, Status, false, true>;

/// What a finished invocation carries back to the waiting Rust future.
pub(crate) enum Reply {
    /// The call succeeded without a result.
    Ok(Effects),
    /// An action returned its encoded output.
    Returned(Vec<u8>, Effects),
    /// `onRequest` answered.
    Responded(RawResponse, Effects),
    /// User code failed; the call has no effects.
    Failed(ErrorInfo),
}

impl Reply {
    pub(crate) fn from_completion(completion: Completion) -> Reply {
        match completion {
            Completion::Ok { effects, .. } => Reply::Ok(effects_of(effects)),
            Completion::Returned {
                output, effects, ..
            } => Reply::Returned(output.to_vec(), effects_of(effects)),
            Completion::Responded {
                response, effects, ..
            } => Reply::Responded(
                RawResponse {
                    status: u16::try_from(response.status).unwrap_or(500),
                    headers: response
                        .headers
                        .into_iter()
                        .filter_map(|pair| match <[String; 2]>::try_from(pair) {
                            Ok([name, value]) => Some((name, value)),
                            Err(_) => None,
                        })
                        .collect(),
                    body: response.body.to_vec(),
                },
                effects_of(effects),
            ),
            Completion::Failed { error, .. } => Reply::Failed(error),
        }
    }

    pub(crate) fn failed(message: String) -> Reply {
        Reply::Failed(ErrorInfo {
            group: "actor".into(),
            code: "internal_error".into(),
            message,
            metadata: None,
        })
    }

    /// The effects of a call that has no result of its own.
    pub(crate) fn effects(self, what: &str) -> Result<Effects, Error> {
        match self {
            Reply::Ok(effects) => Ok(effects),
            _ => Err(mismatched(what)),
        }
    }
}

pub(crate) fn mismatched(what: &str) -> Error {
    Error::ActorInternal {
        message: format!("the JS host answered the {what} call with the wrong kind of completion"),
    }
}

/// Core's effects from what JS reported.
pub(crate) fn effects_of(effects: Option<EffectsJs>) -> Effects {
    let Some(effects) = effects else {
        return Effects::default();
    };
    let kv = kv_writes(effects.kv.unwrap_or_default());
    let schedules = effects
        .schedules
        .unwrap_or_default()
        .into_iter()
        .map(|op| match op {
            ScheduleOpJs::At {
                id,
                at_ms,
                action,
                args,
            } => ScheduleOp::Add(Schedule {
                id,
                at_ms: at_ms as i64,
                action,
                args: args.to_vec(),
            }),
            ScheduleOpJs::After {
                id,
                after_ms,
                action,
                args,
            } => ScheduleOp::After {
                id,
                // A negative delay is due now; `as` saturates and maps NaN to 0.
                delay_ms: after_ms.max(0.0) as u64,
                action,
                args: args.to_vec(),
            },
            ScheduleOpJs::Cancel { id } => ScheduleOp::Cancel { id },
        })
        .collect();
    let messages = effects
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
    let disconnects = effects
        .disconnects
        .unwrap_or_default()
        .into_iter()
        .map(|d| (d.conn_id, d.reason))
        .collect();
    Effects {
        state: effects.state.map(|b| b.to_vec()),
        kv,
        schedules,
        sleep: effects.sleep.unwrap_or(false),
        destroy: effects.destroy.unwrap_or(false),
        messages,
        disconnects,
        conn_states: effects
            .conn_states
            .unwrap_or_default()
            .into_iter()
            .map(|conn| (conn.conn_id, conn.state.to_vec()))
            .collect(),
    }
}
