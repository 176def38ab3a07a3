//! What every route and socket task of the server shares: the [`Server`] state, the peer
//! address, and the one way an error becomes a response.
//!
//! What must stay true: the server reaches actors only through the dispatch handle it holds
//! here, and a route's error becomes a response through [`error_response`] (the error's body
//! and its one status), except `/health`'s answer to a damaged store (see `http.rs`).

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;

use crate::error::Error;
use crate::runtime::dispatch::Dispatch;
use crate::runtime::ingress::Response;
use crate::server::connections::Connections;

/// What every route and socket task of the server holds: the runtime's dispatch handle, and
/// the server's own list of open connections.
pub(crate) struct Server {
    /// The runtime's dispatch handle: the only way the server reaches actors.
    pub(crate) dispatch: Arc<Dispatch>,
    /// Open actor connections, for the inspector and the connections gauge.
    pub(crate) connections: Arc<Connections>,
}

/// A server reads the dispatch's settings, tokens and tracker directly, and dispatches
/// through it.
impl std::ops::Deref for Server {
    type Target = Dispatch;

    fn deref(&self) -> &Dispatch {
        &self.dispatch
    }
}

/// The address of the peer a request came from, set by the accept loop; serverless requests
/// have none.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

pub(crate) fn json_response(status: StatusCode, body: String) -> Response {
    bytes_response(status, body.into_bytes(), "application/json")
}

pub(crate) fn bytes_response(
    status: StatusCode,
    body: Vec<u8>,
    content_type: &'static str,
) -> Response {
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Renders an error with its one status mapping.
pub fn error_response(err: &Error, expose_internal: bool) -> Response {
    let status =
        StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // User code that threw was logged where it threw, with the actor's identity.
    let logged = matches!(err, Error::ActorInternal { .. });
    if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE && !logged {
        tracing::warn!(group = err.group(), code = err.code(), error = %err, "request failed");
    } else {
        tracing::trace!(group = err.group(), code = err.code(), error = %err, "request rejected");
    }
    let mut response = json_response(status, err.to_body(expose_internal).to_string());
    if matches!(err, Error::RequestBodyTimedOut { .. }) {
        // The rest of the body may still trickle in; the connection cannot be reused.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
