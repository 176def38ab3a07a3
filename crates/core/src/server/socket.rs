//! Serving WebSockets: keel's connection protocol, and raw sockets for `onWebSocket`.
//!
//! Each socket is served by two tracked tasks: the reader here, which decodes the client's
//! messages and turns them into dispatches, and the writer of the connection's outgoing queue
//! (`actor/conn.rs`). The reader never writes to the socket itself, except to refuse one
//! before it is admitted.
//!
//! The protocol (docs/protocol.md): the client's first message is `init` (key or actor id,
//! mode, input, params, subscriptions); then `call`, `sub` and `unsub`. Text frames carry JSON and binary
//! frames CBOR; the `init` frame picks the connection's encoding. What must stay true: one
//! connection's calls enter the actor's mailbox in the order the client sent them (each
//! call is delivered before the next message is read).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::Instrument;

use crate::actor::conn::{close, error_frame, split, ConnHandle, ReplySlot, CLOSE_TIMEOUT};
use crate::cbor;
use crate::error::{Error, Result};
use crate::host::{ActorInfo, Encoding, Payload, RawSocketEvent, RequestHead};
use crate::runtime::target::{Resolve, Target};
use crate::server::shared::Server;

/// How long a new socket may take to send `init`.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

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
        /// The id and token of a hibernatable connection the client resumes.
        resume: Option<(String, String)>,
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
    #[serde(default, rename = "connId")]
    conn_id: Option<String>,
    #[serde(default, rename = "connToken")]
    conn_token: Option<String>,
}

/// The connection a client resumes, from `init`'s `connId` and `connToken` (both or neither).
fn parse_resume(
    conn_id: Option<String>,
    token: Option<String>,
) -> Result<Option<(String, String)>> {
    match (conn_id, token) {
        (None, None) => Ok(None),
        (Some(id), Some(token)) => {
            let plain = |text: &str| {
                !text.is_empty()
                    && text.len() <= 64
                    && text.bytes().all(|b| b.is_ascii_alphanumeric())
            };
            if !plain(&id) || !plain(&token) {
                return Err(Error::malformed(
                    "\"connId\" and \"connToken\" must be the ones the server sent",
                ));
            }
            Ok(Some((id, token)))
        }
        _ => Err(Error::malformed(
            "resuming a connection needs both \"connId\" and \"connToken\"",
        )),
    }
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
                resume: parse_resume(message.conn_id, message.conn_token)?,
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
        let mut conn_id = None;
        let mut conn_token = None;
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
                "connId" => conn_id = Some(cbor::text(bytes, at)?),
                "connToken" => conn_token = Some(cbor::text(bytes, at)?),
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
                resume: parse_resume(conn_id, conn_token)?,
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

/// Serves one socket of keel's connection protocol for actor type `name`.
pub(crate) async fn serve_keel_socket(
    server: Arc<Server>,
    socket: WebSocket,
    name: String,
    upgrade: RequestHead,
) {
    let dev = server.config.dev;
    let mut socket = socket;
    // The first message names the actor and fixes the encoding.
    let first = tokio::select! {
        // The drain began before the client introduced itself: just drop the socket.
        biased;
        _ = server.stop.cancelled() => return,
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
    let (key, actor_id, mode, input, params, subscriptions, resume) = match init {
        Ok(ClientMessage::Init {
            key,
            actor_id,
            mode,
            input,
            params,
            subscriptions,
            resume,
        }) => (key, actor_id, mode, input, params, subscriptions, resume),
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
    let info = match Box::pin(server.resolve(target)).await {
        // An id names one actor of one type: another type's actor is not found on this route.
        Ok(info) if *info.name != *name => {
            return Box::pin(reject(socket, encoding, &Error::ActorNotFound, dev)).await
        }
        Ok(info) => info,
        Err(err) => return Box::pin(reject(socket, encoding, &err, dev)).await,
    };
    let actor_type = match server.types.get(&info.name) {
        Ok(actor_type) => actor_type.clone(),
        Err(err) => return Box::pin(reject(socket, encoding, &err, dev)).await,
    };
    // A resumed connection keeps its id; its actor checks the token before admitting it.
    let (conn_id, resume) = match resume {
        Some((id, token)) => (Arc::<str>::from(id), Some(token)),
        None => (Arc::from(format!("{:016x}", rand::random::<u64>())), None),
    };
    let span =
        tracing::debug_span!(parent: &crate::actor::span(&info), "connection", conn_id = %conn_id);
    let (mut stream, conn) = split(
        &server.tracker,
        &server.force,
        socket,
        conn_id.clone(),
        encoding,
        span.clone(),
    );
    // Events the type guards with `canSubscribe` are asked for once the connection is in.
    let (checked, free): (Vec<String>, Vec<String>) = subscriptions
        .into_iter()
        .partition(|event| actor_type.guarded_events.contains(event));
    conn.subscribe(free);

    async {
        // Listed before it is admitted: the actor sends `ready` itself, so a client that has
        // heard `ready` must already find its connection in the inspector and the gauge. A
        // rejected connection leaves the list when this guard drops.
        let _listed = server
            .connections
            .open(info.id.clone(), inspector_info(&server, &conn));
        let accepted = Box::pin(server.connect(&info, &conn, params, upgrade, resume)).await;
        if let Err(err) = accepted {
            tracing::debug!(error = %err, "connection rejected");
            conn.push(error_frame(encoding, None, &err, dev));
            conn.close(close::POLICY, "connection rejected");
            return;
        }
        tracing::debug!("connection open");
        for event in checked {
            Box::pin(server.subscribe(&info, &conn, event, true)).await;
        }
        let closed_here = read_loop(
            &server,
            &info,
            &conn,
            &mut stream,
            &actor_type.guarded_events,
        )
        .await;
        // However reading ended (the peer vanished, say), the writer has nothing more to do:
        // without this it would idle until the drain is forced. A close already asked for
        // keeps its code.
        conn.close(close::NORMAL, "");
        // Tell the actor, whichever way the socket ended, unless it has already left: a
        // stopping actor forgets its connections itself, and must not be woken for this.
        // A hibernatable connection outlives its actor's sleep, so when its client closes it
        // the actor is woken to close it for good (but not during the drain, which keeps its
        // record). One the actor or the server closed needs no wake: the actor knows.
        if actor_type.hibernatable_conns && !closed_here {
            Box::pin(server.disconnect_waking(&info, &conn)).await;
        } else {
            server.disconnect(&info, &conn);
        }
        tracing::debug!("connection closed");
    }
    .instrument(span)
    .await;
}

/// What the inspector shows of a connection. Its params are left out: they often carry
/// credentials.
fn inspector_info(
    server: &Server,
    conn: &ConnHandle,
) -> crate::server::connections::ConnectionInfo {
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
    crate::server::connections::ConnectionInfo {
        id: conn.id.to_string(),
        opened_at_ms: server.clock.now_ms(),
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

/// Reads the client's messages until the socket ends; `true` if it ended because the
/// connection was closed from this side (by the actor, the server or an overflow).
async fn read_loop(
    server: &Arc<Server>,
    info: &Arc<ActorInfo>,
    conn: &ConnHandle,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    guarded: &HashSet<String>,
) -> bool {
    let dev = server.config.dev;
    // The number of the next call, for the order of replies.
    let mut seq = 0;
    loop {
        let next = tokio::select! {
            // Closed by the actor, the server, or a slow-consumer overflow.
            biased;
            _ = conn.closed() => return true,
            // The next message from the client.
            next = stream.next() => next,
        };
        let frame = match next {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => {
                let (code, reason) = classify_read_error(&err);
                conn.close(code, &reason);
                return false;
            }
            None => return false,
        };
        if let Message::Close(frame) = frame {
            // Answers the client's close at once, with its own code, so the socket's writer
            // ends and neither the client nor the drain waits for it.
            let (code, reason) = frame.map_or((close::NORMAL, String::new()), |f| {
                (f.code, f.reason.to_string())
            });
            conn.close(code, &reason);
            return false;
        }
        if matches!(frame, Message::Ping(_) | Message::Pong(_)) {
            continue;
        }
        match ClientMessage::parse(&frame, conn.encoding) {
            Ok(ClientMessage::Call { id, action, args }) => {
                let reply = ReplySlot::new(conn.clone(), seq, id, dev);
                seq += 1;
                // Boxed: see `serve_keel_socket`.
                Box::pin(server.call_on_conn(info, reply, action, args)).await;
            }
            Ok(ClientMessage::Subscribe(event)) if guarded.contains(&event) => {
                Box::pin(server.subscribe(info, conn, event, true)).await;
            }
            Ok(ClientMessage::Unsubscribe(event)) if guarded.contains(&event) => {
                Box::pin(server.subscribe(info, conn, event, false)).await;
            }
            Ok(ClientMessage::Subscribe(event)) => {
                conn.subscribe([event]);
            }
            Ok(ClientMessage::Unsubscribe(event)) => {
                conn.unsubscribe(&event);
            }
            Ok(ClientMessage::Init { .. }) => {
                conn.push(error_frame(
                    conn.encoding,
                    None,
                    &Error::malformed("init was already sent"),
                    dev,
                ));
                conn.close(close::POLICY, "init was already sent");
                return false;
            }
            Err(err) => {
                conn.push(error_frame(conn.encoding, None, &err, dev));
                let code = if matches!(err, Error::RequestMalformed { .. }) {
                    close::POLICY
                } else {
                    close::INVALID_PAYLOAD
                };
                conn.close(code, "malformed message");
                return false;
            }
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
    server: Arc<Server>,
    socket: WebSocket,
    info: Arc<ActorInfo>,
    path: String,
    headers: Vec<(String, String)>,
) {
    let socket_id: Arc<str> = Arc::from(format!("{:016x}", rand::random::<u64>()));
    let span = tracing::debug_span!(parent: &crate::actor::span(&info), "raw_socket", socket_id = %socket_id);
    let (mut stream, conn) = split(
        &server.tracker,
        &server.force,
        socket,
        socket_id.clone(),
        Encoding::Json,
        span.clone(),
    );
    async {
        server
            .raw_sockets
            .lock()
            .insert(socket_id.clone(), conn.clone());
        let open = RawSocketEvent::Open {
            socket_id: socket_id.to_string(),
            path,
            headers,
        };
        // Boxed, so the socket's idle task does not keep room for it: see `serve_keel_socket`.
        if let Err(err) = Box::pin(server.raw_socket_event(&info, Some(conn.clone()), open)).await {
            tracing::debug!(error = %err, "raw socket refused");
            conn.close(close::POLICY, &format!("{}.{}", err.group(), err.code()));
        } else {
            let (code, reason) = loop {
                let next = tokio::select! {
                    // Closed by user code or the actor stopping.
                    biased;
                    _ = conn.closed() => break conn.close_frame(),
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
                if let Err(err) = server.raw_socket_event_live(&info, message).await {
                    tracing::debug!(error = %err, "delivering a raw message failed");
                }
            };
            let closed = RawSocketEvent::Close {
                socket_id: socket_id.to_string(),
                code,
                reason,
            };
            // The actor may be stopping; then it runs the close listeners itself.
            let _ = server.raw_socket_event_live(&info, closed).await;
        }
        server.raw_sockets.lock().remove(&socket_id);
    }
    .instrument(span)
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

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
