//! The `Ingress` seam: the front door that turns a request or a socket into a dispatch to a
//! resolved actor.
//!
//! Today's implementation is keel's HTTP and WebSocket server (`server/`), which serves a
//! listener (serve mode) and single requests handed over by a Fetch-style host (serverless
//! mode). Another implementation (requests and sockets tunneled for an actor the engine has
//! already resolved) is written against the same handle: an ingress is given the runtime's
//! [`Dispatch`](crate::runtime::dispatch::Dispatch) (call an action, open a connection, hand
//! over a raw request or socket, by id or by key), never the parts behind it.
//!
//! The contract:
//! - Every task an ingress spawns is tracked by the dispatch's tracker, so the drain waits
//!   for it; once the dispatch's stop token is cancelled it accepts nothing new, and once the
//!   force token is cancelled it lets go of what is left.
//! - Ordering: one connection's calls are dispatched in the order the client sent them (each
//!   is in its actor's mailbox before the next is read); the replies and events the actor
//!   lets out keep the order of its commits (see `actor/outbox.rs`).
//! - Failure: every error leaves as keel's structured error (`group`, `code`, `message`),
//!   with its one status mapping; bad input from one client closes or fails only that
//!   client's request or socket, and every call an ingress dispatched gets its reply or an
//!   error, never silence.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// An HTTP request as keel handles it.
pub type Request = axum::http::Request<axum::body::Body>;
/// An HTTP response as keel produces it.
pub type Response = axum::http::Response<axum::body::Body>;

/// A front door of the runtime. See the module doc for the contract.
#[async_trait]
pub(crate) trait Ingress: Send + Sync + 'static {
    /// Accepts connections on `listener` until the drain begins, on tracked tasks.
    fn serve(&self, listener: TcpListener);
    /// Handles one request handed over by the embedding host (serverless mode).
    async fn handle(&self, request: Request) -> Response;
    /// Handles one request tunneled to `actor_id`, an actor already resolved by whoever
    /// tunnels it (an engine's gateway).
    async fn handle_tunneled(&self, actor_id: &str, request: Request) -> Response;
    /// Serves one WebSocket tunneled to `actor_id` (resolved by whoever tunnels it) with the
    /// same socket code as keel's own listener, on a tracked task; returns at once.
    fn serve_tunneled_socket(&self, actor_id: &str, socket: TunneledSocket);
}

/// How many messages of one tunneled socket may wait for keel to read them before the
/// tunnel's sender waits too.
pub const TUNNELED_SOCKET_BACKLOG: usize = 64;

/// One message from the peer of a tunneled socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketMessage {
    /// A text message's bytes; keel checks they are UTF-8 (1007 otherwise).
    Text(Vec<u8>),
    /// A binary message.
    Binary(Vec<u8>),
    /// The peer closed the socket with this code and reason.
    Close {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
}

/// The way back to a tunneled socket's peer. keel calls it from the socket's writer task, in
/// the order the frames leave; after `close` it calls nothing more.
pub trait SocketPeer: Send + Sync + 'static {
    /// Sends one message (`binary`, or UTF-8 text).
    fn send(&self, data: Vec<u8>, binary: bool);
    /// Closes the socket with `code` and `reason`.
    fn close(&self, code: u16, reason: &str);
    /// keel has finished with the oldest text or binary message of the peer it had not yet
    /// reported: what it asked for is in the actor's mailbox (or was answered), and it asks
    /// for the next message. One call per such message, in order. A tunnel that keeps
    /// messages until their receiver has them (an engine's hibernatable socket) acknowledges
    /// them here.
    fn taken(&self) {}
}

/// A WebSocket that reached keel through a tunnel (an engine's gateway) rather than its own
/// listener, already upgraded: its path decides what serves it (see
/// [`Runtime::serve_tunneled_socket`](crate::Runtime::serve_tunneled_socket)).
pub struct TunneledSocket {
    /// The path (and query) inside the actor, as the tunnel passed it.
    pub path: String,
    /// The upgrade request's headers.
    pub headers: Vec<(String, String)>,
    /// The peer's messages in order; a closed channel is a socket that vanished (1006).
    pub incoming: mpsc::Receiver<SocketMessage>,
    /// Where keel's frames go.
    pub peer: Arc<dyn SocketPeer>,
}

impl TunneledSocket {
    /// A socket at `path` over `peer`, with the sender its tunnel feeds the peer's messages
    /// into (bounded by [`TUNNELED_SOCKET_BACKLOG`]).
    pub fn new(
        path: String,
        headers: Vec<(String, String)>,
        peer: Arc<dyn SocketPeer>,
    ) -> (TunneledSocket, mpsc::Sender<SocketMessage>) {
        let (tx, incoming) = mpsc::channel(TUNNELED_SOCKET_BACKLOG);
        let socket = TunneledSocket {
            path,
            headers,
            incoming,
            peer,
        };
        (socket, tx)
    }
}
