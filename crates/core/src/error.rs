//! The one error type of keel's core.
//!
//! Every failure that can reach a caller is a variant here, and every variant has a stable
//! `group` and `code` (together written `group.code` in the docs) and exactly one HTTP status.
//! The binding converts this type to a JS `KeelError` in one place, and the HTTP layer renders
//! it as `{group, code, message, metadata}`; nothing downstream parses messages.

use serde_json::Value;

/// Result alias used throughout core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error keel reports, with a stable `group`/`code` per variant.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `register` was called after the registry left `Idle`.
    #[error("actor types can only be registered before the registry starts")]
    RegistryNotIdle,
    /// The registry runs in the other mode (serve versus serverless).
    #[error("the registry is running in {running} mode and cannot {wanted}")]
    RegistryWrongMode {
        /// The mode the registry runs in (`serve` or `serverless`).
        running: &'static str,
        /// What the caller tried to do.
        wanted: &'static str,
    },
    /// `serve` was called twice.
    #[error("the registry is already serving")]
    RegistryAlreadyRunning,
    /// The registry has shut down (or the drain gave up on this work).
    #[error("the registry has shut down")]
    RegistryShutDown,
    /// The registry is draining and accepts no new work.
    #[error("the registry is shutting down")]
    RegistryShuttingDown,
    /// Two actor types with one name.
    #[error("an actor type named {name:?} is already registered")]
    DuplicateActorType {
        /// The name registered twice.
        name: String,
    },
    /// The server could not listen on its address.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address asked for.
        address: String,
        /// Why listening failed.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value is out of range or malformed.
    #[error("invalid configuration: {message}")]
    InvalidConfig {
        /// Which value is wrong, and why.
        message: String,
    },

    /// No actor type has this name.
    #[error("no actor type named {name:?} is registered")]
    ActorTypeNotFound {
        /// The name asked for.
        name: String,
    },
    /// No actor with this key or id exists.
    #[error("actor not found")]
    ActorNotFound,
    /// `create` found an actor with this key.
    #[error("an actor with this key already exists")]
    ActorAlreadyExists,
    /// The actor's mailbox is full.
    #[error("the actor is overloaded: its mailbox holds {capacity} messages")]
    ActorOverloaded {
        /// The mailbox's capacity, in messages.
        capacity: usize,
    },
    /// The actor type has no action with this name.
    #[error("actor type {actor_type:?} has no action named {action:?}")]
    ActionNotFound {
        /// The actor type's name.
        actor_type: String,
        /// The action asked for.
        action: String,
    },
    /// The action did not finish within its timeout.
    #[error("the action did not finish within {timeout_ms} ms")]
    ActionTimedOut {
        /// The timeout that passed, in milliseconds.
        timeout_ms: u64,
    },
    /// A lifecycle hook (create, wake, sleep, destroy) did not finish within its timeout.
    #[error("the {hook} hook did not finish within {timeout_ms} ms")]
    HookTimedOut {
        /// The hook's name.
        hook: &'static str,
        /// The timeout that passed, in milliseconds.
        timeout_ms: u64,
    },
    /// User code failed in a way that is not a `UserError`; the message is hidden unless dev
    /// mode is on.
    #[error("{message}")]
    ActorInternal {
        /// What failed.
        message: String,
    },
    /// The actor's task stopped while the request was pending.
    #[error("the actor stopped before replying")]
    ActorStopped,
    /// An actor's call called an actor whose own call is awaiting it (itself, or a cycle such
    /// as A → B → A): waiting would deadlock on a mailbox the caller holds.
    #[error("actor {actor_id} is already waiting for this call: calling it would deadlock")]
    ActorCallCycle {
        /// The actor that was called.
        actor_id: String,
    },
    /// `onStateChange` changed the state it was told about; the call that triggered it fails
    /// and its changes are rolled back.
    #[error("{message}")]
    StateChangeMutation {
        /// What the hook did.
        message: String,
    },

    /// A `UserError` thrown by an action or hook: its code and message reach the client.
    #[error("{message}")]
    User {
        /// The code the user code chose.
        code: String,
        /// The message the user code chose.
        message: String,
        /// Whatever the user code attached, as JSON.
        metadata: Option<Value>,
    },

    /// A KV key is longer than the limit.
    #[error("a KV key is longer than {limit} bytes")]
    KvKeyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// A KV value, encoded, is larger than the limit.
    #[error("a KV value is larger than {limit} bytes")]
    KvValueTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },

    /// The request body or its fields are malformed.
    #[error("{message}")]
    RequestMalformed {
        /// What is malformed.
        message: String,
    },
    /// The request body exceeds the configured limit.
    #[error("the request body exceeds the limit of {limit} bytes")]
    RequestTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The request body stopped arriving: it was not complete within the body timeout.
    #[error("the request body did not arrive within {timeout_ms} ms")]
    RequestBodyTimedOut {
        /// The body timeout, in milliseconds.
        timeout_ms: u64,
    },
    /// An action body whose `content-type` is neither JSON nor CBOR (or is missing).
    #[error("the body must be application/json or application/cbor, not {content_type}")]
    UnsupportedMediaType {
        /// The `content-type` sent, or a word saying none was.
        content_type: String,
    },
    /// An actor key breaks the key rules.
    #[error("invalid actor key: {message}")]
    InvalidKey {
        /// Which rule the key breaks.
        message: String,
    },
    /// The route exists but not for this method.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// No route matches the request.
    #[error("no route for {method} {path}")]
    RouteNotFound {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },

    /// The request needs a valid inspector token and did not carry one. The message never
    /// says what was sent.
    #[error("a valid inspector token is required")]
    Unauthorized,
    /// The request may not use this route from where it came (the inspector answers only
    /// loopback peers unless configured otherwise).
    #[error("{message}")]
    Forbidden {
        /// Why the request may not use the route.
        message: String,
    },
    /// A client asked to resume a hibernatable connection that its actor does not have (it
    /// closed for good, or never existed), or presented the wrong token for it.
    #[error("the connection cannot be resumed: unknown connection or wrong token")]
    ConnResumeRefused,
    /// A browser page from another origin, not in `allowedOrigins`, tried a WebSocket upgrade
    /// or a CORS preflight.
    #[error("the origin {origin} is not allowed")]
    OriginNotAllowed {
        /// The `Origin` the browser sent.
        origin: String,
    },

    /// Another process holds the data directory.
    #[error("the data directory {path} is in use by another process")]
    StorageLocked {
        /// The data directory.
        path: String,
    },
    /// The database is not a keel database, or damage was found in it: by SQLite, by keel's
    /// checks at open, or in one actor's stored data. keel never modifies such a file.
    #[error("{detail}")]
    StorageCorrupt {
        /// What is wrong, and where: the file's path, or the actor.
        detail: String,
        /// The actor whose stored data is damaged, when the damage is in one actor's row.
        actor_id: Option<String>,
        /// SQLite's own error, when SQLite found the damage.
        #[source]
        source: Option<rusqlite::Error>,
    },
    /// The database was written by a newer keel.
    #[error("the database schema version {found} is newer than this keel supports ({supported})")]
    StorageTooNew {
        /// The schema version found in the file.
        found: i64,
        /// The newest schema version this keel knows.
        supported: i64,
    },
    /// SQLite failed.
    #[error("storage failed: {0}")]
    Storage(#[from] rusqlite::Error),
    /// The filesystem failed.
    #[error("i/o failed: {context}: {source}")]
    Io {
        /// What keel was doing.
        context: String,
        /// The filesystem's error.
        #[source]
        source: std::io::Error,
    },
    /// The group-commit writer has stopped; nothing more can be made durable.
    #[error("the storage writer has stopped")]
    WriterClosed,
}

impl Error {
    /// The error's group: the first half of `group.code`.
    pub fn group(&self) -> &str {
        use Error::*;
        match self {
            RegistryNotIdle
            | RegistryWrongMode { .. }
            | RegistryAlreadyRunning
            | RegistryShutDown
            | RegistryShuttingDown
            | DuplicateActorType { .. }
            | Bind { .. }
            | InvalidConfig { .. } => "registry",
            ActorTypeNotFound { .. }
            | ActorNotFound
            | ActorAlreadyExists
            | ActorOverloaded { .. }
            | ActionNotFound { .. }
            | ActionTimedOut { .. }
            | HookTimedOut { .. }
            | ActorInternal { .. }
            | StateChangeMutation { .. }
            | ActorCallCycle { .. }
            | ActorStopped => "actor",
            User { .. } => "user",
            KvKeyTooLarge { .. } | KvValueTooLarge { .. } => "kv",
            RequestMalformed { .. }
            | RequestTooLarge { .. }
            | RequestBodyTimedOut { .. }
            | UnsupportedMediaType { .. }
            | InvalidKey { .. }
            | MethodNotAllowed { .. }
            | RouteNotFound { .. } => "request",
            Unauthorized | Forbidden { .. } | OriginNotAllowed { .. } => "auth",
            ConnResumeRefused => "connection",
            StorageLocked { .. }
            | StorageCorrupt { .. }
            | StorageTooNew { .. }
            | Storage(_)
            | Io { .. }
            | WriterClosed => "storage",
        }
    }

    /// The error's code within its group.
    pub fn code(&self) -> &str {
        use Error::*;
        match self {
            RegistryNotIdle => "not_idle",
            RegistryWrongMode { .. } => "wrong_mode",
            RegistryAlreadyRunning => "already_running",
            RegistryShutDown => "shut_down",
            RegistryShuttingDown => "shutting_down",
            DuplicateActorType { .. } => "duplicate_actor_type",
            InvalidConfig { .. } => "invalid_config",
            Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
                "address_in_use"
            }
            Bind { .. } => "bind_failed",
            ActorTypeNotFound { .. } => "type_not_found",
            ActorNotFound => "not_found",
            ActorAlreadyExists => "already_exists",
            ActorOverloaded { .. } => "overloaded",
            ActionNotFound { .. } => "action_not_found",
            ActionTimedOut { .. } => "action_timed_out",
            HookTimedOut { .. } => "hook_timed_out",
            ActorInternal { .. } => "internal_error",
            ActorStopped => "stopped",
            StateChangeMutation { .. } => "state_change_mutation",
            ActorCallCycle { .. } => "call_cycle",
            User { code, .. } => code,
            KvKeyTooLarge { .. } => "key_too_large",
            KvValueTooLarge { .. } => "value_too_large",
            RequestMalformed { .. } => "malformed",
            RequestTooLarge { .. } => "body_too_large",
            RequestBodyTimedOut { .. } => "body_timed_out",
            UnsupportedMediaType { .. } => "unsupported_media_type",
            InvalidKey { .. } => "invalid_key",
            RouteNotFound { .. } => "route_not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            Unauthorized => "unauthorized",
            Forbidden { .. } => "forbidden",
            ConnResumeRefused => "resume_refused",
            OriginNotAllowed { .. } => "origin_not_allowed",
            StorageLocked { .. } => "locked",
            StorageCorrupt { .. } => "corrupt",
            StorageTooNew { .. } => "too_new",
            Storage(_) => "sqlite",
            Io { .. } => "io",
            WriterClosed => "writer_closed",
        }
    }

    /// The HTTP status for this error: the one mapping keel uses everywhere.
    pub fn http_status(&self) -> u16 {
        use Error::*;
        match self {
            RequestMalformed { .. } | InvalidKey { .. } | User { .. } | InvalidConfig { .. } => 400,
            Unauthorized => 401,
            Forbidden { .. } | OriginNotAllowed { .. } | ConnResumeRefused => 403,
            ActorTypeNotFound { .. }
            | ActorNotFound
            | ActionNotFound { .. }
            | RouteNotFound { .. } => 404,
            ActorAlreadyExists
            | ActorCallCycle { .. }
            | RegistryNotIdle
            | RegistryWrongMode { .. }
            | RegistryAlreadyRunning
            | DuplicateActorType { .. } => 409,
            Bind { .. } => 500,
            RequestTooLarge { .. } | KvKeyTooLarge { .. } | KvValueTooLarge { .. } => 413,
            MethodNotAllowed { .. } => 405,
            RequestBodyTimedOut { .. } => 408,
            UnsupportedMediaType { .. } => 415,
            ActorOverloaded { .. } => 429,
            RegistryShuttingDown | RegistryShutDown | ActorStopped | StorageLocked { .. } => 503,
            ActionTimedOut { .. } | HookTimedOut { .. } => 504,
            ActorInternal { .. }
            | StateChangeMutation { .. }
            | StorageCorrupt { .. }
            | StorageTooNew { .. }
            | Storage(_)
            | Io { .. }
            | WriterClosed => 500,
        }
    }

    /// Structured details that help a caller act on the error, if any.
    pub fn metadata(&self) -> Option<Value> {
        use Error::*;
        match self {
            User { metadata, .. } => metadata.clone(),
            ActorOverloaded { capacity } => Some(serde_json::json!({ "capacity": capacity })),
            ActorCallCycle { actor_id } => Some(serde_json::json!({ "actorId": actor_id })),
            ActionTimedOut { timeout_ms } | RequestBodyTimedOut { timeout_ms } => {
                Some(serde_json::json!({ "timeoutMs": timeout_ms }))
            }
            HookTimedOut { hook, timeout_ms } => {
                Some(serde_json::json!({ "hook": hook, "timeoutMs": timeout_ms }))
            }
            RequestTooLarge { limit } | KvKeyTooLarge { limit } | KvValueTooLarge { limit } => {
                Some(serde_json::json!({ "limit": limit }))
            }
            StorageCorrupt {
                actor_id: Some(actor_id),
                ..
            } => Some(serde_json::json!({ "actorId": actor_id })),
            _ => None,
        }
    }

    /// The message a client sees. Internal failures keep their detail out of responses
    /// unless `expose_internal` (dev mode) is set; the full error is logged instead.
    pub fn public_message(&self, expose_internal: bool) -> String {
        match self {
            Error::ActorInternal { .. }
            | Error::Storage(_)
            | Error::Io { .. }
            | Error::StorageCorrupt { .. }
                if !expose_internal =>
            {
                "an internal error occurred".to_string()
            }
            other => other.to_string(),
        }
    }

    /// Renders the error as the wire body `{group, code, message, metadata}`.
    pub fn to_body(&self, expose_internal: bool) -> Value {
        serde_json::json!({
            "group": self.group(),
            "code": self.code(),
            "message": self.public_message(expose_internal),
            "metadata": self.metadata(),
        })
    }

    /// A copy for fanning one failure out to several callers; the type is not `Clone` because
    /// its sources are not. A copied source keeps its kind and text.
    pub fn duplicate(&self) -> Error {
        use Error::*;
        match self {
            RegistryNotIdle => RegistryNotIdle,
            RegistryWrongMode { running, wanted } => RegistryWrongMode { running, wanted },
            RegistryAlreadyRunning => RegistryAlreadyRunning,
            RegistryShutDown => RegistryShutDown,
            RegistryShuttingDown => RegistryShuttingDown,
            DuplicateActorType { name } => DuplicateActorType { name: name.clone() },
            InvalidConfig { message } => InvalidConfig {
                message: message.clone(),
            },
            ActorTypeNotFound { name } => ActorTypeNotFound { name: name.clone() },
            ActorNotFound => ActorNotFound,
            ActorAlreadyExists => ActorAlreadyExists,
            ActorOverloaded { capacity } => ActorOverloaded {
                capacity: *capacity,
            },
            ActionNotFound { actor_type, action } => ActionNotFound {
                actor_type: actor_type.clone(),
                action: action.clone(),
            },
            ActionTimedOut { timeout_ms } => ActionTimedOut {
                timeout_ms: *timeout_ms,
            },
            ActorInternal { message } => ActorInternal {
                message: message.clone(),
            },
            HookTimedOut { hook, timeout_ms } => HookTimedOut {
                hook,
                timeout_ms: *timeout_ms,
            },
            KvKeyTooLarge { limit } => KvKeyTooLarge { limit: *limit },
            KvValueTooLarge { limit } => KvValueTooLarge { limit: *limit },
            Bind { address, source } => Bind {
                address: address.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            MethodNotAllowed { method, path } => MethodNotAllowed {
                method: method.clone(),
                path: path.clone(),
            },
            ActorStopped => ActorStopped,
            ActorCallCycle { actor_id } => ActorCallCycle {
                actor_id: actor_id.clone(),
            },
            StateChangeMutation { message } => StateChangeMutation {
                message: message.clone(),
            },
            User {
                code,
                message,
                metadata,
            } => User {
                code: code.clone(),
                message: message.clone(),
                metadata: metadata.clone(),
            },
            RequestMalformed { message } => RequestMalformed {
                message: message.clone(),
            },
            RequestTooLarge { limit } => RequestTooLarge { limit: *limit },
            RequestBodyTimedOut { timeout_ms } => RequestBodyTimedOut {
                timeout_ms: *timeout_ms,
            },
            UnsupportedMediaType { content_type } => UnsupportedMediaType {
                content_type: content_type.clone(),
            },
            InvalidKey { message } => InvalidKey {
                message: message.clone(),
            },
            RouteNotFound { method, path } => RouteNotFound {
                method: method.clone(),
                path: path.clone(),
            },
            Unauthorized => Unauthorized,
            ConnResumeRefused => ConnResumeRefused,
            Forbidden { message } => Forbidden {
                message: message.clone(),
            },
            OriginNotAllowed { origin } => OriginNotAllowed {
                origin: origin.clone(),
            },
            StorageLocked { path } => StorageLocked { path: path.clone() },
            StorageCorrupt {
                detail,
                actor_id,
                source,
            } => StorageCorrupt {
                detail: detail.clone(),
                actor_id: actor_id.clone(),
                source: source.as_ref().map(copy_sqlite),
            },
            StorageTooNew { found, supported } => StorageTooNew {
                found: *found,
                supported: *supported,
            },
            Storage(source) => Storage(copy_sqlite(source)),
            Io { context, source } => Io {
                context: context.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            WriterClosed => WriterClosed,
        }
    }

    /// Wraps an I/O error with what keel was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An error for a malformed request.
    pub fn malformed(message: impl Into<String>) -> Self {
        Error::RequestMalformed {
            message: message.into(),
        }
    }

    /// Damage, or a file that is not a keel database, described by `detail`.
    pub fn corrupt(detail: impl Into<String>) -> Self {
        Error::StorageCorrupt {
            detail: detail.into(),
            actor_id: None,
            source: None,
        }
    }

    /// Whether this is damage to the database: keel's own finding, or SQLite reporting a
    /// malformed or foreign file.
    pub fn is_corruption(&self) -> bool {
        match self {
            Error::StorageCorrupt { .. } => true,
            Error::Storage(err) => sqlite_reports_damage(err),
            _ => false,
        }
    }

    /// An error for a bad configuration value.
    pub fn config(message: impl Into<String>) -> Self {
        Error::InvalidConfig {
            message: message.into(),
        }
    }
}

/// Whether SQLite says the file is malformed or not a database.
pub(crate) fn sqlite_reports_damage(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

fn copy_sqlite(err: &rusqlite::Error) -> rusqlite::Error {
    let code = err
        .sqlite_error()
        .copied()
        .unwrap_or(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR));
    rusqlite::Error::SqliteFailure(code, Some(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_message_is_hidden_unless_dev() {
        let err = Error::ActorInternal {
            message: "secret detail".into(),
        };
        assert_eq!(err.to_body(false)["message"], "an internal error occurred");
        assert_eq!(err.to_body(true)["message"], "secret detail");
        assert_eq!(err.to_body(false)["code"], "internal_error");
    }

    #[test]
    fn user_errors_keep_their_code() {
        let err = Error::User {
            code: "bad_name".into(),
            message: "name required".into(),
            metadata: Some(serde_json::json!({"field": "name"})),
        };
        let body = err.to_body(false);
        assert_eq!(body["group"], "user");
        assert_eq!(body["code"], "bad_name");
        assert_eq!(body["message"], "name required");
        assert_eq!(body["metadata"]["field"], "name");
        assert_eq!(err.http_status(), 400);
    }
}
