//! keel's runtime: actors, durable state, an HTTP server and a bounded graceful shutdown.
//!
//! This crate knows nothing of JS. User code runs behind the [`host::Host`] trait, which the
//! N-API binding implements by calling JS and the tests implement in Rust.
//!
//! # Layout
//!
//! The crate is a house of floors. Each folder is one floor, and a module uses only modules on
//! a lower floor or on its own, never one above it, and never in a cycle
//! (`tests/layers.rs` checks this on every test run, and that this doc and the README's
//! layout table name every floor and base module). Internals are `pub(crate)`; the binding
//! uses only the front door re-exported here.
//!
//! - **top**: [`registry`] (the `Idle` / `BuildingServerless` / `Running` / `ShuttingDown`
//!   state machine) and `assemble` (the one place that picks an implementation for each seam
//!   and opens a [`Runtime`]). Nothing uses them but the front door.
//! - **`server/`**: keel's HTTP routes, the accept loop and CORS (`http.rs`), keel's
//!   WebSocket protocol as the client speaks it and raw sockets (`socket.rs`), sockets a
//!   tunnel hands over for an already-resolved actor (`tunnel.rs`), the inspector
//!   routes, the open connections list (`connections.rs`), lingering sockets, the Prometheus
//!   route: the `Ingress` implementation. Rule: reaches actors only through the runtime's
//!   dispatch handle.
//! - **`runtime/`**: the directory (which actor a key names), dispatch, the `Activation` seam
//!   and its on-demand implementation, the `Ingress` seam, the alarm timer, the [`Runtime`]
//!   facade and its drain. Rule: never names the server.
//! - **`actor/`**: one task per live actor (`task.rs`, its message handlers in
//!   `task/messages.rs`), its mailbox and handle, one actor's connections (`conn.rs`: the
//!   frames keel sends, their order, the outgoing queue's bounds and the close codes), the
//!   outbox that takes events and replies off storage's thread (`outbox.rs`), the open
//!   connections of sleeping actors with hibernatable connections (`hibernation.rs`), and one actor's
//!   schedules (`schedules.rs`: every retry rule, and the index of when each falls due).
//!   Rule: uses storage only through the `Storage` seam and tells the directory above it
//!   what it needs through the `Lifecycle` callback.
//! - **`storage/`**: the [`Storage`] seam (public, for implementations outside the crate)
//!   and its embedded implementation: the SQLite file, its
//!   lock, migrations and reads ([`store`]), the group-commit writer that is also the output
//!   gate ([`writer`]; its queue, and when a commit to an idle writer skips it, in `queue.rs`),
//!   the damage checks ([`integrity`]), each actor's own SQL database
//!   and how its changes commit through keel.db's log ([`actor_db`]); every SQL statement
//!   keel runs on its own tables. Rule: knows no actor task.
//! - **base** (the crate root's own files, with the children one keeps in a folder of its
//!   name), used by every floor and using only each other: [`error`] (the one error type),
//!   [`config`] (every configured number, defined once with its default), [`host`] (the seam
//!   to user code, and the formats of what a call changes: KV writes, schedules), [`actor_type`]
//!   (what core knows of each registered type), [`key`] (the actor key codec), [`cbor`],
//!   [`clock`], [`origin`] (the `allowedOrigins` rules), [`metrics`] (counters, histograms
//!   and the Prometheus page), [`logging`] (the log schema, settings and layer; its line
//!   formats in `logging/format.rs`), [`spans`] (which span a live actor's user code logs
//!   in), [`kv_key`] (KV's one home: the key codec, stored form and order, the KV limits'
//!   defaults and the check every commit passes, the overlay of a call's own writes),
//!   [`options`] (the numeric `setup()` options: names, defaults, ranges, units and docs),
//!   [`faults`] (failpoints and the VFS shim, for fault-injection tests).

#![warn(missing_docs)]

pub mod actor;
pub mod actor_type;
mod assemble;
pub mod cbor;
pub mod clock;
pub mod config;
pub mod error;
pub mod faults;
pub mod host;
pub mod key;
pub mod kv_key;
pub mod logging;
pub mod metrics;
pub mod options;
pub mod origin;
pub mod registry;
mod runtime;
mod server;
pub mod spans;
mod storage;

pub use server::http;
pub use storage::{actor_db, integrity, store, writer};

pub use actor_type::{ActorType, ActorTypes, DbConfig, Hooks};
pub use config::{
    AllowedOrigins, Durability, InspectorConfig, InspectorToken, Limits, RuntimeConfig,
};
pub use error::{DbError, Error, Result};
pub use host::{
    ActionCall, ActionDone, ActorInfo, ConnectRequest, Effects, Encoding, Host, KvWrite, Outbound,
    Payload, RawRequest, RawResponse, RawSocketEvent, RequestHead, RestoredConn, Schedule,
    ScheduleOp, ScheduleWrite, StartRequest, StopReason,
};
pub use registry::{Mode, Registry};
pub use runtime::activation::Intents;
pub use runtime::ingress::{SocketMessage, SocketPeer, TunneledSocket, TUNNELED_SOCKET_BACKLOG};
pub use runtime::{Resolve, Runtime, Target};
pub use storage::seam::{ActorDb, DbChange, MigrationStep, Storage};
