//! WebSockets tunneled by the engine's gateway, handed to keel-core as [`TunneledSocket`]s.
//!
//! The client's `websocket` callback gets a socket's path and headers; this module answers it
//! with a handler whose `on_open` (called once the engine was told the socket is open, so
//! nothing keel sends can overtake that) gives keel-core the socket, whose `on_message` feeds
//! the peer's messages into it in order, and whose `on_close` passes the peer's close on. keel's
//! frames go back through the client's [`WebSocketSender`].
//!
//! What must stay true:
//! - Sockets are not hibernatable (`canHibernate` is false): when the actor stops, its sockets
//!   close (with the codes keel documents) and the client reconnects to the next activation.
//! - A socket whose engine connection dropped ends at once for keel (as a vanished peer): its
//!   actor's `onDisconnect` or close listeners run, and nothing waits on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use keel_core::{SocketMessage, SocketPeer, TunneledSocket};
use parking_lot::Mutex;
use rivet_envoy_client::config::{WebSocketHandler, WebSocketSender};
use tokio::sync::mpsc;

/// Where one socket's messages go, until it closes or the engine connection drops.
type Slot = Arc<Mutex<Option<mpsc::Sender<SocketMessage>>>>;

/// The tunneled sockets open on this envoy, so a dropped engine connection can end them.
#[derive(Default)]
pub(crate) struct Sockets {
    open: Mutex<HashMap<u64, Slot>>,
    next: AtomicU64,
}

impl Sockets {
    fn insert(&self, slot: Slot) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut open = self.open.lock();
        // Sockets keel has finished with (their reader dropped the receiver) leave here.
        open.retain(|_, slot| slot.lock().as_ref().is_some_and(|tx| !tx.is_closed()));
        open.insert(id, slot);
        id
    }

    fn remove(&self, id: u64) {
        self.open.lock().remove(&id);
    }

    /// Ends every open socket for keel, as if its peer had vanished: the engine connection
    /// that carried them is gone.
    pub(crate) fn disconnected(&self) {
        let open = std::mem::take(&mut *self.open.lock());
        if !open.is_empty() {
            tracing::debug!(
                sockets = open.len(),
                "engine connection lost; ending its tunneled sockets"
            );
        }
        for slot in open.into_values() {
            slot.lock().take();
        }
    }
}

/// keel's frames to the gateway's socket.
struct Peer(WebSocketSender);

impl SocketPeer for Peer {
    fn send(&self, data: Vec<u8>, binary: bool) {
        self.0.send(data, binary);
    }

    fn close(&self, code: u16, reason: &str) {
        self.0.close(Some(code), Some(reason.to_string()));
    }
}

/// The handler of one tunneled socket at `path`; `serve` gets the socket once it is open.
pub(crate) fn handler(
    sockets: Arc<Sockets>,
    path: String,
    headers: HashMap<String, String>,
    serve: impl FnOnce(TunneledSocket) + Send + 'static,
) -> WebSocketHandler {
    let slot: Slot = Arc::default();
    let on_message = {
        let slot = slot.clone();
        move |message: rivet_envoy_client::config::WebSocketMessage| {
            let tx = slot.lock().clone();
            let message = if message.binary {
                SocketMessage::Binary(message.data)
            } else {
                SocketMessage::Text(message.data)
            };
            Box::pin(async move {
                // Waits while keel's reader is behind (bounded backlog); a socket keel has
                // finished with drops what still arrives.
                if let Some(tx) = tx {
                    let _ = tx.send(message).await;
                }
            }) as rivet_envoy_client::config::BoxFuture<()>
        }
    };
    let on_close = {
        let slot = slot.clone();
        let sockets = sockets.clone();
        let id = Arc::new(Mutex::new(None::<u64>));
        let opened = id.clone();
        let on_close = move |code: u16, reason: String| {
            let tx = slot.lock().take();
            if let Some(id) = *id.lock() {
                sockets.remove(id);
            }
            Box::pin(async move {
                if let Some(tx) = tx {
                    let _ = tx.send(SocketMessage::Close { code, reason }).await;
                }
            }) as rivet_envoy_client::config::BoxFuture<()>
        };
        (on_close, opened)
    };
    let (on_close, opened) = on_close;
    let on_open = move |sender: WebSocketSender| {
        let headers = headers.into_iter().collect();
        let (socket, tx) = TunneledSocket::new(path, headers, Arc::new(Peer(sender)));
        *slot.lock() = Some(tx);
        *opened.lock() = Some(sockets.insert(slot));
        serve(socket);
        Box::pin(async {}) as rivet_envoy_client::config::BoxFuture<()>
    };
    WebSocketHandler {
        on_message: Box::new(on_message),
        on_close: Box::new(on_close),
        on_open: Some(Box::new(on_open)),
    }
}
