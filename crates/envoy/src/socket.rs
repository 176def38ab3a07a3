//! WebSockets tunneled by the engine's gateway, handed to keel-core as [`TunneledSocket`]s.
//!
//! The client's `websocket` callback gets a socket's path and headers; this module answers it
//! with a handler whose `on_open` (called once the engine was told the socket is open, so
//! nothing keel sends can overtake that) gives keel-core the socket, whose `on_message` feeds
//! the peer's messages into it in order, and whose `on_close` passes the peer's close on. keel's
//! frames go back through the client's [`WebSocketSender`].
//!
//! Hibernatable sockets (`/connect` of a type with hibernatable connections, see
//! `activation.rs`): while the actor sleeps the gateway keeps the client's socket open and
//! keel keeps its side (the connection keel-core left hibernated, and the channel its reader
//! waits on) here. The next start restores the socket: the client is handed the sockets of
//! the actor's hibernated connections ([`Sockets::hibernating`]), the gateway rebinds each
//! one, and [`restore`] points the socket kept here at the new route, so the connection,
//! its `conn.state` and its reader carry on as if nothing happened. The gateway keeps every
//! message it forwarded until keel acknowledges its index, and sends the unacknowledged
//! ones again to the next activation; the client drops those whose index is not past the
//! one keel reports at the restore.
//!
//! What must stay true:
//! - A message of a hibernatable socket is acknowledged only once keel has taken it (its call
//!   is in the actor's mailbox, or answered: [`keel_core::SocketPeer::taken`]). One that
//!   reached keel as the actor began to sleep waits in keel for the next activation, and is
//!   not acknowledged meanwhile, so the gateway wakes the actor at once when it stops.
//! - The index reported at a restore is that of the last message passed to keel: the copies
//!   the gateway sends again of messages keel holds already are dropped, nothing is skipped.
//! - Other sockets are not hibernatable: when the actor stops, they close (with the codes keel
//!   documents) and the client reconnects to the next activation.
//! - A socket whose engine connection dropped ends at once for keel (as a vanished peer): its
//!   actor's `onDisconnect` or close listeners run, and nothing waits on it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use keel_core::{SocketMessage, SocketPeer, TunneledSocket};
use parking_lot::Mutex;
use rivet_envoy_client::config::{WebSocketHandler, WebSocketSender};
use rivet_envoy_client::handle::EnvoyHandle;
use rivet_envoy_client::protocol;
use rivet_envoy_client::tunnel::HibernatingWebSocketMetadata;
use tokio::sync::mpsc;

use crate::activation::Tunnel;
use crate::storage::StoredSocket;

/// A socket at the gateway: its gateway's id and its request's id (unique per socket).
pub(crate) type SocketKey = (protocol::GatewayId, protocol::RequestId);

/// Acknowledges the messages of a hibernatable socket as keel takes them.
struct Acks {
    envoy: EnvoyHandle,
    key: SocketKey,
    /// The indexes of the messages passed to keel and not yet taken, oldest first.
    pending: Mutex<VecDeque<u16>>,
}

impl Acks {
    fn passed(&self, index: u16) {
        self.pending.lock().push_back(index);
    }

    fn taken(&self) {
        let taken = self.pending.lock().pop_front();
        if let Some(index) = taken {
            self.envoy
                .send_hibernatable_ws_message_ack(self.key.0, self.key.1, index);
        }
    }
}

/// One socket open through this envoy, from its `on_open` until keel has finished with it.
struct Open {
    /// The actor it is tunneled to.
    actor_id: String,
    /// Where the peer's messages go; keel's reader holds the receiver. Taken on close.
    tx: Option<mpsc::Sender<SocketMessage>>,
    /// keel's way back to the peer; pointed at the new route when a hibernated socket is
    /// restored.
    peer: Arc<Peer>,
    /// Whether the gateway keeps the socket while the actor sleeps.
    hibernatable: bool,
    /// The path and headers the socket opened with, for the restore.
    path: String,
    headers: HashMap<String, String>,
    /// The index of the last message passed to keel.
    last_index: Option<u16>,
}

impl Open {
    /// Whether keel still reads the socket.
    fn is_live(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| !tx.is_closed())
    }
}

type Slot = Arc<Mutex<Open>>;

/// The tunneled sockets open on this envoy, so a dropped engine connection can end them and
/// an actor's next start can restore its hibernated ones.
#[derive(Default)]
pub(crate) struct Sockets {
    open: Mutex<HashMap<SocketKey, Slot>>,
}

impl Sockets {
    fn insert(&self, key: SocketKey, slot: Slot) {
        let mut open = self.open.lock();
        // Sockets keel has finished with (their reader dropped the receiver) leave here.
        open.retain(|_, slot| slot.lock().is_live());
        open.insert(key, slot);
    }

    fn remove(&self, key: &SocketKey) {
        self.open.lock().remove(key);
    }

    fn get(&self, key: &SocketKey) -> Option<Slot> {
        self.open.lock().get(key).cloned()
    }

    /// What the envoy needs to restore the actor's hibernated sockets on its start: one entry
    /// per hibernatable socket of `actor_id` that keel still reads here, and one per socket
    /// `stored` with the actor's data that this process does not hold (kept by an earlier
    /// activation elsewhere): the envoy asks [`restore`] for it, which has none and closes it
    /// at the client's next message, so its client reconnects and resumes its connection.
    pub(crate) fn hibernating(
        &self,
        actor_id: &str,
        stored: &[StoredSocket],
    ) -> Vec<HibernatingWebSocketMetadata> {
        let open = self.open.lock();
        let mut kept: Vec<HibernatingWebSocketMetadata> = open
            .iter()
            .filter_map(|(key, slot)| {
                let slot = slot.lock();
                if slot.actor_id != actor_id || !slot.hibernatable || !slot.is_live() {
                    return None;
                }
                Some(HibernatingWebSocketMetadata {
                    gateway_id: key.0,
                    request_id: key.1,
                    // The envoy numbers what it sends itself; the gateway does not check it.
                    envoy_message_index: 0,
                    rivet_message_index: slot.last_index?,
                    path: slot.path.clone(),
                    headers: slot.headers.clone(),
                })
            })
            .collect();
        for socket in stored {
            let key = (socket.gateway_id, socket.request_id);
            if open.contains_key(&key) {
                continue;
            }
            kept.push(HibernatingWebSocketMetadata {
                gateway_id: key.0,
                request_id: key.1,
                envoy_message_index: 0,
                rivet_message_index: 0,
                path: socket.path.clone(),
                headers: socket.headers.clone(),
            });
        }
        kept
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
            slot.lock().tx.take();
        }
    }
}

/// keel's frames to the gateway's socket, through the route it has now, and (hibernatable
/// sockets) the acknowledgements of the messages keel took.
struct Peer {
    sender: Mutex<WebSocketSender>,
    acks: Option<Acks>,
}

impl SocketPeer for Peer {
    fn send(&self, data: Vec<u8>, binary: bool) {
        self.sender.lock().send(data, binary);
    }

    fn close(&self, code: u16, reason: &str) {
        self.sender
            .lock()
            .close(Some(code), Some(reason.to_string()));
    }

    fn taken(&self) {
        if let Some(acks) = &self.acks {
            acks.taken();
        }
    }
}

/// What a new socket's handler needs besides its path and headers.
pub(crate) struct NewSocket {
    pub sockets: Arc<Sockets>,
    pub envoy: EnvoyHandle,
    pub tunnel: Arc<dyn Tunnel>,
    pub actor_id: String,
    pub key: SocketKey,
    pub hibernatable: bool,
}

/// The handler of one new tunneled socket at `path`; `serve` gets the socket once it is open.
pub(crate) fn handler(
    new: NewSocket,
    path: String,
    headers: HashMap<String, String>,
    sender: WebSocketSender,
    serve: impl FnOnce(TunneledSocket) + Send + 'static,
) -> WebSocketHandler {
    let NewSocket {
        sockets,
        envoy,
        tunnel,
        actor_id,
        key,
        hibernatable,
    } = new;
    let acks = hibernatable.then(|| Acks {
        envoy,
        key,
        pending: Mutex::default(),
    });
    let slot: Slot = Arc::new(Mutex::new(Open {
        actor_id,
        tx: None,
        peer: Arc::new(Peer {
            sender: Mutex::new(sender),
            acks,
        }),
        hibernatable,
        path: path.clone(),
        headers: headers.clone(),
        last_index: None,
    }));
    let mut handler = handlers(sockets.clone(), tunnel.clone(), key, slot.clone());
    let on_open = move |sender: WebSocketSender| {
        let (peer, actor_id) = {
            let slot = slot.lock();
            *slot.peer.sender.lock() = sender;
            (slot.peer.clone(), slot.actor_id.clone())
        };
        if hibernatable {
            tunnel.hibernatable_opened(
                &actor_id,
                StoredSocket {
                    gateway_id: key.0,
                    request_id: key.1,
                    path: path.clone(),
                    headers: headers.clone(),
                },
            );
        }
        let headers = headers.into_iter().collect();
        let (socket, tx) = TunneledSocket::new(path, headers, peer);
        slot.lock().tx = Some(tx);
        sockets.insert(key, slot);
        serve(socket);
        Box::pin(async {}) as rivet_envoy_client::config::BoxFuture<()>
    };
    handler.on_open = Some(Box::new(on_open));
    handler
}

/// The close reason of a hibernated socket that its actor's start found no end of here.
pub(crate) const MOVED_REASON: &str = "actor moved";

/// The handler of a hibernated socket the envoy restores on the actor's next start. If keel
/// kept it (see the module doc), the socket now answers through `sender`, and keel's reader
/// carries on. If keel has no such socket for `actor_id` (it slept in another process, or keel
/// has finished with it), the socket is taken anyway, with no reader, and closed when the
/// client next sends on it: by the envoy (1008 `ws.message_index_skip`, as this process
/// cannot know how far the old one read), or else here with 1011 ([`MOVED_REASON`]). keel's
/// client then reconnects, resuming its connection with its token.
///
/// Neither refusing the restore nor closing the socket at once reaches the client: both send
/// the close while the gateway still holds the socket for the sleeping actor, and engine
/// 2.3.19's gateway drops a close then. The client's next message is the first moment the
/// gateway is known to have the socket routed here again.
pub(crate) fn restore(
    sockets: Arc<Sockets>,
    tunnel: Arc<dyn Tunnel>,
    actor_id: &str,
    key: SocketKey,
    sender: WebSocketSender,
) -> WebSocketHandler {
    let kept = sockets.get(&key).filter(|slot| {
        let open = slot.lock();
        let live = open.actor_id == actor_id && open.is_live();
        if live {
            // Frames keel sends from now on take the new route; the envoy forwards them once
            // the gateway has the socket again.
            *open.peer.sender.lock() = sender.clone();
        }
        live
    });
    let Some(slot) = kept else {
        // Kept by an activation elsewhere, or ended unnoticed: its record is of no use. What
        // the client sends on it is dropped (its calls never run).
        tracing::debug!(%actor_id, "hibernated websocket kept elsewhere; closing it for the client to resume");
        tunnel.hibernatable_ended(actor_id, key.0, key.1);
        let closed = AtomicBool::new(false);
        return WebSocketHandler {
            on_message: Box::new(move |message| {
                if !closed.swap(true, Ordering::Relaxed) {
                    message
                        .sender
                        .close(Some(1011), Some(MOVED_REASON.to_string()));
                }
                Box::pin(async {})
            }),
            on_close: Box::new(|_, _| Box::pin(async {})),
            on_open: None,
        };
    };
    tracing::debug!(%actor_id, "hibernated websocket restored");
    handlers(sockets, tunnel, key, slot)
}

/// The message and close handlers of the socket in `slot`.
fn handlers(
    sockets: Arc<Sockets>,
    tunnel: Arc<dyn Tunnel>,
    key: SocketKey,
    slot: Slot,
) -> WebSocketHandler {
    let on_message = {
        let slot = slot.clone();
        move |message: rivet_envoy_client::config::WebSocketMessage| {
            let tx = {
                let mut open = slot.lock();
                if let (Some(acks), Some(_)) = (&open.peer.acks, &open.tx) {
                    // Counted before keel can take it, so its acknowledgement finds it.
                    acks.passed(message.message_index);
                    open.last_index = Some(message.message_index);
                }
                open.tx.clone()
            };
            let data = if message.binary {
                SocketMessage::Binary(message.data)
            } else {
                SocketMessage::Text(message.data)
            };
            Box::pin(async move {
                // Waits while keel's reader is behind (bounded backlog); a socket keel has
                // finished with drops what still arrives.
                if let Some(tx) = tx {
                    let _ = tx.send(data).await;
                }
            }) as rivet_envoy_client::config::BoxFuture<()>
        }
    };
    let on_close = move |code: u16, reason: String| {
        let (tx, hibernatable, actor_id) = {
            let mut open = slot.lock();
            (open.tx.take(), open.hibernatable, open.actor_id.clone())
        };
        sockets.remove(&key);
        if hibernatable {
            tunnel.hibernatable_ended(&actor_id, key.0, key.1);
        }
        Box::pin(async move {
            if let Some(tx) = tx {
                // keel's reader may have finished already; then the close has no one to tell.
                let _ = tx.send(SocketMessage::Close { code, reason }).await;
            }
        }) as rivet_envoy_client::config::BoxFuture<()>
    };
    WebSocketHandler {
        on_message: Box::new(on_message),
        on_close: Box::new(on_close),
        on_open: None,
    }
}
