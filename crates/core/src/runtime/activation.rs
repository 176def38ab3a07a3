//! The `Activation` seam: who starts and stops actor tasks, and with which generation.
//!
//! Today's implementation is [`OnDemand`]: a message to an actor that has no live task starts
//! one, tagged with a fresh generation, and the task puts itself to sleep on its own idle
//! timer. Another implementation (an engine that sends start and stop commands carrying the
//! generation) is written against the same trait: the dispatch only ever asks it for a live
//! handle.
//!
//! The contract:
//! - At most one task per actor is live at a time. A stopping task keeps its entry until it
//!   has flushed and left ([`Lifecycle::left`]), so a new task never loads state the old one
//!   has yet to write; a caller that meets a stopping task waits for it to leave and asks
//!   again.
//! - Generations only grow: a task that leaves forgets only its own entry, never a newer
//!   task's.
//! - Once closed (the drain has begun) no task is started: `registry.shutting_down`.
//! - Failure: a task that fails to start answers everything queued for it with its error and
//!   leaves (a new actor whose creation hook failed is deleted first), so the next message
//!   starts a fresh task; a task that died without leaving (a panic) is replaced, never
//!   waited on. Nothing acknowledged is lost either way: state is what storage holds.
//! - Stopping is the task's own decision today (its idle timer, `c.sleep()`, `c.destroy()`,
//!   the drain); it reports leaving through [`Lifecycle::left`] with its generation, which
//!   is also where an engine's stop command would land.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::actor::task::ActorTask;
use crate::actor::{ActorEnv, ActorHandle, Lifecycle};
use crate::actor_type::ActorTypes;
use crate::error::{Error, Result};
use crate::host::ActorInfo;
use crate::runtime::directory::Directory;

/// Starts and tracks actor tasks. See the module doc for the contract.
pub(crate) trait Activation: Send + Sync + 'static {
    /// The actor's live task, starting one if it has none. `registry.shutting_down` once
    /// closed.
    fn activate(&self, info: &Arc<ActorInfo>) -> Result<ActorHandle>;
    /// The actor's live task, without starting one.
    fn live(&self, id: &str) -> Option<ActorHandle>;
    /// How many actors have a live task.
    fn live_count(&self) -> usize;
    /// Starts no more tasks: the drain has begun.
    fn close(&self);
    /// Whether [`Activation::close`] was called.
    fn is_closed(&self) -> bool;
}

/// Today's activation: a task per actor, started on demand, asleep after its idle timeout.
pub(crate) struct OnDemand {
    /// Itself, handed to each task as its [`Lifecycle`].
    me: Weak<OnDemand>,
    /// What every task shares.
    env: Arc<ActorEnv>,
    /// The registered types, for each new task's type.
    types: Arc<ActorTypes>,
    /// Told when an actor is destroyed and when a task leaves.
    directory: Arc<Directory>,
    /// Every task spawned, so the drain can wait for them.
    tracker: TaskTracker,
    /// Live actors by id, with the generation of their task.
    live: Mutex<HashMap<Arc<str>, (u64, ActorHandle)>>,
    /// Tags each spawned actor task so a stopping task only forgets itself.
    next_generation: AtomicU64,
    /// Set when the drain begins.
    closed: AtomicBool,
}

impl OnDemand {
    pub(crate) fn new(
        env: Arc<ActorEnv>,
        types: Arc<ActorTypes>,
        directory: Arc<Directory>,
        tracker: TaskTracker,
    ) -> Arc<OnDemand> {
        Arc::new_cyclic(|me| OnDemand {
            me: me.clone(),
            env,
            types,
            directory,
            tracker,
            live: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        })
    }
}

impl Activation for OnDemand {
    fn activate(&self, info: &Arc<ActorInfo>) -> Result<ActorHandle> {
        let mut live = self.live.lock();
        if self.is_closed() || self.env.stop.is_cancelled() {
            return Err(Error::RegistryShuttingDown);
        }
        // A stopping task keeps its entry until it has flushed and left: its closed handle
        // makes callers wait for that, so a new task never loads state the old one has yet
        // to write.
        // A task that died without leaving (it panicked) is replaced, or callers would wait
        // on it forever.
        if let Some((_, handle)) = live.get(&info.id) {
            if !handle.has_exited() {
                return Ok(handle.clone());
            }
            tracing::warn!(actor_id = %info.id, "replacing an actor task that ended without stopping");
        }
        let actor_type = self.types.get(&info.name)?.clone();
        let lifecycle: Arc<dyn Lifecycle> = self.me.upgrade().ok_or(Error::RegistryShutDown)?;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let (task, handle) = ActorTask::new(
            info.clone(),
            actor_type,
            self.env.clone(),
            lifecycle,
            generation,
        );
        live.insert(info.id.clone(), (generation, handle.clone()));
        let span = crate::actor::span(info);
        self.tracker.spawn(task.run().instrument(span));
        Ok(handle)
    }

    fn live(&self, id: &str) -> Option<ActorHandle> {
        self.live.lock().get(id).map(|(_, handle)| handle.clone())
    }

    fn live_count(&self) -> usize {
        self.live.lock().len()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

impl Lifecycle for OnDemand {
    fn mark_dying(&self, info: &Arc<ActorInfo>, stopped: watch::Receiver<bool>) {
        self.directory.mark_dying(info, stopped);
    }

    fn forget_key(&self, info: &ActorInfo) {
        self.directory.forget_key(info);
    }

    /// Removes a stopping actor task from the live set, unless a newer task replaced it.
    /// Its resolved key goes too, so the directory's memory follows the live actors; the next
    /// request by key looks it up again.
    fn left(&self, id: &str, generation: u64) {
        let mut live = self.live.lock();
        if live.get(id).is_some_and(|(g, _)| *g == generation) {
            if let Some((_, handle)) = live.remove(id) {
                self.directory.forget_key(&handle.info);
            }
        }
    }
}
