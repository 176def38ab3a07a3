//! Conversions between JS-facing objects and core types: configuration in, errors out.
//!
//! This is the one place a core error becomes a JS-facing value: every async export resolves
//! with an [`Outcome`] whose `error` the TypeScript layer turns into a `KeelError`, so `group`
//! and `code` survive the async boundary as fields, never as text to parse.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use keel_core::{
    ActorType, AllowedOrigins, Durability, Error, Hooks, InspectorConfig, InspectorToken, Limits,
    RuntimeConfig,
};
use napi::bindgen_prelude::Buffer;
use napi_derive::napi;

/// A structured keel error as it crosses to JS.
#[napi(object)]
#[derive(Debug, Clone)]
pub struct ErrorInfo {
    /// The error's group, such as `actor` or `registry`.
    pub group: String,
    /// The error's code within its group, such as `not_found`.
    pub code: String,
    /// A human-readable message.
    pub message: String,
    /// Structured details, if any.
    pub metadata: Option<serde_json::Value>,
}

impl ErrorInfo {
    /// Converts a core error. Internal details stay hidden unless `dev` is set.
    pub fn from_error(err: &Error, dev: bool) -> ErrorInfo {
        ErrorInfo {
            group: err.group().to_string(),
            code: err.code().to_string(),
            message: err.public_message(dev),
            metadata: err.metadata(),
        }
    }

    /// Converts an error reported by the JS host into a core error: a `UserError` keeps its
    /// code and message, a thrown `Forbidden` is `auth.forbidden` with its message, a KV limit
    /// error keeps its own code, `onStateChange` changing the state and a call cycle keep
    /// `actor.state_change_mutation` and `actor.call_cycle`, a client payload the JS decoder
    /// refused is `request.malformed` (the host reports that group only for this), a stored
    /// state it could not decode is `storage.corrupt` for its actor; anything else is internal.
    pub fn into_error(self) -> Error {
        let limit = || {
            self.metadata
                .as_ref()
                .and_then(|m| m["limit"].as_u64())
                .unwrap_or_default() as usize
        };
        match (self.group.as_str(), self.code.as_str()) {
            ("user", _) => Error::User {
                code: self.code,
                message: self.message,
                metadata: self.metadata,
            },
            ("auth", "forbidden") => Error::Forbidden {
                message: self.message,
            },
            ("kv", "key_too_large") => Error::KvKeyTooLarge { limit: limit() },
            ("kv", "value_too_large") => Error::KvValueTooLarge { limit: limit() },
            ("request", "malformed") => Error::malformed(self.message),
            ("actor", "state_change_mutation") => Error::StateChangeMutation {
                message: self.message,
            },
            ("actor", "call_cycle") => Error::ActorCallCycle {
                actor_id: self
                    .metadata
                    .as_ref()
                    .and_then(|m| m["actorId"].as_str())
                    .unwrap_or_default()
                    .to_string(),
            },
            ("storage", "corrupt") => Error::StorageCorrupt {
                actor_id: self
                    .metadata
                    .as_ref()
                    .and_then(|m| m["actorId"].as_str())
                    .map(str::to_string),
                detail: self.message,
                source: None,
            },
            _ => Error::ActorInternal {
                message: self.message,
            },
        }
    }
}

/// The settled result of an async export: `error` is set exactly when it failed.
#[napi(object)]
pub struct Outcome {
    /// The failure, if any.
    pub error: Option<ErrorInfo>,
}

impl Outcome {
    /// Wraps a core result.
    pub fn from_result(result: keel_core::Result<()>, dev: bool) -> Outcome {
        Outcome {
            error: result.err().map(|err| ErrorInfo::from_error(&err, dev)),
        }
    }
}

/// How an actor type is registered from JS.
#[napi(object)]
pub struct ActorTypeOptions {
    /// The names of the type's actions.
    pub actions: Vec<String>,
    /// Overrides the runtime's action timeout for this type, in milliseconds.
    pub action_timeout_ms: Option<u32>,
    /// Overrides the runtime's idle time before sleep for this type, in milliseconds.
    pub sleep_timeout_ms: Option<u32>,
    /// Whether the type has `onRequest`; without it the raw route answers 404.
    pub raw_requests: bool,
    /// Whether the type has `onWebSocket`; without it a raw upgrade answers 404.
    pub raw_sockets: bool,
    /// Whether the type has `onBeforeConnect`.
    pub on_before_connect: bool,
    /// Whether the type has `createConnState`.
    pub create_conn_state: bool,
    /// Whether the type has `onConnect`.
    pub on_connect: bool,
    /// Whether the type has `onDisconnect`.
    pub on_disconnect: bool,
    /// The declared events with a `canSubscribe` check.
    pub guarded_events: Option<Vec<String>>,
    /// Whether the type's connections survive its sleep (`hibernatableConnections`).
    pub hibernatable_connections: Option<bool>,
    /// How long a connection restored after a restart may take to resume, in milliseconds.
    pub reconnect_window_ms: Option<u32>,
}

impl ActorTypeOptions {
    /// The core definition of a type named `name`.
    pub fn into_actor_type(self, name: String) -> Result<ActorType, Error> {
        let mut actor_type = ActorType::new(name, self.actions);
        actor_type.raw_requests = self.raw_requests;
        actor_type.raw_sockets = self.raw_sockets;
        actor_type.hooks = Hooks {
            on_before_connect: self.on_before_connect,
            create_conn_state: self.create_conn_state,
            on_connect: self.on_connect,
            on_disconnect: self.on_disconnect,
        };
        actor_type.guarded_events = self
            .guarded_events
            .unwrap_or_default()
            .into_iter()
            .collect();
        if let Some(ms) = self.action_timeout_ms {
            actor_type.action_timeout = Some(millis("actionTimeoutMs", ms)?);
        }
        if let Some(ms) = self.sleep_timeout_ms {
            actor_type.sleep_timeout = Some(millis("sleepTimeoutMs", ms)?);
        }
        actor_type.hibernatable_conns = self.hibernatable_connections.unwrap_or(false);
        if let Some(ms) = self.reconnect_window_ms {
            // A per-type option only, so not in core's table of `setup()` options.
            if ms == 0 {
                return Err(Error::config("reconnectWindowMs must be at least 1"));
            }
            actor_type.reconnect_window = Duration::from_millis(u64::from(ms));
        }
        Ok(actor_type)
    }
}

/// Runtime settings from `setup()`; every field is optional and falls back to core's default
/// (the numeric ones are listed, with their defaults and ranges, in `keel_core::options`).
#[napi(object)]
#[derive(Default, Clone)]
pub struct RuntimeOptions {
    /// Host to listen on (serve mode).
    pub host: Option<String>,
    /// Port to listen on (serve mode); 0 picks a free one.
    pub port: Option<u32>,
    /// Directory holding the database.
    pub data_dir: Option<String>,
    /// `full` (default) or `relaxed`.
    pub durability: Option<String>,
    /// Bound on the whole graceful drain, in milliseconds.
    pub drain_timeout_ms: Option<u32>,
    /// Default per-action timeout, in milliseconds.
    pub action_timeout_ms: Option<u32>,
    /// Timeout of one lifecycle hook, in milliseconds.
    pub hook_timeout_ms: Option<u32>,
    /// Idle time before an actor sleeps, in milliseconds.
    pub sleep_timeout_ms: Option<u32>,
    /// Largest HTTP request body, in bytes.
    pub max_body_bytes: Option<u32>,
    /// Messages one actor may hold queued.
    pub max_mailbox_len: Option<u32>,
    /// Largest key segment, in bytes.
    pub max_key_segment_bytes: Option<u32>,
    /// Largest key, in bytes.
    pub max_key_bytes: Option<u32>,
    /// Dev mode: internal error messages reach clients, and the inspector generates a token
    /// when none is given.
    pub dev: Option<bool>,
    /// The inspector's bearer token (16 to 512 visible ASCII characters). Without one the
    /// inspector is off, except in dev mode.
    pub inspector_token: Option<String>,
    /// Let the inspector answer peers off the loopback interface, and serverless requests.
    pub inspector_allow_remote: Option<bool>,
    /// Bound on receiving one request body, in milliseconds.
    pub body_timeout_ms: Option<u32>,
    /// How long a closing connection reads and discards what the client still sends, in
    /// milliseconds; 0 closes at once.
    pub linger_ms: Option<u32>,
    /// Browser origins (such as `https://app.example`, or `*` for any, without credentials)
    /// that may open WebSockets and get CORS headers, besides the server's own.
    pub allowed_origins: Option<Vec<String>>,
    /// Run as an envoy of a Rivet Engine instead of listening (`registry.start()` only).
    pub engine: Option<EngineOptions>,
}

/// Where the Rivet Engine is, for engine mode. Each field falls back to its `KEEL_ENGINE_*`
/// environment variable, then its default; without an endpoint keel runs embedded.
#[napi(object)]
#[derive(Clone, Default)]
pub struct EngineOptions {
    /// The engine's address, `http://host:port`. `KEEL_ENGINE_ENDPOINT`.
    pub endpoint: Option<String>,
    /// The engine namespace. `KEEL_ENGINE_NAMESPACE`, default `default`.
    pub namespace: Option<String>,
    /// The pool (runner name) to serve. `KEEL_ENGINE_POOL`, default `default`.
    pub pool: Option<String>,
    /// The engine's admin token, if it has auth. `KEEL_ENGINE_TOKEN`.
    pub token: Option<String>,
}

impl RuntimeOptions {
    /// The engine settings, with environment fallbacks; `None` runs embedded.
    pub fn engine_config(&self) -> Result<Option<keel_envoy::EngineConfig>, Error> {
        let options = self.engine.clone().unwrap_or_default();
        keel_envoy::EngineConfig::resolve(
            options.endpoint,
            options.namespace,
            options.pool,
            options.token,
            |name| std::env::var(name).ok(),
        )
    }
}

impl RuntimeOptions {
    /// The core configuration these options describe. Every number is checked against
    /// core's table of options (`keel_core::options`), which also holds every default.
    pub fn to_config(&self) -> Result<RuntimeConfig, Error> {
        let mut config = RuntimeConfig::default();
        let host = self
            .host
            .clone()
            .unwrap_or_else(|| keel_core::config::DEFAULT_HOST.to_string());
        let port = match self.port {
            Some(port) => number("port", port)? as u16,
            None => keel_core::config::DEFAULT_PORT,
        };
        config.listen = resolve_listen(&host, port)?;
        if let Some(dir) = &self.data_dir {
            config.data_dir = PathBuf::from(dir);
        }
        if let Some(durability) = &self.durability {
            config.durability = Durability::parse(durability)?;
        }
        if let Some(ms) = self.drain_timeout_ms {
            config.drain_timeout = millis("drainTimeoutMs", ms)?;
        }
        if let Some(ms) = self.action_timeout_ms {
            config.action_timeout = millis("actionTimeoutMs", ms)?;
        }
        if let Some(ms) = self.hook_timeout_ms {
            config.hook_timeout = millis("hookTimeoutMs", ms)?;
        }
        if let Some(ms) = self.sleep_timeout_ms {
            config.sleep_timeout = millis("sleepTimeoutMs", ms)?;
        }
        let size = |name: &str, value: Option<u32>, default: usize| match value {
            Some(value) => number(name, value).map(|v| v as usize),
            None => Ok(default),
        };
        let defaults = Limits::default();
        config.limits = Limits {
            max_body_bytes: size("maxBodyBytes", self.max_body_bytes, defaults.max_body_bytes)?,
            max_mailbox_len: size(
                "maxMailboxLen",
                self.max_mailbox_len,
                defaults.max_mailbox_len,
            )?,
            max_key_segment_bytes: size(
                "maxKeySegmentBytes",
                self.max_key_segment_bytes,
                defaults.max_key_segment_bytes,
            )?,
            max_key_bytes: size("maxKeyBytes", self.max_key_bytes, defaults.max_key_bytes)?,
            ..defaults
        };
        if let Some(ms) = self.body_timeout_ms {
            config.body_timeout = millis("bodyTimeoutMs", ms)?;
        }
        if let Some(ms) = self.linger_ms {
            config.linger = millis("lingerMs", ms)?;
        }
        if let Some(origins) = &self.allowed_origins {
            config.allowed_origins = AllowedOrigins::parse(origins)?;
        }
        config.dev = self.dev.unwrap_or(false);
        config.inspector = InspectorConfig {
            token: self
                .inspector_token
                .clone()
                .filter(|token| !token.is_empty())
                .map(InspectorToken::new),
            allow_remote: self.inspector_allow_remote.unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }
}

/// A numeric option, checked against its range in core's table.
fn number(name: &str, value: u32) -> Result<u64, Error> {
    keel_core::options::check(name, u64::from(value))
}

/// A millisecond option, checked against its range in core's table.
fn millis(name: &str, ms: u32) -> Result<Duration, Error> {
    number(name, ms).map(Duration::from_millis)
}

fn resolve_listen(host: &str, port: u16) -> Result<SocketAddr, Error> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| Error::config(format!("cannot resolve host {host:?}")))
}

/// A Fetch `Request`, flattened for the serverless handler.
#[napi(object)]
pub struct HttpRequest {
    /// The method, such as `POST`.
    pub method: String,
    /// The full URL; only its path and query are used.
    pub url: String,
    /// Header name and value pairs.
    pub headers: Vec<Vec<String>>,
    /// The body, if any.
    pub body: Option<Buffer>,
}

impl HttpRequest {
    /// The request as core handles it.
    pub fn into_http(self) -> Result<keel_core::http::Request, Error> {
        let path = match self.url.find("://") {
            Some(scheme_end) => {
                let rest = &self.url[scheme_end + 3..];
                rest.find('/').map_or("/", |slash| &rest[slash..])
            }
            None => self.url.as_str(),
        };
        let mut builder = axum::http::Request::builder()
            .method(self.method.as_str())
            .uri(path);
        for pair in &self.headers {
            if let [name, value] = pair.as_slice() {
                builder = builder.header(name.as_str(), value.as_str());
            }
        }
        let body = self.body.map(|b| b.to_vec()).unwrap_or_default();
        builder
            .body(axum::body::Body::from(body))
            .map_err(|err| Error::malformed(format!("invalid request: {err}")))
    }
}

/// A response for the serverless handler to turn into a Fetch `Response`.
#[napi(object)]
pub struct HttpResponse {
    /// The status code.
    pub status: u32,
    /// Header name and value pairs.
    pub headers: Vec<Vec<String>>,
    /// The whole body.
    pub body: Buffer,
}

impl HttpResponse {
    /// Collects a core response.
    pub async fn from_http(response: keel_core::http::Response) -> HttpResponse {
        let (parts, body) = response.into_parts();
        let headers = parts
            .headers
            .iter()
            .filter_map(|(name, value)| {
                Some(vec![name.to_string(), value.to_str().ok()?.to_string()])
            })
            .collect();
        let body = axum::body::to_bytes(body, usize::MAX)
            .await
            .map(|bytes| bytes.to_vec())
            .unwrap_or_default();
        HttpResponse {
            status: u32::from(parts.status.as_u16()),
            headers,
            body: body.into(),
        }
    }
}
