//! keel as an envoy of a Rivet Engine: the engine-side half of keel's engine mode.
//!
//! In engine mode a self-hosted Rivet Engine owns placement, single activation, alarms and
//! failover; keel holds one WebSocket to it (through the pinned `rivet-envoy-client` crate),
//! is told which actors to start and stop, and keeps each actor's data in the engine's
//! generation-fenced remote SQLite. This crate owns that connection and everything that
//! speaks the engine's protocol. keel-core never sees a protocol type: what leaves this crate
//! is keel-core's own types (`Writes`, `Release`, `Payload`, `Error`, `StopReason`) and this
//! crate's small ones, so wiring it to keel-core's storage and activation seams is an adapter.
//!
//! What must stay true:
//! - Every durable write goes through a fenced request: remote SQLite batches carrying the
//!   activation's generation. The engine's KV requests are not fenced and are replayed after a
//!   reconnect, so they hold nothing durable.
//! - One commit is one atomic batch (or part of one); at most one batch per actor is in
//!   flight; a release runs only after its batch was acknowledged (`storage.rs`).
//! - A write refused by the fence is `actor.stopped` and changes nothing (`remote.rs`).
//! - The engine's alarm of an actor is its earliest due schedule, set by the activation on
//!   start and after each acknowledged batch that changed schedules (`storage.rs`).
//! - Every stop the engine sends is completed (`activation.rs`).
//!
//! # Layout
//! - [`config`]: [`EngineConfig`] and the connection's defaults.
//! - [`envoy`]: [`connect`], the [`Engine`] handle (intents, storage, shutdown).
//! - [`activation`]: the client's callbacks, as [`EngineEvent`]s on a channel.
//! - [`storage`]: one actor's schema, snapshot and group commit ([`ActorStore`]).
//! - [`seam`]: keel-core's `Storage` seam over the stores of the actors this envoy runs.
//! - `db`: each actor's SQL database (`c.db`): a local copy per activation, its changes and
//!   images in the engine.
//! - [`serve`]: keel's registry as an envoy: engine events into the driven runtime, tunneled
//!   requests into its routes, actors' own sleep and destroy out as intents.
//! - `relay`: the loopback relay the client dials, which reaches the engine again as soon as
//!   it answers after an outage.
//! - `remote`: one activation's fenced requests, and the one mapping of failures to keel's
//!   errors.
//! - `socket`: tunneled WebSockets, handed to keel-core's socket code; those of hibernatable
//!   connections kept while their actor sleeps and handed back on its next start.
//! - `sql`: statements and values, converted to and from the protocol's types.

#![warn(missing_docs)]

pub mod activation;
pub mod config;
mod db;
pub mod envoy;
mod relay;
mod remote;
pub mod seam;
pub mod serve;
mod socket;
mod sql;
pub mod storage;

pub use activation::{
    EngineEvent, EngineStopReason, StartReply, StopDone, Tunnel, TunneledRequest, TunneledResponse,
};
pub use config::EngineConfig;
pub use envoy::{connect, connect_with, Engine, ShutdownOutcome};
pub use seam::EngineStorage;
pub use serve::{serve, EngineRun};
pub use storage::{ActorIdentity, ActorStore, CommitStats, Snapshot, StoredSocket};
