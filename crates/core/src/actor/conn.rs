//! One actor's connections: each socket's outgoing queue, its frames, and the order they
//! leave in. Serving the socket (reading the client's messages) is the server's
//! (`server/socket.rs`); this module is what the actor holds and what writes to the socket.
//!
//! Each socket is served by two tracked tasks: a reader (the server's), which decodes
//! messages and turns them into actor commands, and a writer (`split`), which drains a
//! bounded outgoing queue onto the socket. Actors never write to a socket directly: they push
//! frames through a `ConnHandle`. If a client stops reading and its queue passes the bound,
//! the connection is closed (1013, "try again later") instead of slowing the actor or other
//! clients.
//!
//! An idle socket must stay cheap, since a server holds thousands of them: its buffers start
//! small and grow with the traffic (see `READ_BUFFER_BYTES`), and what both tasks and the
//! actor share is one allocation whose outgoing queue holds nothing until a frame is queued.
//!
//! One connection's frames leave in the order the actor produced them. The actor queues a
//! call's events, then its reply (a `ReplySlot`), then any close the call asked for, all in
//! the release of the call's commit, in commit order; replies also keep call order when one
//! is made before its call reaches the actor. A close leaves after what was queued before it.
//!
//! The frames are keel's connection protocol (docs/protocol.md): the server answers `ready`
//! or `error`, `reply` per call, and `event`s. Text frames carry JSON and binary frames CBOR.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use parking_lot::RwLock;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cbor;
use crate::error::{Error, Result};
use crate::host::{Encoding, Outbound, Payload};

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
/// How long a closing socket gets to flush its close frame.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Close codes keel uses.
pub mod close {
    /// Normal closure (`conn.disconnect`, destroy, a hibernated socket of a destroyed actor).
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
    /// A handle over a socket that has no writer task yet ([`split`] starts one).
    pub(crate) fn new(id: Arc<str>, encoding: Encoding) -> ConnHandle {
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

    /// Whether `other` is a handle of the same socket (not merely of the same id: a resumed
    /// connection keeps its id on a new socket).
    pub(crate) fn same(&self, other: &ConnHandle) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Whether the connection is closing or closed.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing().token.is_cancelled()
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

    /// Resolves once the connection is closing (by the actor, the server, or an overflow).
    pub(crate) async fn closed(&self) {
        self.closing().token.cancelled().await;
    }

    /// Adds events this connection wants (`sub`, and the `init` subscriptions).
    pub(crate) fn subscribe(&self, events: impl IntoIterator<Item = String>) {
        self.shared.subscriptions.write().extend(events);
    }

    /// Tells the client its subscription to `event` was refused: an `error` frame carrying
    /// the event's name, which leaves the connection open.
    pub(crate) fn refuse_subscription(&self, event: &str, err: &Error, dev: bool) {
        let value = serde_json::json!({ "t": "error", "event": event, "error": err.to_body(dev) });
        self.push(value_frame(self.encoding, &value));
    }

    /// Drops an event this connection no longer wants (`unsub`).
    pub(crate) fn unsubscribe(&self, event: &str) {
        self.shared.subscriptions.write().remove(event);
    }

    /// The code and reason the connection was closed with, once `close` has been called.
    pub(crate) fn close_frame(&self) -> (u16, String) {
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

#[cfg(test)]
impl ConnHandle {
    /// Holds the outgoing queue's lock until the guard drops: a test's stand-in for a
    /// connection that is slow to take a frame.
    pub(crate) fn hold_queue(&self) -> impl Drop + '_ {
        self.shared.outgoing.lock()
    }

    /// Takes the next queued frame, as the writer task would.
    pub(crate) fn take_frame(&self) -> Option<Message> {
        self.take_queued()
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
    /// The slot of call number `seq` on `conn` (numbered in the order the reader read the
    /// calls), which the client named `id`.
    pub(crate) fn new(conn: ConnHandle, seq: u64, id: u64, dev: bool) -> ReplySlot {
        ReplySlot {
            conn,
            seq,
            id,
            dev,
            answered: false,
        }
    }

    /// The encoding the reply is written in: the connection's.
    pub(crate) fn encoding(&self) -> Encoding {
        self.conn.encoding
    }

    /// The id of the connection the call came over.
    pub(crate) fn conn_id(&self) -> &Arc<str> {
        &self.conn.id
    }

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

/// `{"t":"ready",...}` for a connection; `token` is the secret that resumes a hibernatable
/// connection after a restart (`connToken`), and `resumed` says the connection was resumed.
pub(crate) fn ready_frame(
    encoding: Encoding,
    actor_id: &str,
    conn_id: &str,
    token: Option<&str>,
    resumed: bool,
) -> Message {
    let mut value = serde_json::json!({ "t": "ready", "actorId": actor_id, "connId": conn_id });
    if let Some(token) = token {
        value["connToken"] = token.into();
    }
    if resumed {
        value["resumed"] = true.into();
    }
    value_frame(encoding, &value)
}

/// An `error` frame (`id` unset), or the `reply` frame of a failed call.
pub(crate) fn error_frame(encoding: Encoding, id: Option<u64>, err: &Error, dev: bool) -> Message {
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

/// Splits a socket into a writer task (on `tracker`) and returns the reader half and the
/// handle. `force` is the runtime's forced-drain token: it drops the socket at once.
pub(crate) fn split(
    tracker: &TaskTracker,
    force: &CancellationToken,
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
    let force = force.clone();
    tracker.spawn(
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
}
