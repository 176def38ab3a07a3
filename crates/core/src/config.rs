//! Runtime configuration, defined once with its defaults.
//!
//! Every limit and timeout keel enforces is configured here, so the binding, the docs and the
//! tests all read one value. A concept with its own home keeps its rules and defaults there and
//! only its configured numbers here (KV: `kv_key.rs`). Durations are `Duration` inside Rust;
//! the binding converts `*Ms` numbers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::faults::FaultInjector;
use crate::kv_key;
pub use crate::origin::AllowedOrigins;

/// Default HTTP host.
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// Default HTTP port.
pub const DEFAULT_PORT: u16 = 6420;
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = ".keel";
/// Default bound on the whole graceful drain.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Default per-action timeout.
pub const DEFAULT_ACTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Default idle time before an actor sleeps.
pub const DEFAULT_SLEEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default timeout of one lifecycle hook (create, wake, sleep).
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(15);
/// Default bound on receiving one request body, from the moment keel starts reading it.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a closing connection keeps reading (and discarding) what the client still
/// sends, so that a refusal reaches the client instead of a connection reset.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(1);

/// Default largest HTTP request body, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 20 * 1024 * 1024;
/// Default messages one actor may hold queued.
pub const DEFAULT_MAX_MAILBOX_LEN: usize = 1024;
/// Default largest key segment, in bytes.
pub const DEFAULT_MAX_KEY_SEGMENT_BYTES: usize = 128;
/// Default largest key, in bytes.
pub const DEFAULT_MAX_KEY_BYTES: usize = 1024;

/// Sizes that bound what a client may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest HTTP request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest incoming WebSocket message, in bytes.
    pub max_ws_message_bytes: usize,
    /// Largest key segment, in bytes.
    pub max_key_segment_bytes: usize,
    /// Largest key, in bytes of its canonical string (see `key.rs`).
    pub max_key_bytes: usize,
    /// Messages one actor may hold queued before callers get `actor.overloaded`.
    pub max_mailbox_len: usize,
    /// Largest KV key, in bytes, not counting the tag byte the KV key codec puts first to mark
    /// the key's kind. `kv_key.rs` owns the default and the check, run on every commit.
    pub max_kv_key_bytes: usize,
    /// Largest KV value as the host encoded it, in bytes. `kv_key.rs` owns the default and the
    /// check, run on every commit.
    pub max_kv_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_ws_message_bytes: 64 * 1024,
            max_key_segment_bytes: DEFAULT_MAX_KEY_SEGMENT_BYTES,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_mailbox_len: DEFAULT_MAX_MAILBOX_LEN,
            max_kv_key_bytes: kv_key::DEFAULT_MAX_KEY_BYTES,
            max_kv_value_bytes: kv_key::DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

/// How hard SQLite works to make a commit survive power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: a committed write survives power loss.
    #[default]
    Full,
    /// `synchronous=NORMAL` in WAL mode: survives a process crash, but the last commits before
    /// a power loss or OS crash may roll back.
    Relaxed,
}

impl Durability {
    /// Parses the configuration spelling (`full` or `relaxed`).
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "full" => Ok(Durability::Full),
            "relaxed" => Ok(Durability::Relaxed),
            other => Err(Error::config(format!(
                "durability must be \"full\" or \"relaxed\", not {other:?}"
            ))),
        }
    }
}

/// Everything a runtime needs to start.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where the HTTP server listens (serve mode only).
    pub listen: SocketAddr,
    /// The directory holding the database.
    pub data_dir: PathBuf,
    /// Commit durability.
    pub durability: Durability,
    /// Bound on the whole graceful drain.
    pub drain_timeout: Duration,
    /// Default per-action timeout (an actor type may override it).
    pub action_timeout: Duration,
    /// Default idle time before an actor sleeps (an actor type may override it).
    pub sleep_timeout: Duration,
    /// Timeout of one lifecycle hook.
    pub hook_timeout: Duration,
    /// Request and storage limits.
    pub limits: Limits,
    /// Dev mode: internal error messages reach clients.
    pub dev: bool,
    /// Who may use the inspector API.
    pub inspector: InspectorConfig,
    /// Bound on receiving one request body; past it the request gets
    /// `request.body_timed_out` and its connection closes.
    pub body_timeout: Duration,
    /// How long a closing connection (HTTP, or a WebSocket after its close frame) reads and
    /// discards what the client still sends before it closes; zero closes at once.
    pub linger: Duration,
    /// Browser origins, besides the server's own, that may open WebSockets and get CORS
    /// headers.
    pub allowed_origins: AllowedOrigins,
    /// Faults to inject on the commit path, for tests (see `faults.rs`). `None`, the default
    /// and the only value the binding uses, checks no failpoint.
    pub faults: Option<FaultInjector>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            durability: Durability::Full,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            action_timeout: DEFAULT_ACTION_TIMEOUT,
            sleep_timeout: DEFAULT_SLEEP_TIMEOUT,
            hook_timeout: DEFAULT_HOOK_TIMEOUT,
            limits: Limits::default(),
            dev: false,
            inspector: InspectorConfig::default(),
            body_timeout: DEFAULT_BODY_TIMEOUT,
            linger: DEFAULT_LINGER,
            allowed_origins: AllowedOrigins::default(),
            faults: None,
        }
    }
}

impl RuntimeConfig {
    /// Checks values that would make the runtime misbehave.
    pub fn validate(&self) -> Result<()> {
        if self.limits.max_mailbox_len == 0 {
            return Err(Error::config("the mailbox length must be at least 1"));
        }
        if self.action_timeout.is_zero() {
            return Err(Error::config("the action timeout must be positive"));
        }
        if self.hook_timeout.is_zero() {
            return Err(Error::config("the hook timeout must be positive"));
        }
        if self.body_timeout.is_zero() {
            return Err(Error::config("the body timeout must be positive"));
        }
        if self.limits.max_body_bytes == 0 {
            return Err(Error::config("the body limit must be positive"));
        }
        if let Some(token) = &self.inspector.token {
            token.validate()?;
        }
        Ok(())
    }
}

/// Who may use the inspector API (`/v1/inspector/...`).
///
/// With a token, the inspector answers requests that carry it as a bearer token. Without one,
/// dev mode generates a token when the runtime starts and prints it once on stderr; outside
/// dev mode the inspector is off and its routes answer `request.route_not_found`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InspectorConfig {
    /// The bearer token the inspector requires.
    pub token: Option<InspectorToken>,
    /// Answer peers that are not on the loopback interface, and requests with no peer address
    /// at all (serverless mode). Off by default.
    pub allow_remote: bool,
}

/// The shortest inspector token keel accepts.
pub const MIN_INSPECTOR_TOKEN_LEN: usize = 16;
/// The longest inspector token keel accepts.
pub const MAX_INSPECTOR_TOKEN_LEN: usize = 512;

/// A secret token. Its `Debug` form is redacted, so a logged configuration never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct InspectorToken(String);

impl InspectorToken {
    /// Wraps a token; [`RuntimeConfig::validate`] checks it.
    pub fn new(token: impl Into<String>) -> InspectorToken {
        InspectorToken(token.into())
    }

    /// The token itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A token must be 16 to 512 visible ASCII characters, so that it fits an HTTP header
    /// unchanged and is not trivially guessable. The message never repeats the token.
    fn validate(&self) -> Result<()> {
        let len = self.0.len();
        if !(MIN_INSPECTOR_TOKEN_LEN..=MAX_INSPECTOR_TOKEN_LEN).contains(&len) {
            return Err(Error::config(format!(
                "the inspector token must be {MIN_INSPECTOR_TOKEN_LEN} to \
                 {MAX_INSPECTOR_TOKEN_LEN} characters long"
            )));
        }
        if !self.0.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::config(
                "the inspector token may hold only visible ASCII characters (no spaces)",
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for InspectorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InspectorToken(<redacted>)")
    }
}
