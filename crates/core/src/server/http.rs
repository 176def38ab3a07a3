//! keel's HTTP surface: the versioned routes, their JSON bodies, the CORS layer (whose rules
//! are `origin.rs`'s), and the accept loop.
//!
//! The same [`axum::Router`] serves a listener (serve mode) and single requests handed over by
//! a Fetch-style host (serverless mode). Every error leaves as `{group, code, message,
//! metadata}` with the status from [`Error::http_status`]; no route answers with plain text.
//! The protocol is documented in `docs/protocol.md`, which must stay true to this file.
//! Routes reach actors only through the runtime's dispatch handle (`Server` derefs to it).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::routing::{any, get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tracing::Instrument;

use crate::cbor;
use crate::error::{Error, Result};
use crate::host::{Encoding, Payload, RequestHead};
use crate::runtime::target::{Resolve, Target};
use crate::server::shared::{bytes_response, json_response, Server};

pub use crate::runtime::ingress::{Request, Response};
pub use crate::server::shared::{error_response, PeerAddr};

/// A path extractor whose rejection the handler turns into keel's own error.
type PathOf<T> = std::result::Result<Path<T>, axum::extract::rejection::PathRejection>;
/// A WebSocket upgrade, if the request is one.
type MaybeUpgrade =
    std::result::Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>;

/// Builds the router over a runtime's server.
pub(crate) fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(crate::server::inspector::routes(
            &server,
            post(action_by_id),
        ))
        .route("/v1/actors/{name}/actions/{action}", post(action_by_key))
        .route("/v1/actors/{name}/resolve", post(resolve))
        .route("/v1/ids/{id}/actions/{action}", post(action_by_id))
        .route("/v1/ids/{id}/raw", any(raw_by_id))
        .route("/v1/ids/{id}/raw/{*path}", any(raw_by_id))
        .route("/v1/actors/{name}/connect", get(connect))
        .route("/v1/actors/{name}/raw/{key}", any(raw))
        .route("/v1/actors/{name}/raw/{key}/{*path}", any(raw))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(server.clone(), cors))
        .with_state(server)
}

/// The CORS layer around every route. A preflight (`OPTIONS` with
/// `Access-Control-Request-Method`) from a listed origin is answered here; from any other
/// origin it is refused with `auth.origin_not_allowed` and no CORS headers. Other responses
/// to a listed origin carry `Access-Control-Allow-Origin` (the rules are `origin.rs`'s).
async fn cors(
    State(server): State<Arc<Server>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(origin) = crate::origin::origin_of(request.headers()) else {
        return next.run(request).await;
    };
    let grant = server.config.allowed_origins.grant(&origin);
    let preflight = request.method() == axum::http::Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        return match grant {
            Some(grant) => crate::origin::preflight_response(grant, &origin, request.headers()),
            None => error_response(&Error::OriginNotAllowed { origin }, server.config.dev),
        };
    }
    let mut response = next.run(request).await;
    if let Some(grant) = grant {
        crate::origin::allow(response.headers_mut(), grant, &origin);
    }
    response
}

/// Handles one request without a listener.
pub(crate) async fn handle(router: Router, request: Request) -> Response {
    match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// A request tunneled to the already-resolved actor `actor_id`, as keel's router serves it:
/// RivetKit's `/action/{name}` (with `{"args": [...]}`, answered `{"output": ...}`) is the
/// by-id action route `/v1/ids/{actor_id}/actions/{name}`, whose body has the same shape;
/// `/request[/...]` is the by-id raw route `/v1/ids/{actor_id}/raw[/...]` (the actor's
/// `onRequest`, seeing what follows `/request`); every other path is one of keel's own
/// routes, served as it is.
pub(crate) fn tunneled(actor_id: &str, mut request: Request) -> Request {
    let path = request.uri().path();
    // Engine ids are plain identifiers; any other id is left to fail as an unknown route
    // rather than be spliced into a path.
    let plain_id = !actor_id.is_empty()
        && actor_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !plain_id {
        return request;
    }
    let action = path
        .strip_prefix("/action/")
        .filter(|name| !name.is_empty() && !name.contains('/'));
    let raw = path
        .strip_prefix("/request")
        .filter(|rest| rest.is_empty() || rest.starts_with('/'));
    let mut rewritten = match (action, raw) {
        (Some(action), _) => format!("/v1/ids/{actor_id}/actions/{action}"),
        (None, Some(rest)) => format!("/v1/ids/{actor_id}/raw{rest}"),
        (None, None) => return request,
    };
    if let Some(query) = request.uri().query() {
        rewritten.push('?');
        rewritten.push_str(query);
    }
    if let Ok(uri) = rewritten.parse() {
        *request.uri_mut() = uri;
    }
    request
}

/// How long the accept loop waits after a failed accept before it tries again. The usual
/// cause is running out of file descriptors, which frees up as connections close; the
/// listener stays readable meanwhile, so retrying at once would spin.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Accepts connections until the drain begins, serving each on a tracked task. On drain the
/// listener closes at once, idle keep-alive connections close, and busy ones close after their
/// current response. A failed accept (out of file descriptors) is logged once per run of
/// failures and retried after a short pause.
pub(crate) async fn accept_loop(server: Arc<Server>, listener: TcpListener, router: Router) {
    let mut failures: u64 = 0;
    loop {
        tokio::select! {
            // The drain outranks new connections.
            biased;
            _ = server.stop.cancelled() => break,
            // The next connection, or an accept error.
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        if failures == 0 {
                            tracing::warn!(error = %err, "accepting connections failed; retrying until it succeeds");
                        }
                        failures += 1;
                        tokio::select! {
                            // The drain needs no more connections.
                            biased;
                            _ = server.stop.cancelled() => break,
                            // Time to try again.
                            _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        }
                    }
                };
                if failures > 0 {
                    tracing::info!(failures, "accepting connections again");
                    failures = 0;
                }
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(error = %err, "setting TCP_NODELAY failed");
                }
                let stream = crate::server::linger::LingeringStream::new(
                    stream,
                    server.config.linger,
                    server.tracker.clone(),
                    server.force.clone(),
                );
                let service = TowerToHyperService::new(router.clone().map_request(
                    move |mut request: axum::http::Request<hyper::body::Incoming>| {
                        request.extensions_mut().insert(PeerAddr(peer));
                        request
                    },
                ));
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                let span = tracing::trace_span!("connection", %peer);
                server.tracker
                    .spawn(serve_connection(server.clone(), connection).instrument(span));
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
async fn serve_connection<C>(server: Arc<Server>, connection: C)
where
    C: std::future::Future<Output = hyper::Result<()>> + GracefulConnection,
{
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        // The drain has begun: finish the current response, then close.
        _ = server.stop.cancelled() => connection.as_mut().graceful_shutdown(),
        // The peer closed the connection (or it failed).
        result = connection.as_mut() => return log_connection_end(result),
    }
    let forced = async {
        server.force.cancelled().await;
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

async fn health(State(server): State<Arc<Server>>) -> Response {
    if server.is_draining() {
        return error_response(&Error::RegistryShuttingDown, server.config.dev);
    }
    // A store latched damaged fails every read and commit: take the process out of rotation.
    // 503, not the 500 of a call that met the damage, since it is the server that is unwell;
    // and not logged per probe: the damage was logged once, when it was found.
    if let Err(err) = server.storage.health() {
        let body = err.to_body(server.config.dev).to_string();
        return json_response(StatusCode::SERVICE_UNAVAILABLE, body);
    }
    json_response(StatusCode::OK, r#"{"status":"ok"}"#.to_string())
}

/// The Prometheus page; answered during a drain too, for as long as connections are served.
async fn metrics(State(server): State<Arc<Server>>) -> Response {
    let page = server.metrics.render();
    bytes_response(
        StatusCode::OK,
        page.into_bytes(),
        crate::metrics::CONTENT_TYPE,
    )
}

async fn route_not_found(State(server): State<Arc<Server>>, request: Request) -> Response {
    let err = Error::RouteNotFound {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    };
    error_response(&err, server.config.dev)
}

/// `GET /v1/actors/{name}/connect`: a WebSocket speaking keel's connection protocol.
async fn connect(
    State(server): State<Arc<Server>>,
    path: PathOf<String>,
    uri: Uri,
    headers: HeaderMap,
    upgrade: MaybeUpgrade,
) -> Response {
    let dev = server.config.dev;
    let result = (|| {
        crate::origin::check_upgrade(&server.config.allowed_origins, &headers)?;
        let Path(name) = path?;
        let upgrade = upgrade.map_err(|e| {
            Error::malformed(format!(
                "a WebSocket upgrade is required: {}",
                e.body_text()
            ))
        })?;
        if server.is_draining() {
            return Err(Error::RegistryShuttingDown);
        }
        server.types.get(&name)?;
        Ok((name, upgrade))
    })();
    match result {
        Ok((name, upgrade)) => {
            let head = request_head("GET", &uri, &headers);
            upgrade_socket(&server, upgrade, move |server, socket| {
                crate::server::socket::serve_keel_socket(
                    server,
                    socket,
                    crate::server::socket::SocketActor::Named(name),
                    head,
                )
            })
        }
        Err(err) => error_response(&err, dev),
    }
}

/// Accepts a WebSocket upgrade with the message size limit and keel's lean socket buffers
/// (see [`crate::actor::conn::READ_BUFFER_BYTES`]), serving the socket on a tracked task so the drain
/// waits for it.
fn upgrade_socket<F, Fut>(server: &Arc<Server>, upgrade: WebSocketUpgrade, serve: F) -> Response
where
    F: FnOnce(Arc<Server>, axum::extract::ws::WebSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = server.config.limits.max_ws_message_bytes;
    let server = server.clone();
    upgrade
        .read_buffer_size(crate::actor::conn::READ_BUFFER_BYTES)
        .write_buffer_size(crate::actor::conn::WRITE_BUFFER_BYTES)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            let tracker = server.tracker.clone();
            tracker.track_future(serve(server, socket))
        })
}

/// The path of the raw routes: the actor type and its canonical key string. What follows the
/// key is passed on as it was sent; see [`raw_sub_path`].
#[derive(Deserialize)]
struct RawPath {
    name: String,
    key: String,
}

/// What a raw route's hook sees as its path: everything after the route's first `parts`
/// `/`-separated parts (`/v1/actors/{name}/raw/{key}` is six, the first one empty;
/// `/v1/ids/{id}/raw` five) and the query string, exactly as the client sent them (still
/// percent-encoded, dot segments untouched), or `/` when nothing follows. Decoding would let
/// `%2F` split a segment, `%3F` start a query and `..%2F` climb out of a prefix.
fn raw_sub_path(uri: &axum::http::Uri, parts: usize) -> String {
    let rest = uri
        .path()
        .splitn(parts + 1, '/')
        .nth(parts)
        .unwrap_or_default();
    let mut sub_path = format!("/{rest}");
    if let Some(query) = uri.query() {
        sub_path.push('?');
        sub_path.push_str(query);
    }
    sub_path
}

/// `ANY /v1/actors/{name}/raw/{key}[/{*path}]`: the actor's `onRequest`, or its
/// `onWebSocket` for a WebSocket upgrade.
async fn raw(
    State(server): State<Arc<Server>>,
    path: PathOf<RawPath>,
    upgrade: MaybeUpgrade,
    request: Request,
) -> Response {
    let dev = server.config.dev;
    let result = async {
        let Path(raw_path) = path?;
        let key = crate::key::decode(&raw_path.key)?;
        let target = Target::Key {
            name: raw_path.name.clone(),
            key,
            mode: Resolve::GetOrCreate,
            input: None,
        };
        let sub_path = raw_sub_path(request.uri(), 6);
        serve_raw(
            &server,
            Some(&raw_path.name),
            target,
            sub_path,
            upgrade,
            request,
        )
        .await
    }
    .await;
    result.unwrap_or_else(|err| error_response(&err, dev))
}

/// `ANY /v1/ids/{id}/raw[/{*path}]`: [`raw`] for the actor with this id. The engine's
/// gateway reaches it as `/request[/...]` (see [`tunneled`]).
async fn raw_by_id(
    State(server): State<Arc<Server>>,
    path: PathOf<RawIdPath>,
    upgrade: MaybeUpgrade,
    request: Request,
) -> Response {
    let dev = server.config.dev;
    let result = async {
        let Path(raw_path) = path?;
        let sub_path = raw_sub_path(request.uri(), 5);
        serve_raw(
            &server,
            None,
            Target::Id(raw_path.id),
            sub_path,
            upgrade,
            request,
        )
        .await
    }
    .await;
    result.unwrap_or_else(|err| error_response(&err, dev))
}

/// The path of the by-id raw routes.
#[derive(Deserialize)]
struct RawIdPath {
    id: String,
}

/// The body the raw routes share: checks the upgrade's origin and the type's hook (before the
/// actor is resolved when the type is known from the path, so a type without the hook gets no
/// actor row), then serves the socket or the request.
async fn serve_raw(
    server: &Arc<Server>,
    name: Option<&str>,
    target: Target,
    sub_path: String,
    upgrade: MaybeUpgrade,
    request: Request,
) -> Result<Response> {
    if upgrade.is_ok() {
        crate::origin::check_upgrade(&server.config.allowed_origins, request.headers())?;
    }
    let is_upgrade = upgrade.is_ok();
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let check = |name: &str| {
        server
            .types
            .get(name)?
            .check_raw(is_upgrade, &method, &path)
    };
    if let Some(name) = name {
        check(name)?;
    }
    let info = server.resolve(target).await?;
    if name.is_none() {
        check(&info.name)?;
    }
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect();
    if let Ok(upgrade) = upgrade {
        return Ok(upgrade_socket(server, upgrade, move |server, socket| {
            crate::server::socket::serve_raw_socket(server, socket, info, sub_path, headers)
        }));
    }
    let request_headers = request.headers().clone();
    let body = read_body(server, &request_headers, request.into_body()).await?;
    let raw_request = crate::host::RawRequest {
        method,
        path: sub_path,
        headers,
        body: body.to_vec(),
    };
    let response = server.request(&info, raw_request).await?;
    let mut builder = axum::http::Response::builder().status(response.status);
    for (name, value) in &response.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder
        .body(Body::from(response.body))
        .map_err(|err| Error::ActorInternal {
            message: format!("onRequest returned an invalid response: {err}"),
        })
}

async fn method_not_allowed(State(server): State<Arc<Server>>, request: Request) -> Response {
    let err = Error::MethodNotAllowed {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    };
    error_response(&err, server.config.dev)
}

/// The JSON form of a request body; every route takes a subset of these fields.
#[derive(Deserialize)]
struct JsonEnvelope<'a> {
    #[serde(default)]
    key: Option<Vec<String>>,
    #[serde(borrow, default)]
    args: Option<&'a RawValue>,
    #[serde(default)]
    mode: Option<ModeField>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
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

/// A request body, decoded from JSON or CBOR. `args` and `input` stay in the client's
/// encoding for the host to decode.
struct Envelope {
    key: Option<Vec<String>>,
    args: Payload,
    mode: Resolve,
    input: Option<Payload>,
}

impl Envelope {
    fn parse(bytes: &[u8], encoding: Encoding) -> Result<Envelope> {
        match encoding {
            Encoding::Json => {
                if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
                    return Err(Error::malformed("the body must be a JSON object"));
                }
                let body: JsonEnvelope = serde_json::from_slice(bytes)
                    .map_err(|err| Error::malformed(format!("invalid JSON body: {err}")))?;
                let args = match body.args {
                    None => Payload::json("[]"),
                    Some(raw) if raw.get().trim_start().starts_with('[') => {
                        Payload::json(raw.get())
                    }
                    Some(_) => return Err(Error::malformed("\"args\" must be an array")),
                };
                Ok(Envelope {
                    key: body.key,
                    args,
                    mode: body.mode.into(),
                    input: body.input.map(|raw| Payload::json(raw.get())),
                })
            }
            Encoding::Cbor => {
                let mut envelope = Envelope {
                    key: None,
                    args: Payload::cbor(vec![0x80]),
                    mode: Resolve::GetOrCreate,
                    input: None,
                };
                for (name, range) in cbor::map_entries(bytes)? {
                    match name.as_str() {
                        "key" => envelope.key = Some(cbor::text_array(bytes, range.start)?),
                        "args" if cbor::is_array(bytes, range.start) => {
                            envelope.args = Payload::cbor(bytes[range].to_vec())
                        }
                        "args" => return Err(Error::malformed("\"args\" must be an array")),
                        "mode" => {
                            envelope.mode = match cbor::text(bytes, range.start)?.as_str() {
                                "get" => Resolve::Get,
                                "create" => Resolve::Create,
                                "getOrCreate" => Resolve::GetOrCreate,
                                other => {
                                    return Err(Error::malformed(format!("unknown mode {other:?}")))
                                }
                            }
                        }
                        "input" => envelope.input = Some(Payload::cbor(bytes[range].to_vec())),
                        // Unknown fields are ignored, as in JSON bodies.
                        _ => {}
                    }
                }
                Ok(envelope)
            }
        }
    }

    /// Reads a body up to the limit and decodes it in the request's encoding.
    async fn read(
        server: &Server,
        headers: &HeaderMap,
        body: Body,
        encoding: Encoding,
    ) -> Result<Envelope> {
        let bytes = read_body(server, headers, body).await?;
        Envelope::parse(&bytes, encoding)
    }

    /// The target of a by-key route for actor type `name`, and the call's arguments.
    fn into_key_target(self, name: String) -> Result<(Target, Payload)> {
        let key = self
            .key
            .ok_or_else(|| Error::malformed("the body needs a \"key\" array"))?;
        let target = Target::Key {
            name,
            key,
            mode: self.mode,
            input: self.input,
        };
        Ok((target, self.args))
    }
}

impl From<axum::extract::rejection::PathRejection> for Error {
    fn from(rejection: axum::extract::rejection::PathRejection) -> Error {
        Error::malformed(rejection.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for Error {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Error {
        Error::malformed(rejection.body_text())
    }
}

/// The encoding of an action body, from its `content-type`: `application/json` or
/// `application/cbor`, with or without parameters such as `charset`. Anything else, or none,
/// is `request.unsupported_media_type`: a browser sends other types (`text/plain`, forms)
/// cross-origin without asking first, and JSON or CBOR make it ask (see [`crate::origin`]).
fn request_encoding(headers: &HeaderMap) -> Result<Encoding> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(Error::UnsupportedMediaType {
            content_type: "no content-type".to_string(),
        });
    };
    let value = String::from_utf8_lossy(value.as_bytes());
    let media_type = value.split(';').next().unwrap_or_default().trim();
    if media_type.eq_ignore_ascii_case("application/json") {
        Ok(Encoding::Json)
    } else if media_type.eq_ignore_ascii_case(CBOR_TYPE) {
        Ok(Encoding::Cbor)
    } else {
        Err(Error::UnsupportedMediaType {
            content_type: value.into_owned(),
        })
    }
}

/// The encoding of a successful response: what `accept` names, else the request's own.
fn response_encoding(headers: &HeaderMap, request: Encoding) -> Encoding {
    match headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        Some(accept) if accept.contains(CBOR_TYPE) => Encoding::Cbor,
        Some(accept) if accept.contains("application/json") => Encoding::Json,
        _ => request,
    }
}

/// The media type of CBOR bodies.
pub const CBOR_TYPE: &str = "application/cbor";

/// The request head a call or connection hands to user code as `c.request`.
fn request_head(method: &str, uri: &Uri, headers: &HeaderMap) -> RequestHead {
    let mut block = String::with_capacity(
        headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum(),
    );
    for (name, value) in headers {
        // A value that is not visible ASCII cannot be a Fetch header string; it is left out,
        // as the raw routes leave it out.
        if let Ok(value) = value.to_str() {
            block.push_str(name.as_str());
            block.push_str(": ");
            block.push_str(value);
            block.push_str("\r\n");
        }
    }
    RequestHead {
        method: method.to_string(),
        url: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string()),
        headers: block,
    }
}

async fn action_by_key(
    State(server): State<Arc<Server>>,
    path: PathOf<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    call_action(server, path, uri, headers, body, |name, envelope| {
        envelope.into_key_target(name)
    })
    .await
}

pub(crate) async fn action_by_id(
    State(server): State<Arc<Server>>,
    path: PathOf<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    call_action(server, path, uri, headers, body, |id, envelope| {
        Ok((Target::Id(id), envelope.args))
    })
    .await
}

/// One action call over HTTP: the body's envelope read in the request's encoding, the target
/// named by the path's first segment (`target`), the reply in the encoding the client accepts.
async fn call_action(
    server: Arc<Server>,
    path: PathOf<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
    target: impl FnOnce(String, Envelope) -> Result<(Target, Payload)>,
) -> Response {
    let dev = server.config.dev;
    let result = async {
        let encoding = request_encoding(&headers)?;
        let output = response_encoding(&headers, encoding);
        let Path((named, action)) = path?;
        let envelope = Envelope::read(&server, &headers, body, encoding).await?;
        let (target, args) = target(named, envelope)?;
        let head = request_head("POST", &uri, &headers);
        server
            .call(target, &action, args, output, Some(head), Vec::new())
            .await
    }
    .await;
    respond(result, dev)
}

async fn resolve(
    State(server): State<Arc<Server>>,
    path: PathOf<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let dev = server.config.dev;
    let result = async {
        let encoding = request_encoding(&headers)?;
        let Path(name) = path?;
        let envelope = Envelope::read(&server, &headers, body, encoding).await?;
        let (target, _) = envelope.into_key_target(name)?;
        let info = server.resolve(target).await?;
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

fn respond(result: Result<Payload>, dev: bool) -> Response {
    match result {
        Ok(output) => match output.encoding {
            Encoding::Json => {
                let mut body = Vec::with_capacity(output.bytes.len() + 12);
                body.extend_from_slice(br#"{"output":"#);
                body.extend_from_slice(&output.bytes);
                body.push(b'}');
                bytes_response(StatusCode::OK, body, "application/json")
            }
            Encoding::Cbor => bytes_response(
                StatusCode::OK,
                cbor::output_envelope(&output.bytes),
                CBOR_TYPE,
            ),
        },
        Err(err) => error_response(&err, dev),
    }
}

/// Reads a body up to the configured limit, within the body timeout: a client that stops
/// sending gets `request.body_timed_out`, and its connection closes.
async fn read_body(server: &Server, headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes> {
    let limit = server.config.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(Error::RequestTooLarge { limit });
    }
    let timeout = server.config.body_timeout;
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| Error::RequestBodyTimedOut {
            timeout_ms: timeout.as_millis() as u64,
        })?;
    read.map_err(|err| {
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
