//! The seam between core and whatever runs user code.
//!
//! Core never sees JS. It asks a [`Host`] to start an actor's instance, run an action, and stop
//! the instance; the binding implements this trait by calling JS, and core's own tests
//! implement it in Rust. State crosses the seam as opaque bytes whose encoding the host
//! chooses (keel's JS host uses CBOR); action arguments and results cross as a [`Payload`] in
//! the encoding the client used.
//!
//! Everything user code changes during one call (state, KV, schedules, and requests to sleep
//! or be destroyed) comes back as one [`Effects`] value, which core commits atomically with the
//! call's output. A call that fails has no effects.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;

/// Who an actor is. Shared by the actor's task and every call it makes into the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorInfo {
    /// Stable generated id.
    pub id: Arc<str>,
    /// Actor type name.
    pub name: Arc<str>,
    /// Key segments.
    pub key: Vec<String>,
    /// Canonical key string (see `key.rs`).
    pub key_string: String,
}

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// UTF-8 JSON text.
    #[default]
    Json,
    /// CBOR, with keel's tags for JS types (see docs/protocol.md).
    Cbor,
}

impl Encoding {
    /// The name used across the seam and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Cbor => "cbor",
        }
    }

    /// Parses [`Encoding::as_str`]'s output.
    pub fn parse(name: &str) -> Option<Encoding> {
        match name {
            "json" => Some(Encoding::Json),
            "cbor" => Some(Encoding::Cbor),
            _ => None,
        }
    }
}

/// Encoded bytes and their encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// How `bytes` are encoded.
    pub encoding: Encoding,
    /// The encoded value.
    pub bytes: Vec<u8>,
}

impl Payload {
    /// A JSON payload.
    pub fn json(text: impl Into<String>) -> Payload {
        Payload {
            encoding: Encoding::Json,
            bytes: text.into().into_bytes(),
        }
    }

    /// A CBOR payload.
    pub fn cbor(bytes: Vec<u8>) -> Payload {
        Payload {
            encoding: Encoding::Cbor,
            bytes,
        }
    }
}

/// One change to an actor's key-value store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvWrite {
    /// Sets `key` to `value`.
    Put {
        /// The key, as the host encoded it.
        key: Vec<u8>,
        /// The value, as the host encoded it.
        value: Vec<u8>,
    },
    /// Removes `key`.
    Delete {
        /// The key, as the host encoded it.
        key: Vec<u8>,
    },
}

/// A durable schedule: run `action` with `args` at `at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Unique id, chosen by the host.
    pub id: String,
    /// When it falls due, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The action to run.
    pub action: String,
    /// Its arguments, as a CBOR array.
    pub args: Vec<u8>,
}

/// One change to an actor's schedules, as a host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleOp {
    /// Adds a schedule due at an absolute time (`c.schedule.at`).
    Add(Schedule),
    /// Adds a schedule due `delay_ms` after the call, on core's clock (`c.schedule.after`):
    /// core resolves it to an absolute time when it takes the call's effects, so the time a
    /// schedule is stamped with and the clock that fires it are the same clock.
    After {
        /// Unique id, chosen by the host.
        id: String,
        /// How long after the call it falls due, in milliseconds.
        delay_ms: u64,
        /// The action to run.
        action: String,
        /// Its arguments, as a CBOR array.
        args: Vec<u8>,
    },
    /// Cancels a schedule by id (no error if it already ran or never existed).
    Cancel {
        /// The schedule's id.
        id: String,
    },
}

impl ScheduleOp {
    /// The change as committed, with an `After` resolved against `now_ms`, core's clock when
    /// it takes the call's effects.
    pub fn resolve(self, now_ms: i64) -> ScheduleWrite {
        match self {
            ScheduleOp::Add(schedule) => ScheduleWrite::Add(schedule),
            ScheduleOp::After {
                id,
                delay_ms,
                action,
                args,
            } => ScheduleWrite::Add(Schedule {
                id,
                at_ms: now_ms.saturating_add(i64::try_from(delay_ms).unwrap_or(i64::MAX)),
                action,
                args,
            }),
            ScheduleOp::Cancel { id } => ScheduleWrite::Cancel { id },
        }
    }
}

/// One change to an actor's schedules as core commits it: every time is absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleWrite {
    /// Adds (or replaces) a schedule.
    Add(Schedule),
    /// Cancels a schedule by id.
    Cancel {
        /// The schedule's id.
        id: String,
    },
}

/// An event for connected clients, encoded by the host once per encoding in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// One connection's id (`conn.send`), or `None` for every subscribed connection
    /// (`c.broadcast`).
    pub to: Option<String>,
    /// The event name.
    pub event: String,
    /// The data as JSON, for JSON connections.
    pub json: Option<Vec<u8>>,
    /// The data as CBOR, for CBOR connections.
    pub cbor: Option<Vec<u8>>,
}

/// Everything one call into user code changed, committed atomically with its output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// The actor's new state, if it changed.
    pub state: Option<Vec<u8>>,
    /// Key-value writes, in order.
    pub kv: Vec<KvWrite>,
    /// Schedule changes, in order.
    pub schedules: Vec<ScheduleOp>,
    /// User code asked the actor to sleep after this call.
    pub sleep: bool,
    /// User code asked the actor to be destroyed after this call.
    pub destroy: bool,
    /// Events for connections, sent once the rest is durable.
    pub messages: Vec<Outbound>,
    /// Connections to close once the rest is durable: (connection id, reason).
    pub disconnects: Vec<(String, String)>,
    /// `conn.state` of each connection whose state the call changed, in the host's state
    /// encoding: (connection id, state). Only types with hibernatable connections report
    /// them; core commits them with the rest, so a connection's state is durable before the
    /// call's reply leaves.
    pub conn_states: Vec<(String, Vec<u8>)>,
}

impl Effects {
    /// Whether committing these effects writes anything to the database.
    pub fn writes(&self) -> bool {
        self.state.is_some()
            || !self.kv.is_empty()
            || !self.schedules.is_empty()
            || !self.conn_states.is_empty()
    }
}

/// A client asks to connect.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The connection's id, unique within the process.
    pub conn_id: String,
    /// The connection parameters the client sent, in `params.encoding`.
    pub params: Payload,
    /// The WebSocket upgrade request (`c.request` in `onBeforeConnect` and `createConnState`).
    pub request: Option<RequestHead>,
}

/// Who is calling: the method, URL and headers of the HTTP request a call came with, or of a
/// connection's WebSocket upgrade (`c.request` in JS). Calls over a connection and scheduled
/// calls have none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestHead {
    /// The HTTP method.
    pub method: String,
    /// The path and query string, as the client sent them.
    pub url: String,
    /// The headers as one HTTP/1 header block, `name: value\r\n` per header in the order
    /// received, names lowercase. One string rather than a list of pairs: every HTTP call
    /// carries it, and most never read it, so it should cost one allocation, not two per
    /// header; the host parses it only when user code asks.
    pub headers: String,
}

/// A raw HTTP request for the actor's `onRequest`.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// The HTTP method.
    pub method: String,
    /// The path below the actor's raw route, with the query string.
    pub path: String,
    /// The request's headers, in order, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The whole request body.
    pub body: Vec<u8>,
}

/// The actor's raw HTTP response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The response's headers, in order.
    pub headers: Vec<(String, String)>,
    /// The whole response body.
    pub body: Vec<u8>,
}

/// Something that happened on a raw WebSocket handed to the actor's `onWebSocket`.
#[derive(Debug, Clone)]
pub enum RawSocketEvent {
    /// A socket opened on the actor's raw route.
    Open {
        /// The socket's id, unique within the process.
        socket_id: String,
        /// The path below the actor's raw WebSocket route, with the query string.
        path: String,
        /// The upgrade request's headers, in order.
        headers: Vec<(String, String)>,
    },
    /// A message arrived.
    Message {
        /// The socket's id.
        socket_id: String,
        /// The message's bytes (UTF-8 for a text message).
        data: Vec<u8>,
        /// Whether it was a binary message rather than text.
        binary: bool,
    },
    /// The socket closed.
    Close {
        /// The socket's id.
        socket_id: String,
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
}

/// Asks the host to bring up an actor's instance.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// The last committed state, or `None` for a new actor: the host then creates the state
    /// (from `input`) and runs its create hook.
    pub state: Option<Vec<u8>>,
    /// The creation input, present only for a new actor that was created with one.
    pub input: Option<Payload>,
    /// The durable connections the instance starts with (`c.conns`), for a type with
    /// hibernatable connections: those that stayed open while it slept, and those that may
    /// still resume after a restart. Their connect hooks do not run again.
    pub conns: Vec<RestoredConn>,
}

/// A connection an instance starts with, restored from storage.
#[derive(Debug, Clone)]
pub struct RestoredConn {
    /// The connection's id.
    pub conn_id: String,
    /// The parameters the client connected with.
    pub params: Payload,
    /// `conn.state` in the host's state encoding, if it has one.
    pub state: Option<Vec<u8>>,
}

/// One action call.
#[derive(Debug, Clone)]
pub struct ActionCall {
    /// The action's name.
    pub action: String,
    /// The arguments, an array in `args.encoding`.
    pub args: Payload,
    /// The encoding the caller wants the output in.
    pub output: Encoding,
    /// The connection the call came over, if any (`c.conn` in JS).
    pub conn_id: Option<String>,
    /// The HTTP request the call came with, if it came over HTTP (`c.request` in JS).
    pub request: Option<RequestHead>,
    /// The ids of the actors whose calls are awaiting this one, nearest caller last; empty
    /// for a call from a client or a schedule. A call to any of them would wait on a mailbox
    /// that this call is holding, so it fails with `actor.call_cycle` instead.
    pub chain: Vec<String>,
}

/// The result of one action.
#[derive(Debug, Clone)]
pub struct ActionDone {
    /// The return value.
    pub output: Payload,
    /// What the action changed.
    pub effects: Effects,
}

/// Why an instance is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// It was idle for its sleep timeout, or asked to sleep; the next message wakes it.
    Sleep,
    /// The registry is shutting down gracefully.
    Shutdown,
    /// It asked to be destroyed: its state, KV and schedules are deleted after the hook.
    Destroy,
    /// An action timed out and may still be running: discard the instance without hooks;
    /// core starts a fresh one from committed state.
    Reset,
}

impl StopReason {
    /// The name used across the seam and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Sleep => "sleep",
            StopReason::Shutdown => "shutdown",
            StopReason::Destroy => "destroy",
            StopReason::Reset => "reset",
        }
    }
}

/// Runs user code on core's behalf. Every call may fail with a `user` error (a `UserError`
/// thrown by user code) or `actor.internal_error`; a failed call has no effects.
#[async_trait]
pub trait Host: Send + Sync + 'static {
    /// Brings up the instance of `actor`: creates the state of a new actor (running its
    /// create hook) and runs the wake hook.
    async fn start(&self, actor: &Arc<ActorInfo>, request: StartRequest) -> Result<Effects>;

    /// Runs one action on a started instance.
    async fn action(&self, actor: &Arc<ActorInfo>, call: ActionCall) -> Result<ActionDone>;

    /// Runs the sleep (or destroy) hook and tears the instance down.
    async fn stop(&self, actor: &Arc<ActorInfo>, reason: StopReason) -> Result<Effects>;

    /// Admits a connection (`onBeforeConnect`, `createConnState`, `onConnect`); an error
    /// rejects it.
    async fn connect(&self, actor: &Arc<ActorInfo>, request: ConnectRequest) -> Result<Effects> {
        let _ = (actor, request);
        Err(unsupported("connections"))
    }

    /// A connection closed (`onDisconnect`).
    async fn disconnect(&self, actor: &Arc<ActorInfo>, conn_id: &str) -> Result<Effects> {
        let _ = (actor, conn_id);
        Err(unsupported("connections"))
    }

    /// A connection asks to subscribe to `event`, which the type guards (see
    /// [`ActorType::guarded_events`](crate::actor_type::ActorType::guarded_events)): the
    /// event's `canSubscribe`. An error refuses the subscription (`auth.forbidden` for a plain
    /// "no"); the connection stays open.
    async fn can_subscribe(
        &self,
        actor: &Arc<ActorInfo>,
        conn_id: &str,
        event: &str,
    ) -> Result<Effects> {
        let _ = (actor, conn_id, event);
        Err(unsupported("guarded events"))
    }

    /// A connection was admitted to an actor whose type has no connect hook (see
    /// [`Hooks`](crate::actor_type::Hooks)): no user code runs, and core does not wait. The
    /// host must know of it before its next call for `actor` (for `c.conns`).
    fn connected(&self, actor: &Arc<ActorInfo>, request: ConnectRequest) {
        let _ = (actor, request);
    }

    /// A connection closed on an actor whose type has no `onDisconnect`: no user code runs,
    /// and core does not wait. The host must know of it before its next call for `actor`.
    fn disconnected(&self, actor: &Arc<ActorInfo>, conn_id: &str) {
        let _ = (actor, conn_id);
    }

    /// Answers a raw HTTP request (`onRequest`).
    async fn request(
        &self,
        actor: &Arc<ActorInfo>,
        request: RawRequest,
    ) -> Result<(RawResponse, Effects)> {
        let _ = (actor, request);
        Err(unsupported("raw requests"))
    }

    /// Delivers a raw WebSocket event (`onWebSocket`).
    async fn raw_socket(&self, actor: &Arc<ActorInfo>, event: RawSocketEvent) -> Result<Effects> {
        let _ = (actor, event);
        Err(unsupported("raw WebSockets"))
    }

    /// How this host encodes state and KV values, so that tools showing them (the inspector)
    /// can say so. keel's JS host uses CBOR.
    fn state_encoding(&self) -> Encoding {
        Encoding::Cbor
    }
}

fn unsupported(what: &str) -> crate::error::Error {
    crate::error::Error::ActorInternal {
        message: format!("this host does not support {what}"),
    }
}
