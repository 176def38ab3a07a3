//! WebSockets that reach keel through a tunnel (an engine's gateway) instead of its own
//! listener, served by the same code (`socket.rs`) as the sockets the listener accepts.
//!
//! The seam is [`TunneledSocket`]: the peer's messages on a channel and a [`SocketPeer`] to
//! answer through, both in keel's own terms (no tunnel protocol type reaches core). Here it is
//! wrapped as a [`Socket`] (a stream of axum messages and a sink for them), so the connection
//! protocol's reader, the outgoing queue's writer task, its bounds and its close codes are the
//! ones embedded sockets get.
//!
//! What must stay true:
//! - The peer's messages are checked as tungstenite checks them on keel's listener: a message
//!   past `maxWsMessageBytes` is a read error that closes with 1009, a text message that is
//!   not UTF-8 one that closes with 1007.
//! - Nothing is sent to the peer after the close frame.
//! - [`SocketPeer::taken`] is called once per text or binary message, in order, when the
//!   reader asks for the message after it: only once that message's call (or subscription) is
//!   in the actor's mailbox or answered.
//! - The actor is the one the tunnel resolved: a socket of keel's protocol ignores what its
//!   `init` says about which actor, and a raw socket goes to that actor's `onWebSocket`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::ws::{CloseFrame, Message};
use futures_util::{Sink, Stream};
use tokio::sync::mpsc;

use crate::actor::conn::close;
use crate::error::{Error, Result};
use crate::host::{ActorInfo, RequestHead};
use crate::runtime::ingress::{SocketMessage, SocketPeer, TunneledSocket};
use crate::runtime::target::Target;
use crate::server::shared::Server;
use crate::server::socket::{serve_keel_socket, serve_raw_socket, SocketActor};

/// A tunneled socket as keel's socket code reads and writes it.
struct TunnelStream {
    incoming: mpsc::Receiver<SocketMessage>,
    peer: Arc<dyn SocketPeer>,
    /// The largest message the peer may send (`maxWsMessageBytes`).
    limit: usize,
    /// Set once the close frame went to the peer: later frames are dropped.
    closed: bool,
    /// Set when a text or binary message was handed to the reader: the reader's next poll
    /// means it has finished with it ([`SocketPeer::taken`]).
    handed: bool,
}

impl TunnelStream {
    fn new(
        incoming: mpsc::Receiver<SocketMessage>,
        peer: Arc<dyn SocketPeer>,
        limit: usize,
    ) -> Self {
        TunnelStream {
            incoming,
            peer,
            limit,
            closed: false,
            handed: false,
        }
    }

    /// The peer's message as tungstenite would have read it on keel's listener.
    fn read(&self, message: SocketMessage) -> std::result::Result<Message, axum::Error> {
        use tungstenite::error::{CapacityError, Error as WsError};
        let too_long = |size: usize| {
            axum::Error::new(WsError::Capacity(CapacityError::MessageTooLong {
                size,
                max_size: self.limit,
            }))
        };
        match message {
            SocketMessage::Text(data) if data.len() > self.limit => Err(too_long(data.len())),
            SocketMessage::Binary(data) if data.len() > self.limit => Err(too_long(data.len())),
            SocketMessage::Text(data) => match String::from_utf8(data) {
                Ok(text) => Ok(Message::Text(text.into())),
                Err(err) => Err(axum::Error::new(WsError::Utf8(err.to_string()))),
            },
            SocketMessage::Binary(data) => Ok(Message::Binary(data.into())),
            SocketMessage::Close { code, reason } => Ok(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }))),
        }
    }
}

impl Stream for TunnelStream {
    type Item = std::result::Result<Message, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // The reader asks for the next message only once it has handled the last one (its
        // call is in the actor's mailbox, or answered).
        if std::mem::take(&mut self.handed) {
            self.peer.taken();
        }
        match self.incoming.poll_recv(cx) {
            Poll::Ready(Some(message)) => {
                self.handed = !matches!(message, SocketMessage::Close { .. });
                Poll::Ready(Some(self.read(message)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Sink<Message> for TunnelStream {
    type Error = axum::Error;

    fn poll_ready(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<std::result::Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(
        mut self: Pin<&mut Self>,
        message: Message,
    ) -> std::result::Result<(), Self::Error> {
        if self.closed {
            return Ok(());
        }
        match message {
            Message::Text(text) => self.peer.send(text.as_bytes().to_vec(), false),
            Message::Binary(data) => self.peer.send(data.to_vec(), true),
            Message::Close(frame) => {
                self.closed = true;
                let (code, reason) = frame.map_or((close::NORMAL, String::new()), |frame| {
                    (frame.code, frame.reason.to_string())
                });
                self.peer.close(code, &reason);
            }
            // The tunnel answers pings itself.
            Message::Ping(_) | Message::Pong(_) => {}
        }
        Ok(())
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<std::result::Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<std::result::Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
}

/// What a tunneled socket's path asks for.
enum Route {
    /// `/connect`: keel's connection protocol.
    Connect,
    /// `/websocket[/...]`: the actor's `onWebSocket`, seeing the path after `/websocket`
    /// (`/` when nothing follows), query included.
    Raw(String),
}

fn route(path: &str) -> Option<Route> {
    let (bare, query) = match path.split_once('?') {
        Some((bare, query)) => (bare, Some(query)),
        None => (path, None),
    };
    if bare == "/connect" {
        return Some(Route::Connect);
    }
    let rest = bare.strip_prefix("/websocket")?;
    if !rest.is_empty() && !rest.starts_with('/') {
        return None;
    }
    let mut sub_path = if rest.is_empty() {
        "/".to_string()
    } else {
        rest.to_string()
    };
    if let Some(query) = query {
        sub_path.push('?');
        sub_path.push_str(query);
    }
    Some(Route::Raw(sub_path))
}

/// Serves `socket`, tunneled to `actor_id`, on a tracked task.
pub(crate) fn serve(server: &Arc<Server>, actor_id: &str, socket: TunneledSocket) {
    let server = server.clone();
    let actor_id = actor_id.to_string();
    let tracker = server.tracker.clone();
    tracker.spawn(async move {
        let TunneledSocket {
            path,
            headers,
            incoming,
            peer,
        } = socket;
        let limit = server.config.limits.max_ws_message_bytes;
        let stream = TunnelStream::new(incoming, peer.clone(), limit);
        match admit(&server, &actor_id, &path, &headers).await {
            Ok(Admitted::Connect) => {
                let head = RequestHead {
                    method: "GET".to_string(),
                    url: path,
                    headers: header_block(&headers),
                };
                Box::pin(serve_keel_socket(
                    server,
                    stream,
                    SocketActor::Resolved(actor_id),
                    head,
                ))
                .await;
            }
            Ok(Admitted::Raw { sub_path, info }) => {
                Box::pin(serve_raw_socket(server, stream, info, sub_path, headers)).await;
            }
            Err(err) => {
                tracing::debug!(%actor_id, %path, error = %err, "tunneled socket refused");
                peer.close(close::POLICY, &format!("{}.{}", err.group(), err.code()));
            }
        }
    });
}

/// A tunneled socket that passed [`admit`].
enum Admitted {
    /// keel's connection protocol, for the tunnel's actor.
    Connect,
    /// The raw hook of this actor, at `sub_path`.
    Raw {
        sub_path: String,
        info: Arc<ActorInfo>,
    },
}

/// Checks a tunneled socket before it is served, as keel's listener checks an upgrade: its
/// route, the drain, its origin; a raw socket's actor type must have `onWebSocket`.
async fn admit(
    server: &Arc<Server>,
    actor_id: &str,
    path: &str,
    headers: &[(String, String)],
) -> Result<Admitted> {
    let not_found = || Error::RouteNotFound {
        method: "GET".to_string(),
        path: path.to_string(),
    };
    let route = route(path).ok_or_else(not_found)?;
    if server.is_draining() {
        return Err(Error::RegistryShuttingDown);
    }
    let mut map = axum::http::HeaderMap::new();
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::try_from(name.as_str()),
            axum::http::HeaderValue::try_from(value.as_str()),
        ) {
            map.append(name, value);
        }
    }
    crate::origin::check_upgrade(&server.config.allowed_origins, &map)?;
    match route {
        Route::Connect => Ok(Admitted::Connect),
        Route::Raw(sub_path) => {
            let info = server.resolve(Target::Id(actor_id.to_string())).await?;
            server.types.get(&info.name)?.check_raw(true, "GET", path)?;
            Ok(Admitted::Raw { sub_path, info })
        }
    }
}

/// The headers as one HTTP/1 header block (see [`RequestHead::headers`]), names lowercase.
fn header_block(headers: &[(String, String)]) -> String {
    let mut block = String::new();
    for (name, value) in headers {
        block.push_str(&name.to_ascii_lowercase());
        block.push_str(": ");
        block.push_str(value);
        block.push_str("\r\n");
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunneled_paths_pick_keel_protocol_or_the_raw_hook() {
        assert!(matches!(route("/connect"), Some(Route::Connect)));
        assert!(matches!(route("/connect?x=1"), Some(Route::Connect)));
        let raw = |path| match route(path) {
            Some(Route::Raw(sub_path)) => Some(sub_path),
            _ => None,
        };
        assert_eq!(raw("/websocket").as_deref(), Some("/"));
        assert_eq!(raw("/websocket/").as_deref(), Some("/"));
        assert_eq!(raw("/websocket/echo?x=1").as_deref(), Some("/echo?x=1"));
        assert_eq!(raw("/websocket?x=1").as_deref(), Some("/?x=1"));
        for other in [
            "/websockets",
            "/",
            "/connect/x",
            "/v1/actors/counter/connect",
            "",
        ] {
            assert!(route(other).is_none(), "{other}");
        }
    }

    struct Recorded(parking_lot::Mutex<Vec<(String, Vec<u8>)>>);

    impl SocketPeer for Recorded {
        fn send(&self, data: Vec<u8>, binary: bool) {
            let kind = if binary { "binary" } else { "text" };
            self.0.lock().push((kind.to_string(), data));
        }
        fn close(&self, code: u16, reason: &str) {
            self.0
                .lock()
                .push((format!("close {code}"), reason.as_bytes().to_vec()));
        }
    }

    #[tokio::test]
    async fn the_peer_s_messages_are_checked_as_on_keel_s_listener_and_nothing_follows_a_close() {
        use futures_util::{SinkExt, StreamExt};
        let peer = Arc::new(Recorded(parking_lot::Mutex::default()));
        let (tx, rx) = mpsc::channel(8);
        let mut stream = TunnelStream::new(rx, peer.clone(), 4);
        for message in [
            SocketMessage::Text(b"hi".to_vec()),
            SocketMessage::Binary(vec![1, 2, 3, 4, 5]),
            SocketMessage::Text(vec![0xff]),
            SocketMessage::Close {
                code: 4000,
                reason: "bye".into(),
            },
        ] {
            tx.send(message).await.unwrap();
        }
        drop(tx);
        assert!(
            matches!(stream.next().await, Some(Ok(Message::Text(text))) if text.as_str() == "hi")
        );
        let code = |item: Option<std::result::Result<Message, axum::Error>>| match item {
            Some(Err(err)) => crate::server::socket::classify_read_error(&err).0,
            _ => 0,
        };
        assert_eq!(code(stream.next().await), close::TOO_BIG);
        assert_eq!(code(stream.next().await), close::INVALID_PAYLOAD);
        assert!(matches!(
            stream.next().await,
            Some(Ok(Message::Close(Some(frame)))) if frame.code == 4000 && frame.reason.as_str() == "bye"
        ));
        assert!(
            stream.next().await.is_none(),
            "a closed channel is a vanished socket"
        );

        stream.send(Message::Text("out".into())).await.unwrap();
        stream
            .send(Message::Close(Some(CloseFrame {
                code: 1001,
                reason: "actor stopping".into(),
            })))
            .await
            .unwrap();
        stream.send(Message::Binary(vec![9].into())).await.unwrap();
        let sent = peer.0.lock().clone();
        assert_eq!(
            sent,
            vec![
                ("text".to_string(), b"out".to_vec()),
                ("close 1001".to_string(), b"actor stopping".to_vec()),
            ]
        );
    }
}
