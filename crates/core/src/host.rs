//! The seam between core and whatever runs user code.
//!
//! Core never sees JS. It asks a [`Host`] to start an actor's instance, run an action, and stop
//! the instance; the binding implements this trait by calling JS, and core's own tests
//! implement it in Rust. State crosses the seam as opaque bytes whose encoding the host
//! chooses; action arguments and results cross as JSON text.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;

/// Who an actor is. Shared by the actor's task and every call it makes into the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorInfo {
    /// Stable generated id.
    pub id: Arc<str>,
    /// Actor type name.
    pub name: Arc<str>,
    /// Key segments.
    pub key: Vec<String>,
    /// Canonical key string (see `key.rs`).
    pub key_string: String,
}

/// Asks the host to bring up an actor's instance.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// The last committed state, or `None` for an actor whose state was never created.
    pub state: Option<Vec<u8>>,
    /// The creation input (JSON text), present only while the state was never created.
    pub input: Option<String>,
}

/// What the host reports after starting an instance.
#[derive(Debug, Clone, Default)]
pub struct Started {
    /// The state to persist: the freshly created state of a new actor, or state that wake
    /// hooks changed. `None` when nothing changed.
    pub state: Option<Vec<u8>>,
}

/// One action call.
#[derive(Debug, Clone)]
pub struct ActionCall {
    /// The action's name.
    pub action: String,
    /// The arguments, as a JSON array.
    pub args: String,
}

/// The result of one action.
#[derive(Debug, Clone)]
pub struct ActionDone {
    /// The return value, as JSON text.
    pub output: String,
    /// The actor's new state, if the action changed it.
    pub state: Option<Vec<u8>>,
}

/// Why an instance is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The registry is shutting down gracefully.
    Shutdown,
    /// The actor's task is ending for another reason (its start failed, or it crashed).
    Crash,
}

impl StopReason {
    /// The name used across the seam and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Shutdown => "shutdown",
            StopReason::Crash => "crash",
        }
    }
}

/// Runs user code on core's behalf. Every call may fail with a `user` error (a `UserError`
/// thrown by user code) or `actor.internal_error`.
#[async_trait]
pub trait Host: Send + Sync + 'static {
    /// Brings up the instance of `actor`.
    async fn start(&self, actor: &Arc<ActorInfo>, request: StartRequest) -> Result<Started>;

    /// Runs one action on a started instance.
    async fn action(&self, actor: &Arc<ActorInfo>, call: ActionCall) -> Result<ActionDone>;

    /// Tears down the instance and returns its final state if it changed.
    async fn stop(&self, actor: &Arc<ActorInfo>, reason: StopReason) -> Result<Option<Vec<u8>>>;
}
