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

use async_trait::async_trait;
use tokio::net::TcpListener;

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
}
