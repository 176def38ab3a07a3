//! keel's runtime: actors, durable state, an HTTP server and a bounded graceful shutdown.
//!
//! This crate knows nothing of JS. User code runs behind the [`host::Host`] trait, which the
//! N-API binding implements by calling JS and the tests implement in Rust.
//!
//! # Layout
//! - [`registry`]: the `Idle` / `BuildingServerless` / `Running` / `ShuttingDown` state machine.
//! - [`runtime`]: a built runtime: the actor directory, request dispatch and the drain.
//! - [`actor`]: one task per live actor, its mailbox and handle.
//! - [`actor_type`]: what core knows of each registered actor type.
//! - [`alarms`]: the timer that fires durable schedules.
//! - [`clock`]: epoch time derived from tokio's clock.
//! - [`cbor`]: just enough CBOR to read and write envelopes.
//! - [`conn`]: WebSocket connections, keel's protocol and raw sockets.
//! - [`host`]: the seam to the code that runs user code.
//! - [`store`]: the SQLite file, its lock, schema migrations and reads.
//! - [`integrity`]: the checks that keep damage on disk from being served as data.
//! - [`writer`]: the group-commit writer, which is also the output gate.
//! - [`http`]: the versioned HTTP routes and the accept loop.
//! - [`origin`]: which browser origins may open WebSockets and read responses (CORS).
//! - [`linger`]: sockets that read and discard for a moment before they close.
//! - [`inspector`]: the token-guarded inspector API and the directory of open connections.
//! - [`metrics`]: counters and histograms, and the Prometheus page.
//! - [`key`]: the canonical actor key codec.
//! - [`kv_key`]: the KV key codec: stored form, order and the overlay of a call's own writes.
//! - [`logging`]: the one log schema (JSON, logfmt, pretty) and the process-wide subscriber.
//! - [`spans`]: which span a live actor's user code logs in.
//! - [`config`]: every limit, timeout and default, defined once.
//! - [`options`]: the numeric `setup()` options: names, defaults, ranges, units and docs.
//! - [`error`]: the one error type, with stable `group`/`code` and HTTP status.
//! - [`faults`]: failpoints on the commit path and a VFS shim, for fault-injection tests.

#![warn(missing_docs)]

pub mod actor;
pub mod actor_type;
pub mod alarms;
pub mod cbor;
pub mod clock;
pub mod config;
pub mod conn;
pub mod error;
pub mod faults;
pub mod host;
pub mod http;
pub mod inspector;
pub mod integrity;
pub mod key;
pub mod kv_key;
pub mod linger;
pub mod logging;
pub mod metrics;
pub mod options;
pub mod origin;
pub mod registry;
pub mod runtime;
pub mod spans;
pub mod store;
pub mod writer;

pub use actor_type::{ActorType, ActorTypes, Hooks};
pub use config::{
    AllowedOrigins, Durability, InspectorConfig, InspectorToken, Limits, RuntimeConfig,
};
pub use error::{Error, Result};
pub use host::{
    ActionCall, ActionDone, ActorInfo, ConnectRequest, Effects, Encoding, Host, KvWrite, Outbound,
    Payload, RawRequest, RawResponse, RawSocketEvent, RequestHead, Schedule, ScheduleOp,
    ScheduleWrite, StartRequest, StopReason,
};
pub use registry::{Mode, Registry};
pub use runtime::{Resolve, Runtime, Target};
