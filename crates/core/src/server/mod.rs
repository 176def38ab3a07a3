//! The server floor: keel's HTTP and WebSocket front door, the first implementation of the
//! `Ingress` seam.
//!
//! - this module: [`HttpIngress`], which puts the server together over a dispatch handle.
//! - [`shared`]: the `Server` state every route is handed, and the error response.
//! - [`http`]: the versioned HTTP routes, their bodies, CORS and the accept loop.
//! - [`socket`]: keel's connection protocol and raw sockets over WebSocket.
//! - [`tunnel`]: WebSockets tunneled to an already-resolved actor, served by `socket`'s code.
//! - [`inspector`]: the token-guarded inspector API.
//! - [`connections`]: the open connections, by actor, for the inspector and the gauge.
//! - [`linger`]: sockets that read and discard for a moment before they close.
//!
//! Rule: the server reaches actors only through the runtime's dispatch handle; it may use the
//! actor floor's connection handles and types, and the base modules, and nothing here is
//! used from below.

pub(crate) mod connections;
pub mod http;
pub(crate) mod inspector;
pub(crate) mod linger;
pub(crate) mod shared;
pub(crate) mod socket;
pub(crate) mod tunnel;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::runtime::dispatch::Dispatch;
use crate::runtime::ingress::{Ingress, Request, Response, TunneledSocket};
use crate::server::connections::Connections;
use crate::server::shared::Server;

/// keel's HTTP and WebSocket server as the runtime's ingress.
pub(crate) struct HttpIngress {
    server: Arc<Server>,
    /// The routes, shared by the listener and serverless requests.
    router: axum::Router,
}

impl HttpIngress {
    /// The server over `dispatch`.
    pub(crate) fn new(dispatch: Arc<Dispatch>) -> HttpIngress {
        let connections = Arc::new(Connections::new(dispatch.metrics.clone()));
        let server = Arc::new(Server {
            dispatch,
            connections,
        });
        HttpIngress {
            router: http::router(server.clone()),
            server,
        }
    }
}

#[async_trait]
impl Ingress for HttpIngress {
    fn serve(&self, listener: TcpListener) {
        let server = self.server.clone();
        let router = self.router.clone();
        self.server
            .tracker
            .spawn(http::accept_loop(server, listener, router).in_current_span());
    }

    async fn handle(&self, request: Request) -> Response {
        http::handle(self.router.clone(), request).await
    }

    async fn handle_tunneled(&self, actor_id: &str, request: Request) -> Response {
        let request = http::tunneled(actor_id, request);
        http::handle(self.router.clone(), request).await
    }

    fn serve_tunneled_socket(&self, actor_id: &str, socket: TunneledSocket) {
        tunnel::serve(&self.server, actor_id, socket);
    }
}
