//! WebSocket connections: keel's connection protocol and raw sockets.
//!
//! Each socket is served by two tracked tasks: a reader, which decodes messages and turns
//! them into actor commands, and a writer, which drains a bounded outgoing queue onto the
//! socket. Actors never write to a socket directly: they push frames through a
//! [`ConnHandle`]. If a client stops reading and its queue passes the bound, the connection
//! is closed (1013, "try again later") instead of slowing the actor or other clients.
//!
//! An idle socket must stay cheap, since a server holds thousands of them: its buffers start
//! small and grow with the traffic (see [`READ_BUFFER_BYTES`]), and what both tasks and the
//! actor share is one allocation whose outgoing queue holds nothing until a frame is queued.
//!
//! One connection's frames leave in the order the actor produced them. The actor queues a
//! call's events, then its reply (a `ReplySlot`), then any close the call asked for, all in
//! the release of the call's commit, on the writer's thread; replies also keep call order
//! when one is made before its call reaches the actor. A close leaves after what was queued
//! before it.
//!
//! The protocol (docs/protocol.md): the client's first message is `init` (key or actor id,
//! mode, input, params, subscriptions); then `call`, `sub` and `unsub`. The server answers
//! `ready` or `error`, `reply` per call, and `event`s. Text frames carry JSON and binary frames CBOR;
//! the `init` frame picks the connection's encoding.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use parking_lot::RwLock;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::actor::{Command, Reply};
use crate::cbor;
use crate::error::{Error, Result};
use crate::host::{
    ActionCall, ActorInfo, Encoding, Outbound, Payload, RawSocketEvent, RequestHead,
};
use crate::runtime::{Core, Resolve, Target};

/// The most frames one connection may have queued.
pub const MAX_OUTGOING_FRAMES: usize = 1024;
/// The most bytes one connection may have queued before it counts as a slow consumer.
pub const MAX_OUTGOING_BYTES: usize = 4 * 1024 * 1024;
/// The read buffer a socket starts with, and the most one read asks of the kernel.
/// tungstenite allocates this buffer when the socket opens and zero-fills it on the first
/// read, so all of it stays resident for as long as the socket is open, idle or not (its
/// default, 128 KiB, made up nearly all of an idle socket's memory). A message larger than it
/// grows it to the message's size, up to the message limit; small frames, keel's usual
/// traffic, fit as they are.
pub(crate) const READ_BUFFER_BYTES: usize = 4 * 1024;
/// How much tungstenite buffers before it writes to the socket: nothing. The writer task
/// sends and flushes one queued frame at a time, so the outgoing queue is the only real
/// buffer; tungstenite's holds one frame at a time, allocated on demand (it keeps the
/// capacity of the largest frame it has written).
pub(crate) const WRITE_BUFFER_BYTES: usize = 0;
/// How long a new socket may take to send `init`.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing socket gets to flush its close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Close codes keel uses.
pub mod close {
    /// Normal closure (`conn.disconnect`, destroy).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Undecodable data in a message.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A protocol violation or a rejected connection.
    pub const POLICY: u16 = 1008;
    /// A message larger than the limit.
    pub const TOO_BIG: u16 = 1009;
    /// The actor's instance was reset (an action timed out); reconnecting is fine.
    pub const INTERNAL: u16 = 1011;
    /// A slow consumer whose outgoing queue overflowed.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// The actor's side of one socket: push frames, close it. Cloneable.
#[derive(Clone)]
pub(crate) struct ConnHandle {
    /// The connection's id.
    pub(crate) id: Arc<str>,
    /// The encoding of the connection's frames.
    pub(crate) encoding: Encoding,
    /// What the socket's two tasks and the actor share.
    shared: Arc<Shared>,
}

/// The state of one socket, shared by its reader, its writer and every handle.
struct Shared {
    /// Frames queued and not yet written; the writer task takes them in order.
    outgoing: parking_lot::Mutex<Outgoing>,
    /// Notified when a frame is queued; the writer task waits on it when the queue is empty.
    queued: Notify,
    /// Events this connection subscribed to; the reader updates it.
    subscriptions: RwLock<HashSet<String>>,
    /// Cancelled to close the connection; carries the close frame to send.
    closing: Closing,
    /// Holds back a call's reply until the replies of the calls sent before it have left.
    replies: parking_lot::Mutex<ReplyOrder>,
}

/// The outgoing queue: bounded by [`MAX_OUTGOING_FRAMES`] and [`MAX_OUTGOING_BYTES`], empty
/// and unallocated while the socket is idle.
#[derive(Default)]
struct Outgoing {
    frames: VecDeque<Message>,
    /// Bytes of the queued frames and of the frame being written.
    bytes: usize,
    /// Set when the writer task has ended: nothing more is queued, as nothing would be written.
    ended: bool,
}

/// Held by the writer task: when the task ends, however it ends, the queue refuses further
/// frames and lets go of those it holds.
struct WriterEnded(ConnHandle);

impl Drop for WriterEnded {
    fn drop(&mut self) {
        let mut outgoing = self.0.shared.outgoing.lock();
        outgoing.ended = true;
        outgoing.frames = VecDeque::new();
    }
}

/// A drained queue with room for more frames than this gives its memory back.
const KEPT_QUEUE_CAPACITY: usize = 16;

/// The connection's replies in call order. The reader numbers each call as it reads it; a
/// reply whose turn has not come yet (an error made before the call reached the actor, while
/// an earlier call still runs) waits here and leaves right after the reply before it.
#[derive(Default)]
struct ReplyOrder {
    /// The number of the call whose reply leaves next.
    next: u64,
    /// Replies that are ready before their turn, by call number.
    waiting: BTreeMap<u64, Message>,
}

/// A close request shared by both tasks of a socket.
struct Closing {
    token: CancellationToken,
    frame: parking_lot::Mutex<Option<CloseFrame>>,
    /// Whether queued frames go out before the close frame (not for a slow consumer).
    flush: std::sync::atomic::AtomicBool,
}

impl ConnHandle {
    fn new(id: Arc<str>, encoding: Encoding) -> ConnHandle {
        ConnHandle {
            id,
            encoding,
            shared: Arc::new(Shared {
                outgoing: parking_lot::Mutex::default(),
                queued: Notify::new(),
                subscriptions: RwLock::new(HashSet::new()),
                closing: Closing {
                    token: CancellationToken::new(),
                    frame: parking_lot::Mutex::new(None),
                    flush: std::sync::atomic::AtomicBool::new(true),
                },
                replies: parking_lot::Mutex::default(),
            }),
        }
    }

    fn closing(&self) -> &Closing {
        &self.shared.closing
    }

    /// Queues the reply of call number `seq` once every earlier call's reply has been queued.
    /// Frames are queued under the lock, so replies released on different threads still
    /// enter the outgoing queue in call order.
    fn push_reply(&self, seq: u64, frame: Message) {
        let mut order = self.shared.replies.lock();
        if seq != order.next {
            order.waiting.insert(seq, frame);
            return;
        }
        self.push(frame);
        let ReplyOrder { next, waiting } = &mut *order;
        *next += 1;
        while let Some(frame) = waiting.remove(next) {
            self.push(frame);
            *next += 1;
        }
    }

    /// Queues a frame. A client too slow to keep its queue under the bound is closed, as is
    /// one whose writer task has ended.
    pub(crate) fn push(&self, frame: Message) {
        let len = frame_len(&frame);
        let mut outgoing = self.shared.outgoing.lock();
        if !outgoing.ended
            && outgoing.bytes + len <= MAX_OUTGOING_BYTES
            && outgoing.frames.len() < MAX_OUTGOING_FRAMES
        {
            outgoing.bytes += len;
            outgoing.frames.push_back(frame);
            drop(outgoing);
            self.shared.queued.notify_one();
            return;
        }
        drop(outgoing);
        if !self.closing().token.is_cancelled() {
            tracing::debug!(conn_id = %self.id, "slow consumer; closing the connection");
            self.closing().flush.store(false, Ordering::Release);
            self.close(
                close::TRY_AGAIN_LATER,
                "slow consumer: outgoing buffer full",
            );
        }
    }

    /// Takes the next queued frame, if any; its bytes count as queued until [`Self::sent`].
    fn take_queued(&self) -> Option<Message> {
        self.shared.outgoing.lock().frames.pop_front()
    }

    /// Waits for the next queued frame and takes it (writer task only).
    async fn next_queued(&self) -> Message {
        loop {
            if let Some(frame) = self.take_queued() {
                return frame;
            }
            // A frame queued since the check above left a permit, so this returns at once.
            self.shared.queued.notified().await;
        }
    }

    /// Records that a taken frame of `len` bytes was written; a drained queue that grew
    /// for a burst gives its memory back.
    fn sent(&self, len: usize) {
        let mut outgoing = self.shared.outgoing.lock();
        outgoing.bytes -= len;
        if outgoing.frames.is_empty() && outgoing.frames.capacity() > KEPT_QUEUE_CAPACITY {
            outgoing.frames = VecDeque::new();
        }
    }

    /// Adds `event` to what the connection hears.
    pub(crate) fn subscribe(&self, event: String) {
        self.shared.subscriptions.write().insert(event);
    }

    /// Removes `event` from what the connection hears.
    pub(crate) fn unsubscribe(&self, event: &str) {
        self.shared.subscriptions.write().remove(event);
    }

    /// Tells the client its subscription to `event` was refused: an `error` frame carrying
    /// the event's name, which leaves the connection open.
    pub(crate) fn refuse_subscription(&self, event: &str, err: &Error, dev: bool) {
        let value = serde_json::json!({ "t": "error", "event": event, "error": err.to_body(dev) });
        self.push(value_frame(self.encoding, &value));
    }

    /// Closes the connection with `code` and `reason` (once; later calls are ignored), after
    /// the frames already queued.
    pub(crate) fn close(&self, code: u16, reason: &str) {
        let mut frame = self.closing().frame.lock();
        if frame.is_none() {
            *frame = Some(CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            });
        }
        drop(frame);
        self.closing().token.cancel();
    }

    /// The code and reason the connection was closed with, once `close` has been called.
    fn close_frame(&self) -> (u16, String) {
        self.closing()
            .frame
            .lock()
            .as_ref()
            .map_or((close::GOING_AWAY, String::new()), |f| {
                (f.code, f.reason.to_string())
            })
    }

    /// Whether the connection wants `event`.
    fn subscribed(&self, event: &str) -> bool {
        self.shared.subscriptions.read().contains(event)
    }

    /// Sends a raw WebSocket message (raw sockets only).
    pub(crate) fn send_raw(&self, data: Vec<u8>, binary: bool) -> Result<()> {
        if self.closing().token.is_cancelled() {
            return Err(Error::ActorStopped);
        }
        let frame = if binary {
            Message::Binary(data.into())
        } else {
            let text = String::from_utf8(data)
                .map_err(|_| Error::malformed("a text message must be UTF-8"))?;
            Message::Text(text.into())
        };
        self.push(frame);
        Ok(())
    }
}

/// The promise of one call's reply on a connection. The actor answers it in the release of
/// the call's commit, right after the call's events and before any close the call caused, so
/// one connection's frames leave in the order the actor produced them. Dropped unanswered (the
/// command was lost with a task that died), it answers `actor.stopped`, so the replies of
/// later calls are never held up behind it.
pub(crate) struct ReplySlot {
    conn: ConnHandle,
    /// The call's number on this connection, in the order the reader read the calls.
    seq: u64,
    /// The `id` the client gave the call.
    id: u64,
    /// Whether error messages are shown in full.
    dev: bool,
    answered: bool,
}

impl ReplySlot {
    /// Queues the call's `reply` frame (in its turn).
    pub(crate) fn answer(mut self, result: Result<Payload>) {
        self.answered = true;
        self.queue(result);
    }

    fn queue(&self, result: Result<Payload>) {
        let encoding = self.conn.encoding;
        let frame = match result {
            Ok(payload) => reply_frame(encoding, self.id, &payload.bytes),
            Err(err) => error_frame(encoding, Some(self.id), &err, self.dev),
        };
        self.conn.push_reply(self.seq, frame);
    }
}

impl Drop for ReplySlot {
    fn drop(&mut self) {
        if !self.answered {
            self.queue(Err(Error::ActorStopped));
        }
    }
}

fn frame_len(frame: &Message) -> usize {
    match frame {
        Message::Text(text) => text.len(),
        Message::Binary(data) => data.len(),
        _ => 0,
    }
}

/// Sends events to connections: each `to` connection, or every subscribed one. Frames are
/// built once per encoding and shared.
pub(crate) fn deliver(conns: &[ConnHandle], messages: &[Outbound]) {
    for message in messages {
        let mut json = None;
        let mut cbor = None;
        for conn in conns {
            let wanted = match &message.to {
                Some(id) => **id == *conn.id,
                None => conn.subscribed(&message.event),
            };
            if !wanted {
                continue;
            }
            let frame = match conn.encoding {
                Encoding::Json => json
                    .get_or_insert_with(|| event_frame(Encoding::Json, message))
                    .clone(),
                Encoding::Cbor => cbor
                    .get_or_insert_with(|| event_frame(Encoding::Cbor, message))
                    .clone(),
            };
            if let Some(frame) = frame {
                conn.push(frame);
            }
        }
    }
}

fn event_frame(encoding: Encoding, message: &Outbound) -> Option<Message> {
    match encoding {
        Encoding::Json => {
            let data = message.json.as_deref()?;
            let mut text = String::with_capacity(data.len() + message.event.len() + 32);
            text.push_str(r#"{"t":"event","event":"#);
            text.push_str(&serde_json::to_string(&message.event).ok()?);
            text.push_str(r#","data":"#);
            text.push_str(std::str::from_utf8(data).ok()?);
            text.push('}');
            Some(Message::Text(text.into()))
        }
        Encoding::Cbor => {
            let data = message.cbor.as_deref()?;
            let mut out = Vec::with_capacity(data.len() + message.event.len() + 24);
            cbor::write_head(&mut out, 5, 3);
            cbor::write_text(&mut out, "t");
            cbor::write_text(&mut out, "event");
            cbor::write_text(&mut out, "event");
            cbor::write_text(&mut out, &message.event);
            cbor::write_text(&mut out, "data");
            out.extend_from_slice(data);
            Some(Message::Binary(out.into()))
        }
    }
}

/// `{"t":"ready",...}` for a connection.
pub(crate) fn ready_frame(encoding: Encoding, actor_id: &str, conn_id: &str) -> Message {
    let value = serde_json::json!({ "t": "ready", "actorId": actor_id, "connId": conn_id });
    value_frame(encoding, &value)
}

fn error_frame(encoding: Encoding, id: Option<u64>, err: &Error, dev: bool) -> Message {
    let mut value = serde_json::json!({ "t": if id.is_some() { "reply" } else { "error" }, "error": err.to_body(dev) });
    if let Some(id) = id {
        value["id"] = id.into();
    }
    value_frame(encoding, &value)
}

fn value_frame(encoding: Encoding, value: &serde_json::Value) -> Message {
    match encoding {
        Encoding::Json => Message::Text(value.to_string().into()),
        Encoding::Cbor => {
            let mut out = Vec::new();
            cbor::write_json(&mut out, value);
            Message::Binary(out.into())
        }
    }
}

fn reply_frame(encoding: Encoding, id: u64, output: &[u8]) -> Message {
    match encoding {
        Encoding::Json => {
            let mut text = format!(r#"{{"t":"reply","id":{id},"output":"#);
            text.push_str(&String::from_utf8_lossy(output));
            text.push('}');
            Message::Text(text.into())
        }
        Encoding::Cbor => {
            let mut out = Vec::with_capacity(output.len() + 24);
            cbor::write_head(&mut out, 5, 3);
            cbor::write_text(&mut out, "t");
            cbor::write_text(&mut out, "reply");
            cbor::write_text(&mut out, "id");
            cbor::write_head(&mut out, 0, id);
            cbor::write_text(&mut out, "output");
            out.extend_from_slice(output);
            Message::Binary(out.into())
        }
    }
}

/// One decoded client message.
enum ClientMessage {
    Init {
        /// The actor by key (ignored when `actor_id` is set).
        key: Vec<String>,
        /// The actor by id, for clients that hold an id rather than a key.
        actor_id: Option<String>,
        mode: Resolve,
        input: Option<Payload>,
        params: Payload,
        subscriptions: Vec<String>,
    },
    Call {
        id: u64,
        action: String,
        args: Payload,
    },
    Subscribe(String),
    Unsubscribe(String),
}

#[derive(Deserialize)]
struct JsonMessage<'a> {
    t: String,
    #[serde(default)]
    key: Option<Vec<String>>,
    #[serde(default, rename = "actorId")]
    actor_id: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(default)]
    subs: Option<Vec<String>>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    action: Option<String>,
    #[serde(borrow, default)]
    args: Option<&'a RawValue>,
    #[serde(default)]
    event: Option<String>,
}

fn parse_mode(mode: Option<&str>) -> Result<Resolve> {
    match mode {
        None | Some("getOrCreate") => Ok(Resolve::GetOrCreate),
        Some("get") => Ok(Resolve::Get),
        Some("create") => Ok(Resolve::Create),
        Some(other) => Err(Error::malformed(format!("unknown mode {other:?}"))),
    }
}

impl ClientMessage {
    fn parse(frame: &Message, encoding: Encoding) -> Result<ClientMessage> {
        match (frame, encoding) {
            (Message::Text(text), Encoding::Json) => Self::parse_json(text.as_bytes()),
            (Message::Binary(data), Encoding::Cbor) => Self::parse_cbor(data),
            _ => Err(Error::malformed(
                "a connection's messages keep the encoding of its init message",
            )),
        }
    }

    fn parse_json(bytes: &[u8]) -> Result<ClientMessage> {
        let message: JsonMessage = serde_json::from_slice(bytes)
            .map_err(|err| Error::malformed(format!("invalid JSON message: {err}")))?;
        let missing = |field: &str| Error::malformed(format!("the message needs {field:?}"));
        Ok(match message.t.as_str() {
            "init" => ClientMessage::Init {
                key: match (message.key, &message.actor_id) {
                    (Some(key), _) => key,
                    (None, Some(_)) => Vec::new(),
                    (None, None) => return Err(missing("key")),
                },
                actor_id: message.actor_id,
                mode: parse_mode(message.mode.as_deref())?,
                input: message.input.map(|raw| Payload::json(raw.get())),
                params: Payload::json(message.params.map_or("null", RawValue::get)),
                subscriptions: message.subs.unwrap_or_default(),
            },
            "call" => {
                let args = message.args.map_or("[]", RawValue::get);
                if !args.trim_start().starts_with('[') {
                    return Err(Error::malformed("\"args\" must be an array"));
                }
                ClientMessage::Call {
                    id: message.id.ok_or_else(|| missing("id"))?,
                    action: message.action.ok_or_else(|| missing("action"))?,
                    args: Payload::json(args),
                }
            }
            "sub" => ClientMessage::Subscribe(message.event.ok_or_else(|| missing("event"))?),
            "unsub" => ClientMessage::Unsubscribe(message.event.ok_or_else(|| missing("event"))?),
            other => return Err(Error::malformed(format!("unknown message type {other:?}"))),
        })
    }

    fn parse_cbor(bytes: &[u8]) -> Result<ClientMessage> {
        let mut t = None;
        let mut key = None;
        let mut actor_id = None;
        let mut mode = None;
        let mut input = None;
        let mut params = None;
        let mut subs = Vec::new();
        let mut id = None;
        let mut action = None;
        let mut args = None;
        let mut event = None;
        for (name, range) in cbor::map_entries(bytes)? {
            let at = range.start;
            match name.as_str() {
                "t" => t = Some(cbor::text(bytes, at)?),
                "key" => key = Some(cbor::text_array(bytes, at)?),
                "actorId" => actor_id = Some(cbor::text(bytes, at)?),
                "mode" => mode = Some(cbor::text(bytes, at)?),
                "input" => input = Some(Payload::cbor(bytes[range].to_vec())),
                "params" => params = Some(Payload::cbor(bytes[range].to_vec())),
                "subs" => subs = cbor::text_array(bytes, at)?,
                "id" => id = Some(cbor::uint(bytes, at)?),
                "action" => action = Some(cbor::text(bytes, at)?),
                "args" if cbor::is_array(bytes, at) => {
                    args = Some(Payload::cbor(bytes[range].to_vec()))
                }
                "args" => return Err(Error::malformed("\"args\" must be an array")),
                "event" => event = Some(cbor::text(bytes, at)?),
                _ => {}
            }
        }
        let missing = |field: &str| Error::malformed(format!("the message needs {field:?}"));
        Ok(match t.as_deref() {
            Some("init") => ClientMessage::Init {
                key: match (key, &actor_id) {
                    (Some(key), _) => key,
                    (None, Some(_)) => Vec::new(),
                    (None, None) => return Err(missing("key")),
                },
                actor_id,
                mode: parse_mode(mode.as_deref())?,
                input,
                params: params.unwrap_or_else(|| Payload::cbor(vec![0xf6])),
                subscriptions: subs,
            },
            Some("call") => ClientMessage::Call {
                id: id.ok_or_else(|| missing("id"))?,
                action: action.ok_or_else(|| missing("action"))?,
                args: args.unwrap_or_else(|| Payload::cbor(vec![0x80])),
            },
            Some("sub") => ClientMessage::Subscribe(event.ok_or_else(|| missing("event"))?),
            Some("unsub") => ClientMessage::Unsubscribe(event.ok_or_else(|| missing("event"))?),
            Some(other) => return Err(Error::malformed(format!("unknown message type {other:?}"))),
            None => return Err(missing("t")),
        })
    }
}

/// Splits a socket into a writer task (tracked) and returns the reader half and the handle.
fn split(
    core: &Arc<Core>,
    socket: WebSocket,
    id: Arc<str>,
    encoding: Encoding,
    span: tracing::Span,
) -> (futures_util::stream::SplitStream<WebSocket>, ConnHandle) {
    let (mut sink, stream) = socket.split();
    let handle = ConnHandle::new(id, encoding);
    // The writer's own handle keeps the shared state alive; the task ends on a close, a
    // forced drain or a failed write, never because the other handles are gone.
    let writer_handle = handle.clone();
    let force = core.force.clone();
    core.tracker.spawn(
        async move {
            let _ended = WriterEnded(writer_handle.clone());
            let closing = writer_handle.closing().token.clone();
            loop {
                tokio::select! {
                    // A close request outranks queued frames: a slow consumer must not hold it up.
                    biased;
                    _ = closing.cancelled() => break,
                    // A forced drain drops the socket.
                    _ = force.cancelled() => return,
                    // The next queued frame.
                    frame = writer_handle.next_queued() => {
                        let len = frame_len(&frame);
                        let sent = tokio::select! {
                            // The frame was taken from the queue, so it goes out unless the
                            // write is abandoned: a close right after a reply keeps the reply.
                            biased;
                            sent = sink.send(frame) => sent,
                            // Closing while a write is stuck on a client that does not read.
                            _ = abandon_write(writer_handle.closing()) => break,
                        };
                        writer_handle.sent(len);
                        if sent.is_err() {
                            return;
                        }
                    }
                }
            }
            // Cloned, not taken: a raw socket's close listener is told the same code.
            let frame = writer_handle.closing().frame.lock().clone();
            let flush = writer_handle.closing().flush.load(Ordering::Acquire);
            let finish = async {
                // What was queued before the close (an error, a last event) goes first.
                while let Some(queued) = flush.then(|| writer_handle.take_queued()).flatten() {
                    if sink.send(queued).await.is_err() {
                        return;
                    }
                }
                // The peer may already be gone.
                let _ = sink.send(Message::Close(frame)).await;
            };
            // A peer that never reads gets no more than the close timeout.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, finish).await;
        }
        .instrument(span),
    );
    (stream, handle)
}

/// Resolves when a write in progress should be given up: once the connection closes, at once
/// for a slow consumer (whose queue is dropped anyway), otherwise after the close timeout.
async fn abandon_write(closing: &Closing) {
    closing.token.cancelled().await;
    if closing.flush.load(Ordering::Acquire) {
        tokio::time::sleep(CLOSE_TIMEOUT).await;
    }
}

/// Serves one socket of keel's connection protocol for actor type `name`.
pub(crate) async fn serve_keel_socket(
    core: Arc<Core>,
    socket: WebSocket,
    name: String,
    upgrade: RequestHead,
) {
    let dev = core.config.dev;
    let mut socket = socket;
    // The first message names the actor and fixes the encoding.
    let first = tokio::select! {
        // The drain began before the client introduced itself: just drop the socket.
        biased;
        _ = core.stop.cancelled() => return,
        // The init message, within its timeout.
        // Boxed: see below.
        first = Box::pin(tokio::time::timeout(INIT_TIMEOUT, socket.recv())) => first,
    };
    let first = match first {
        Ok(Some(Ok(frame))) => frame,
        Ok(Some(Err(err))) => {
            let (code, reason) = classify_read_error(&err);
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                })))
                .await;
            return;
        }
        Ok(None) => return,
        Err(_) => {
            let frame = CloseFrame {
                code: close::POLICY,
                reason: "no init message".into(),
            };
            let _ = socket.send(Message::Close(Some(frame))).await;
            return;
        }
    };
    let encoding = match first {
        Message::Binary(_) => Encoding::Cbor,
        _ => Encoding::Json,
    };
    let init = ClientMessage::parse(&first, encoding);
    let (key, actor_id, mode, input, params, subscriptions) = match init {
        Ok(ClientMessage::Init {
            key,
            actor_id,
            mode,
            input,
            params,
            subscriptions,
        }) => (key, actor_id, mode, input, params, subscriptions),
        Ok(_) => {
            return Box::pin(reject(
                socket,
                encoding,
                &Error::malformed("the first message must be init"),
                dev,
            ))
            .await
        }
        Err(err) => return Box::pin(reject(socket, encoding, &err, dev)).await,
    };
    let target = match actor_id {
        Some(id) => Target::Id(id),
        None => Target::Key {
            name: name.clone(),
            key,
            mode,
            input,
        },
    };
    // Boxed, as every large step of a socket's task: the task's future is as large as its
    // largest state and lives as long as the socket, so steps that run once (resolving the
    // actor, admitting the connection) or briefly (a call) take heap only while they run.
    let info = match Box::pin(crate::runtime::resolve_on(&core, target)).await {
        // An id names one actor of one type: another type's actor is not found on this route.
        Ok(info) if *info.name != *name => {
            return Box::pin(reject(socket, encoding, &Error::ActorNotFound, dev)).await
        }
        Ok(info) => info,
        Err(err) => return Box::pin(reject(socket, encoding, &err, dev)).await,
    };
    let actor_type = match core.types.get(&info.name) {
        Ok(actor_type) => actor_type.clone(),
        Err(err) => return Box::pin(reject(socket, encoding, &err, dev)).await,
    };
    let conn_id: Arc<str> = Arc::from(format!("{:016x}", rand::random::<u64>()));
    let span = tracing::debug_span!(parent: &crate::actor::ActorTask::span(&info), "connection", conn_id = %conn_id);
    let (mut stream, conn) = split(&core, socket, conn_id.clone(), encoding, span.clone());
    // Events the type guards with `canSubscribe` are asked for once the connection is in.
    let (checked, free): (Vec<String>, Vec<String>) = subscriptions
        .into_iter()
        .partition(|event| actor_type.guarded_events.contains(event));
    conn.shared.subscriptions.write().extend(free);

    async {
        // Listed before it is admitted: the actor sends `ready` itself, so a client that has
        // heard `ready` must already find its connection in the inspector and the gauge. A
        // rejected connection leaves the list when this guard drops.
        let _listed = core
            .connections
            .open(info.id.clone(), inspector_info(&core, &conn));
        let accepted = Box::pin(connect(&core, &info, &conn, params, upgrade)).await;
        if let Err(err) = accepted {
            tracing::debug!(error = %err, "connection rejected");
            conn.push(error_frame(encoding, None, &err, dev));
            conn.close(close::POLICY, "connection rejected");
            return;
        }
        tracing::debug!("connection open");
        for event in checked {
            Box::pin(subscribe(&core, &info, &conn, event, true)).await;
        }
        read_loop(&core, &info, &conn, &mut stream, &actor_type.guarded_events).await;
        // Tell the actor, whichever way the socket ended, unless it has already left: a
        // stopping actor forgets its connections itself, and must not be woken for this.
        if let Some(handle) = core.live_handle(&info.id) {
            // The actor may be stopping; then it has forgotten the connection already.
            let _ = handle.send(Command::Disconnect {
                conn_id: conn.id.clone(),
            });
        }
        tracing::debug!("connection closed");
    }
    .instrument(span)
    .await;
}

/// What the inspector shows of a connection. Its params are left out: they often carry
/// credentials.
fn inspector_info(core: &Core, conn: &ConnHandle) -> crate::inspector::ConnectionInfo {
    /// The details of every connection of an encoding, allocated once and shared.
    static DETAILS: std::sync::LazyLock<[Arc<serde_json::Value>; 2]> =
        std::sync::LazyLock::new(|| {
            [Encoding::Json, Encoding::Cbor]
                .map(|encoding| Arc::new(serde_json::json!({ "encoding": encoding.as_str() })))
        });
    let details = match conn.encoding {
        Encoding::Json => &DETAILS[0],
        Encoding::Cbor => &DETAILS[1],
    };
    crate::inspector::ConnectionInfo {
        id: conn.id.to_string(),
        opened_at_ms: core.clock.now_ms(),
        details: details.clone(),
    }
}

async fn reject(mut socket: WebSocket, encoding: Encoding, err: &Error, dev: bool) {
    let _ = socket.send(error_frame(encoding, None, err, dev)).await;
    let frame = CloseFrame {
        code: close::POLICY,
        reason: Utf8Bytes::from(format!("{}.{}", err.group(), err.code())),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
}

/// Asks the actor (waking it if needed) to admit the connection.
async fn connect(
    core: &Arc<Core>,
    info: &Arc<ActorInfo>,
    conn: &ConnHandle,
    params: Payload,
    upgrade: RequestHead,
) -> Result<()> {
    let (reply, rx) = oneshot::channel();
    let command = Command::Connect {
        conn: conn.clone(),
        params,
        request: Some(upgrade),
        reply,
    };
    core.deliver(info, command).await?;
    rx.await.map_err(|_| Error::ActorStopped)?
}

async fn read_loop(
    core: &Arc<Core>,
    info: &Arc<ActorInfo>,
    conn: &ConnHandle,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    guarded: &HashSet<String>,
) {
    let dev = core.config.dev;
    // The number of the next call, for the order of replies.
    let mut seq = 0;
    loop {
        let next = tokio::select! {
            // Closed by the actor, the server, or a slow-consumer overflow.
            biased;
            _ = conn.closing().token.cancelled() => return,
            // The next message from the client.
            next = stream.next() => next,
        };
        let frame = match next {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => {
                let (code, reason) = classify_read_error(&err);
                conn.close(code, &reason);
                return;
            }
            None => return,
        };
        if matches!(frame, Message::Close(_)) {
            return;
        }
        if matches!(frame, Message::Ping(_) | Message::Pong(_)) {
            continue;
        }
        match ClientMessage::parse(&frame, conn.encoding) {
            Ok(ClientMessage::Call { id, action, args }) => {
                let reply = ReplySlot {
                    conn: conn.clone(),
                    seq,
                    id,
                    dev,
                    answered: false,
                };
                seq += 1;
                // Boxed: see `serve_keel_socket`.
                Box::pin(call(core, info, reply, action, args)).await;
            }
            Ok(ClientMessage::Subscribe(event)) if guarded.contains(&event) => {
                Box::pin(subscribe(core, info, conn, event, true)).await;
            }
            Ok(ClientMessage::Unsubscribe(event)) if guarded.contains(&event) => {
                Box::pin(subscribe(core, info, conn, event, false)).await;
            }
            Ok(ClientMessage::Subscribe(event)) => conn.subscribe(event),
            Ok(ClientMessage::Unsubscribe(event)) => conn.unsubscribe(&event),
            Ok(ClientMessage::Init { .. }) => {
                conn.push(error_frame(
                    conn.encoding,
                    None,
                    &Error::malformed("init was already sent"),
                    dev,
                ));
                conn.close(close::POLICY, "init was already sent");
                return;
            }
            Err(err) => {
                conn.push(error_frame(conn.encoding, None, &err, dev));
                let code = if matches!(err, Error::RequestMalformed { .. }) {
                    close::POLICY
                } else {
                    close::INVALID_PAYLOAD
                };
                conn.close(code, "malformed message");
                return;
            }
        }
    }
}

/// Hands a (un)subscription of a guarded event to the actor, behind the connection's earlier
/// calls. If the actor cannot take it (overloaded, stopping), the subscription is refused with
/// that error.
async fn subscribe(
    core: &Arc<Core>,
    info: &Arc<ActorInfo>,
    conn: &ConnHandle,
    event: String,
    subscribe: bool,
) {
    let command = Command::Subscribe {
        conn: conn.clone(),
        event,
        subscribe,
    };
    if let Err(failed) = core.deliver_or_return(info, command).await {
        if let (err, Command::Subscribe { event, .. }) = *failed {
            conn.refuse_subscription(&event, &err, core.config.dev);
        }
    }
}

/// Runs one action for a connection. The call enters the actor's mailbox before the reader
/// takes the next message, so one connection's calls run in the order it sent them; the actor
/// answers `reply` when the call's commit is released, so reading goes on meanwhile.
async fn call(
    core: &Arc<Core>,
    info: &Arc<ActorInfo>,
    reply: ReplySlot,
    action: String,
    args: Payload,
) {
    if let Err(err) = core
        .types
        .get(&info.name)
        .and_then(|t| t.check_action(&action))
    {
        return reply.answer(Err(err));
    }
    let call = ActionCall {
        action,
        args,
        output: reply.conn.encoding,
        conn_id: Some(reply.conn.id.to_string()),
        request: None,
    };
    let command = Command::Action {
        call,
        reply: Reply::Conn(reply),
    };
    if let Err(failed) = core.deliver_or_return(info, command).await {
        if let (err, Command::Action { reply, .. }) = *failed {
            reply.send(Err(err));
        }
    }
}

/// The close code and reason for a socket whose read failed, chosen by the WebSocket
/// library's error variant (axum's error wraps tungstenite's): a message past the size limit
/// is 1009, a text message that is not UTF-8 is 1007, any other framing failure is 1008.
fn classify_read_error(err: &axum::Error) -> (u16, String) {
    use tungstenite::error::{CapacityError, Error as WsError};
    let ws_error = std::error::Error::source(err).and_then(|inner| inner.downcast_ref::<WsError>());
    match ws_error {
        Some(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
            (close::TOO_BIG, "message too big".to_string())
        }
        Some(WsError::Utf8(_)) => (close::INVALID_PAYLOAD, "invalid UTF-8".to_string()),
        _ => (close::POLICY, "protocol error".to_string()),
    }
}

/// Serves a raw WebSocket handed to the actor's `onWebSocket`.
pub(crate) async fn serve_raw_socket(
    core: Arc<Core>,
    socket: WebSocket,
    info: Arc<ActorInfo>,
    path: String,
    headers: Vec<(String, String)>,
) {
    let socket_id: Arc<str> = Arc::from(format!("{:016x}", rand::random::<u64>()));
    let span = tracing::debug_span!(parent: &crate::actor::ActorTask::span(&info), "raw_socket", socket_id = %socket_id);
    let (mut stream, conn) = split(
        &core,
        socket,
        socket_id.clone(),
        Encoding::Json,
        span.clone(),
    );
    async {
        core.raw_sockets
            .lock()
            .insert(socket_id.clone(), conn.clone());
        let open = RawSocketEvent::Open {
            socket_id: socket_id.to_string(),
            path,
            headers,
        };
        // Boxed, so the socket's idle task does not keep room for it: see `serve_keel_socket`.
        if let Err(err) = Box::pin(raw_event(&core, &info, Some(conn.clone()), open)).await {
            tracing::debug!(error = %err, "raw socket refused");
            conn.close(close::POLICY, &format!("{}.{}", err.group(), err.code()));
        } else {
            let (code, reason) = loop {
                let next = tokio::select! {
                    // Closed by user code or the actor stopping.
                    biased;
                    _ = conn.closing().token.cancelled() => break conn.close_frame(),
                    // The next message from the peer.
                    next = stream.next() => next,
                };
                let (data, binary) = match next {
                    Some(Ok(Message::Text(text))) => (text.as_bytes().to_vec(), false),
                    Some(Ok(Message::Binary(data))) => (data.to_vec(), true),
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame.map_or((close::NORMAL, String::new()), |f| {
                            (f.code, f.reason.to_string())
                        });
                        // Answers the peer's close, so the writer ends and the peer is not
                        // left waiting for its close timeout.
                        conn.close(code, &reason);
                        break (code, reason);
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(err)) => {
                        let (code, reason) = classify_read_error(&err);
                        conn.close(code, &reason);
                        break (code, reason);
                    }
                    None => break (1006, String::new()),
                };
                let message = RawSocketEvent::Message {
                    socket_id: socket_id.to_string(),
                    data,
                    binary,
                };
                if let Err(err) = raw_event_live(&core, &info, message).await {
                    tracing::debug!(error = %err, "delivering a raw message failed");
                }
            };
            let closed = RawSocketEvent::Close {
                socket_id: socket_id.to_string(),
                code,
                reason,
            };
            // The actor may be stopping; then it runs the close listeners itself.
            let _ = raw_event_live(&core, &info, closed).await;
        }
        core.raw_sockets.lock().remove(&socket_id);
    }
    .instrument(span)
    .await;
}

/// Delivers a raw socket's message or close to the actor's live task, never waking it: the
/// socket is open only while its actor is awake, and a stopping actor closes its sockets and
/// runs their close listeners itself, so an actor that went to sleep stays asleep.
async fn raw_event_live(
    core: &Arc<Core>,
    info: &Arc<ActorInfo>,
    event: RawSocketEvent,
) -> Result<()> {
    let handle = core.live_handle(&info.id).ok_or(Error::ActorStopped)?;
    let (reply, rx) = oneshot::channel();
    let command = Command::RawSocket {
        event,
        socket: None,
        reply,
    };
    handle.send(command)?;
    rx.await.map_err(|_| Error::ActorStopped)?
}

/// Delivers a raw socket event through the actor's mailbox, in order with its other work.
async fn raw_event(
    core: &Arc<Core>,
    info: &Arc<ActorInfo>,
    socket: Option<ConnHandle>,
    event: RawSocketEvent,
) -> Result<()> {
    let (reply, rx) = oneshot::channel();
    let command = Command::RawSocket {
        event,
        socket,
        reply,
    };
    core.deliver(info, command).await?;
    rx.await.map_err(|_| Error::ActorStopped)?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's queue, read as its writer task takes frames, without a socket.
    struct Queue(ConnHandle);

    impl Queue {
        fn try_recv(&mut self) -> std::result::Result<Message, ()> {
            self.0.take_queued().ok_or(())
        }
    }

    fn conn(id: &str, encoding: Encoding) -> (ConnHandle, Queue) {
        let conn = ConnHandle::new(Arc::from(id), encoding);
        (conn.clone(), Queue(conn))
    }

    fn outbound(to: Option<&str>, event: &str) -> Outbound {
        Outbound {
            to: to.map(str::to_string),
            event: event.to_string(),
            json: Some(b"\"hi\"".to_vec()),
            cbor: Some(vec![0x62, b'h', b'i']),
        }
    }

    #[test]
    fn read_errors_choose_their_close_code_by_variant_not_by_text() {
        use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
        let code = |err: WsError| classify_read_error(&axum::Error::new(err)).0;
        let too_long = CapacityError::MessageTooLong {
            size: 2,
            max_size: 1,
        };
        assert_eq!(code(WsError::Capacity(too_long)), close::TOO_BIG);
        assert_eq!(code(WsError::Utf8("bad".into())), close::INVALID_PAYLOAD);
        // Messages that merely mention a size or UTF-8 are protocol errors.
        assert_eq!(
            code(WsError::Protocol(ProtocolError::ControlFrameTooBig)),
            close::POLICY
        );
        let io = std::io::Error::other("stream did not contain valid UTF-8, message too long");
        assert_eq!(code(WsError::Io(io)), close::POLICY);
    }

    #[test]
    fn broadcasts_reach_subscribers_and_sends_reach_their_target() {
        let (a, mut a_rx) = conn("a", Encoding::Json);
        let (b, mut b_rx) = conn("b", Encoding::Cbor);
        let (c, mut c_rx) = conn("c", Encoding::Json);
        a.shared.subscriptions.write().insert("chat".into());
        b.shared.subscriptions.write().insert("chat".into());
        deliver(
            &[a.clone(), b.clone(), c.clone()],
            &[
                outbound(None, "chat"),
                outbound(Some("c"), "direct"),
                outbound(None, "other"),
            ],
        );
        let Ok(Message::Text(text)) = a_rx.try_recv() else {
            panic!("a gets a JSON frame")
        };
        assert_eq!(text.as_str(), r#"{"t":"event","event":"chat","data":"hi"}"#);
        assert!(a_rx.try_recv().is_err(), "a is not subscribed to the rest");
        let Ok(Message::Binary(data)) = b_rx.try_recv() else {
            panic!("b gets a CBOR frame")
        };
        let entries = cbor::map_entries(&data).unwrap();
        assert_eq!(cbor::text(&data, entries[1].1.start).unwrap(), "chat");
        assert_eq!(&data[entries[2].1.clone()], &[0x62, b'h', b'i']);
        let Ok(Message::Text(direct)) = c_rx.try_recv() else {
            panic!("c gets its direct event")
        };
        assert!(direct.as_str().contains(r#""event":"direct""#));
        assert!(c_rx.try_recv().is_err());
    }

    #[test]
    fn a_slow_consumer_is_closed_at_the_bound_and_nothing_else_is_blocked() {
        let (slow, _slow_rx) = conn("slow", Encoding::Json);
        let (fast, mut fast_rx) = conn("fast", Encoding::Json);
        let frame = Message::Text("x".repeat(64 * 1024).into());
        let fits = MAX_OUTGOING_BYTES / (64 * 1024);
        for _ in 0..fits {
            slow.push(frame.clone());
        }
        assert!(!slow.closing().token.is_cancelled(), "within the bound");
        slow.push(frame.clone());
        assert!(slow.closing().token.is_cancelled(), "past the bound");
        let close = slow.closing().frame.lock().clone().unwrap();
        assert_eq!(close.code, close::TRY_AGAIN_LATER);
        assert!(
            !slow.closing().flush.load(Ordering::Acquire),
            "a slow consumer's queue is dropped"
        );
        // Another connection is untouched.
        fast.push(frame);
        assert!(fast_rx.try_recv().is_ok());
        assert!(!fast.closing().token.is_cancelled());
    }

    #[test]
    fn replies_leave_in_call_order_and_a_dropped_slot_answers_stopped() {
        let (conn, mut rx) = conn("c", Encoding::Json);
        let slot = |seq| ReplySlot {
            conn: conn.clone(),
            seq,
            id: seq + 100,
            dev: false,
            answered: false,
        };
        let (first, second, third) = (slot(0), slot(1), slot(2));
        third.answer(Ok(Payload::json("3")));
        second.answer(Err(Error::malformed("bad")));
        assert!(rx.try_recv().is_err(), "both wait for the first reply");
        drop(first);
        let ids: Vec<(u64, bool)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|frame| {
                let Message::Text(text) = frame else {
                    panic!("JSON replies")
                };
                let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                (value["id"].as_u64().unwrap(), value.get("error").is_some())
            })
            .collect();
        assert_eq!(ids, [(100, true), (101, true), (102, false)]);
    }

    #[test]
    fn the_queue_takes_memory_only_while_frames_wait() {
        let (conn, mut queue) = conn("c", Encoding::Json);
        assert_eq!(
            conn.shared.outgoing.lock().frames.capacity(),
            0,
            "idle: nothing allocated"
        );
        for _ in 0..100 {
            conn.push(Message::Text("a".into()));
        }
        assert!(conn.shared.outgoing.lock().frames.capacity() >= 100);
        while let Ok(frame) = queue.try_recv() {
            conn.sent(frame_len(&frame));
        }
        let outgoing = conn.shared.outgoing.lock();
        assert_eq!((outgoing.frames.capacity(), outgoing.bytes), (0, 0));
    }

    #[test]
    fn once_the_writer_has_ended_a_frame_closes_the_connection_and_is_dropped() {
        let (conn, mut queue) = conn("c", Encoding::Json);
        conn.push(Message::Text("queued".into()));
        drop(WriterEnded(conn.clone()));
        assert!(queue.try_recv().is_err(), "what was queued is let go");
        conn.push(Message::Text("late".into()));
        assert!(queue.try_recv().is_err(), "a late frame is not kept");
        assert!(conn.closing().token.is_cancelled());
    }

    #[tokio::test]
    async fn the_writer_wakes_for_a_frame_queued_while_it_waits() {
        let (conn, _queue) = conn("c", Encoding::Json);
        let writer = conn.clone();
        let next = tokio::spawn(async move { writer.next_queued().await });
        // Let the writer find the queue empty and wait, then queue two frames.
        tokio::task::yield_now().await;
        conn.push(Message::Text("first".into()));
        conn.push(Message::Text("second".into()));
        let Message::Text(first) = next.await.unwrap() else {
            panic!("a text frame")
        };
        assert_eq!(first.as_str(), "first");
        let Message::Text(second) = conn.next_queued().await else {
            panic!("a text frame")
        };
        assert_eq!(second.as_str(), "second");
    }

    #[test]
    fn too_many_frames_also_count_as_slow() {
        let (slow, _rx) = conn("slow", Encoding::Json);
        for _ in 0..MAX_OUTGOING_FRAMES {
            slow.push(Message::Text("a".into()));
        }
        assert!(!slow.closing().token.is_cancelled());
        slow.push(Message::Text("a".into()));
        assert!(slow.closing().token.is_cancelled());
    }

    #[test]
    fn client_messages_parse_in_both_encodings() {
        let json = Message::Text(r#"{"t":"call","id":3,"action":"send","args":["x"]}"#.into());
        let ClientMessage::Call { id, action, args } =
            ClientMessage::parse(&json, Encoding::Json).unwrap()
        else {
            panic!("a call")
        };
        assert_eq!(
            (id, action.as_str(), args.bytes.as_slice()),
            (3, "send", br#"["x"]"#.as_slice())
        );
        let mut cbor_frame = Vec::new();
        cbor::write_json(
            &mut cbor_frame,
            &serde_json::json!({"t": "sub", "event": "chat"}),
        );
        let parsed =
            ClientMessage::parse(&Message::Binary(cbor_frame.into()), Encoding::Cbor).unwrap();
        assert!(matches!(parsed, ClientMessage::Subscribe(event) if event == "chat"));
        for bad in [
            r#"{"t":"call","id":1}"#,
            r#"{"t":"nope"}"#,
            r#"{"t":"call","id":1,"action":"a","args":5}"#,
            "[]",
        ] {
            assert!(
                ClientMessage::parse(&Message::Text(bad.into()), Encoding::Json).is_err(),
                "{bad}"
            );
        }
        assert!(
            ClientMessage::parse(&Message::Binary(vec![0xa0].into()), Encoding::Json).is_err(),
            "encodings do not mix"
        );
    }
}
