//! keel's HTTP surface: the versioned routes, their JSON bodies, and the accept loop.
//!
//! The same [`axum::Router`] serves a listener (serve mode) and single requests handed over by
//! a Fetch-style host (serverless mode). Every error leaves as `{group, code, message,
//! metadata}` with the status from [`Error::http_status`]; no route answers with plain text.
//! The protocol is documented in `docs/protocol.md`, which must stay true to this file.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::runtime::{Core, Resolve, Target};

/// An HTTP request as keel handles it.
pub type Request = axum::http::Request<Body>;
/// An HTTP response as keel produces it.
pub type Response = axum::http::Response<Body>;

/// The protocol version, the first segment of every versioned route.
pub const PROTOCOL_VERSION: &str = "v1";

/// Builds the router over a runtime's core.
pub(crate) fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/actors/{name}/actions/{action}", post(action_by_key))
        .route("/v1/actors/{name}/resolve", post(resolve))
        .route("/v1/ids/{id}/actions/{action}", post(action_by_id))
        .fallback(route_not_found)
        .method_not_allowed_fallback(route_not_found)
        .with_state(core)
}

/// Handles one request without a listener.
pub(crate) async fn handle(router: Router, request: Request) -> Response {
    match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Accepts connections until the drain begins, serving each on a tracked task. On drain the
/// listener closes at once, idle keep-alive connections close, and busy ones close after their
/// current response.
pub(crate) async fn accept_loop(core: Arc<Core>, listener: TcpListener, router: Router) {
    loop {
        tokio::select! {
            // The drain outranks new connections.
            biased;
            _ = core.stop.cancelled() => break,
            // The next connection, or an accept error.
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Running out of file descriptors is transient; back off briefly
                        // instead of spinning.
                        tracing::warn!(error = %err, "accepting a connection failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(error = %err, "setting TCP_NODELAY failed");
                }
                let service = TowerToHyperService::new(router.clone());
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                let span = tracing::trace_span!("connection", %peer);
                core.tracker
                    .spawn(serve_connection(core.clone(), connection).instrument(span));
            }
        }
    }
    drop(listener);
    tracing::debug!("listener closed");
}

/// How long a connection may still write once the drain is forced: long enough for the
/// `registry.shut_down` replies of abandoned requests to go out, short enough that a peer that
/// never reads cannot hold the process.
const FORCED_WRITE_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs one connection until the peer closes it. When the drain begins the connection ends
/// after its current response; once the drain is forced it gets a last moment to write the
/// errors of abandoned requests, then it is dropped.
async fn serve_connection<C>(core: Arc<Core>, connection: C)
where
    C: std::future::Future<Output = hyper::Result<()>> + GracefulConnection,
{
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        // The drain has begun: finish the current response, then close.
        _ = core.stop.cancelled() => connection.as_mut().graceful_shutdown(),
        // The peer closed the connection (or it failed).
        result = connection.as_mut() => return log_connection_end(result),
    }
    let forced = async {
        core.force.cancelled().await;
        tokio::time::sleep(FORCED_WRITE_GRACE).await;
    };
    tokio::select! {
        // Forced, and the last replies had their moment.
        _ = forced => {}
        // The last response went out.
        result = connection.as_mut() => log_connection_end(result),
    }
}

/// A connection that can be asked to close after its current response.
trait GracefulConnection {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

fn log_connection_end(result: hyper::Result<()>) {
    if let Err(err) = result {
        tracing::trace!(error = %err, "connection ended with an error");
    }
}

async fn health(State(core): State<Arc<Core>>) -> Response {
    if core.is_draining() {
        return error_response(&Error::RegistryShuttingDown, core.config.dev);
    }
    json_response(StatusCode::OK, r#"{"status":"ok"}"#.to_string())
}

async fn route_not_found(State(core): State<Arc<Core>>, request: Request) -> Response {
    let err = Error::RouteNotFound {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    };
    error_response(&err, core.config.dev)
}

/// The body of `POST /v1/actors/{name}/actions/{action}`.
#[derive(Deserialize)]
struct ActionByKeyBody<'a> {
    key: Vec<String>,
    #[serde(borrow, default)]
    args: Option<&'a RawValue>,
    #[serde(default)]
    mode: Option<ModeField>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
}

/// The body of `POST /v1/actors/{name}/resolve`.
#[derive(Deserialize)]
struct ResolveBody<'a> {
    key: Vec<String>,
    #[serde(default)]
    mode: Option<ModeField>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
}

/// The body of `POST /v1/ids/{id}/actions/{action}`.
#[derive(Deserialize)]
struct ActionByIdBody<'a> {
    #[serde(borrow, default)]
    args: Option<&'a RawValue>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "camelCase")]
enum ModeField {
    Get,
    Create,
    GetOrCreate,
}

impl From<Option<ModeField>> for Resolve {
    fn from(mode: Option<ModeField>) -> Resolve {
        match mode {
            Some(ModeField::Get) => Resolve::Get,
            Some(ModeField::Create) => Resolve::Create,
            Some(ModeField::GetOrCreate) | None => Resolve::GetOrCreate,
        }
    }
}

async fn action_by_key(
    State(core): State<Arc<Core>>,
    path: std::result::Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let dev = core.config.dev;
    let result = async {
        let Path((name, action)) = path.map_err(|e| Error::malformed(e.body_text()))?;
        let bytes = read_body(&core, &headers, body).await?;
        let body: ActionByKeyBody = parse_json(&bytes)?;
        let args = args_of(body.args)?;
        let target = Target::Key {
            name,
            key: body.key,
            mode: body.mode.into(),
            input: body.input.map(|raw| raw.get().to_string()),
        };
        crate::runtime::call_on(&core, target, &action, args).await
    }
    .await;
    respond(result, dev)
}

async fn action_by_id(
    State(core): State<Arc<Core>>,
    path: std::result::Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let dev = core.config.dev;
    let result = async {
        let Path((id, action)) = path.map_err(|e| Error::malformed(e.body_text()))?;
        let bytes = read_body(&core, &headers, body).await?;
        let body: ActionByIdBody = parse_json(&bytes)?;
        let args = args_of(body.args)?;
        crate::runtime::call_on(&core, Target::Id(id), &action, args).await
    }
    .await;
    respond(result, dev)
}

async fn resolve(
    State(core): State<Arc<Core>>,
    path: std::result::Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let dev = core.config.dev;
    let result = async {
        let Path(name) = path.map_err(|e| Error::malformed(e.body_text()))?;
        let bytes = read_body(&core, &headers, body).await?;
        let body: ResolveBody = parse_json(&bytes)?;
        let info = crate::runtime::resolve_on(
            &core,
            Target::Key {
                name,
                key: body.key,
                mode: body.mode.into(),
                input: body.input.map(|raw| raw.get().to_string()),
            },
        )
        .await?;
        Ok(serde_json::json!({
            "actorId": &*info.id,
            "name": &*info.name,
            "key": info.key,
        })
        .to_string())
    }
    .await;
    match result {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(err) => error_response(&err, dev),
    }
}

fn respond(result: Result<String>, dev: bool) -> Response {
    match result {
        Ok(output) => {
            let mut body = String::with_capacity(output.len() + 12);
            body.push_str(r#"{"output":"#);
            body.push_str(&output);
            body.push('}');
            json_response(StatusCode::OK, body)
        }
        Err(err) => error_response(&err, dev),
    }
}

/// Reads a body up to the configured limit.
async fn read_body(core: &Core, headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes> {
    let limit = core.config.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(Error::RequestTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        let too_large = std::error::Error::source(&err)
            .and_then(|source| source.downcast_ref::<http_body_util::LengthLimitError>())
            .is_some()
            || err.to_string().contains("length limit");
        if too_large {
            Error::RequestTooLarge { limit }
        } else {
            Error::malformed(format!("reading the request body failed: {err}"))
        }
    })
}

fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|err| Error::malformed(format!("invalid JSON body: {err}")))
}

/// The action arguments as JSON array text; absent means no arguments.
fn args_of(args: Option<&RawValue>) -> Result<String> {
    match args {
        None => Ok("[]".to_string()),
        Some(raw) if raw.get().trim_start().starts_with('[') => Ok(raw.get().to_string()),
        Some(_) => Err(Error::malformed("\"args\" must be a JSON array")),
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Renders an error with its one status mapping.
pub fn error_response(err: &Error, expose_internal: bool) -> Response {
    let status =
        StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
        tracing::warn!(group = err.group(), code = err.code(), error = %err, "request failed");
    } else {
        tracing::debug!(group = err.group(), code = err.code(), error = %err, "request rejected");
    }
    json_response(status, err.to_body(expose_internal).to_string())
}
