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
//! - Stopping is the task's own decision (its idle timer, `c.sleep()`, `c.destroy()`, the
//!   drain), or a driver's stop ([`Driven::stop`]); a task reports leaving through
//!   [`Lifecycle::left`] with its generation.
//! - A driven actor that stopped by itself is not started again at its generation: the
//!   driver's stop is on its way, and the next activation is the driver's to start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::actor::signals::TaskSignals;
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
    fn mark_dying(&self, info: &Arc<ActorInfo>, stopped: Arc<TaskSignals>) {
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

/// What a driven runtime tells whoever drives it (an engine) when an actor decides to stop on
/// its own. Implemented outside the crate (keel's envoy adapter); called from the actor's task
/// once it has stopped and flushed, never while a lock is held.
pub trait Intents: Send + Sync + 'static {
    /// The actor at `generation` went to sleep by itself (its idle timer, `c.sleep()`): ask
    /// the driver to stop it as asleep.
    fn sleep(&self, actor_id: &str, generation: u64);
    /// The actor at `generation` destroyed itself (`c.destroy()`), its data already deleted:
    /// ask the driver to destroy it.
    fn destroy(&self, actor_id: &str, generation: u64);
}

/// One actor the driver has started and not yet stopped.
struct Owned {
    /// The driver's generation of this activation; tags its tasks.
    generation: u64,
    info: Arc<ActorInfo>,
    /// The live task, if one runs.
    handle: Option<ActorHandle>,
    /// Set once the actor destroyed itself: nothing starts it again.
    destroyed: bool,
    /// Set once the actor went to sleep by itself (its idle timer, `c.sleep()`) and the
    /// driver was asked to stop it: the entry stays until that stop arrives, but nothing
    /// starts this generation again. A message meanwhile is refused with `actor.stopped`,
    /// so the driver delivers it to the next generation, as the next call after a sleep
    /// reaches the next activation embedded. (Started again at the same generation, the
    /// task would be stopped under that message by the stop already on its way.)
    asleep: bool,
}

/// The activation of a driven runtime: a task runs only for an actor the driver has started
/// ([`Driven::start`]) and stops when the driver says so ([`Driven::stop`]). An actor that
/// stops by itself tells the driver through [`Intents`] and waits for its stop.
pub(crate) struct Driven {
    me: Weak<Driven>,
    env: Arc<ActorEnv>,
    types: Arc<ActorTypes>,
    directory: Arc<Directory>,
    tracker: TaskTracker,
    /// Told when an actor stops by itself.
    intents: Arc<dyn Intents>,
    /// The actors the driver has started, by id.
    owned: Mutex<HashMap<Arc<str>, Owned>>,
    closed: AtomicBool,
    /// Woken at every start, for whoever waits for an actor's next activation.
    started: tokio::sync::Notify,
}

impl Driven {
    pub(crate) fn new(
        env: Arc<ActorEnv>,
        types: Arc<ActorTypes>,
        directory: Arc<Directory>,
        tracker: TaskTracker,
        intents: Arc<dyn Intents>,
    ) -> Arc<Driven> {
        Arc::new_cyclic(|me| Driven {
            me: me.clone(),
            env,
            types,
            directory,
            tracker,
            intents,
            owned: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            started: tokio::sync::Notify::new(),
        })
    }

    /// Waits until the actor `id` has an activation that serves (see [`Driven::serves`]):
    /// `false` if none was started by `deadline`, or once the drain has begun.
    pub(crate) async fn wait_serving(&self, id: &str, deadline: tokio::time::Instant) -> bool {
        loop {
            // Armed before the check, so a start between the two is not missed.
            let started = self.started.notified();
            tokio::pin!(started);
            started.as_mut().enable();
            if self.is_closed() || self.env.stop.is_cancelled() {
                return false;
            }
            if self.serves(id) {
                return true;
            }
            if tokio::time::timeout_at(deadline, started).await.is_err() {
                return false;
            }
        }
    }

    /// The driver started the actor at `generation`: its task starts now (it loads the
    /// actor from storage, which the driver has opened for this generation).
    pub(crate) fn start(&self, info: Arc<ActorInfo>, generation: u64) -> Result<ActorHandle> {
        let mut owned = self.owned.lock();
        if self.is_closed() || self.env.stop.is_cancelled() {
            return Err(Error::RegistryShuttingDown);
        }
        if let Some(previous) = owned.get(&info.id) {
            if previous.generation >= generation {
                return Err(Error::ActorStopped);
            }
            if let Some(handle) = &previous.handle {
                // The driver only starts a newer generation once the older one was stopped;
                // a task still running for it must not write on behalf of the new one.
                handle.request_stop(crate::host::StopReason::Reset);
            }
        }
        owned.insert(
            info.id.clone(),
            Owned {
                generation,
                info: info.clone(),
                handle: None,
                destroyed: false,
                asleep: false,
            },
        );
        let entry = owned.get_mut(&info.id).ok_or(Error::ActorStopped)?;
        let handle = self.spawn(entry);
        self.started.notify_waiters();
        handle
    }

    /// The driver stops the actor's activation at `generation` for `reason`; resolves once
    /// its task (if one runs) has stopped and flushed. Nothing starts it again until the
    /// driver starts it anew.
    pub(crate) async fn stop(&self, id: &str, generation: u64, reason: crate::host::StopReason) {
        let handle = {
            let mut owned = self.owned.lock();
            match owned.get(id) {
                Some(entry) if entry.generation == generation => {
                    owned.remove(id).and_then(|entry| entry.handle)
                }
                _ => None,
            }
        };
        if let Some(handle) = handle {
            handle.request_stop(reason);
            handle.wait_stopped().await;
        }
    }

    /// Whether the actor's activation runs here and takes requests: the driver started it,
    /// and it has not begun to sleep or to destroy itself. `false` tells a caller of the
    /// driver that a request refused for this actor belongs to its next activation.
    pub(crate) fn serves(&self, id: &str) -> bool {
        let owned = self.owned.lock();
        owned.get(id).is_some_and(|entry| {
            !entry.asleep
                && !entry.destroyed
                && entry
                    .handle
                    .as_ref()
                    .is_none_or(|handle| !handle.is_stopping())
        })
    }

    fn spawn(&self, entry: &mut Owned) -> Result<ActorHandle> {
        let actor_type = self.types.get(&entry.info.name)?.clone();
        let lifecycle: Arc<dyn Lifecycle> = self.me.upgrade().ok_or(Error::RegistryShutDown)?;
        let (task, handle) = ActorTask::new(
            entry.info.clone(),
            actor_type,
            self.env.clone(),
            lifecycle,
            entry.generation,
        );
        entry.handle = Some(handle.clone());
        let span = crate::actor::span(&entry.info);
        self.tracker.spawn(task.run().instrument(span));
        Ok(handle)
    }
}

impl Activation for Driven {
    fn activate(&self, info: &Arc<ActorInfo>) -> Result<ActorHandle> {
        let mut owned = self.owned.lock();
        if self.is_closed() || self.env.stop.is_cancelled() {
            return Err(Error::RegistryShuttingDown);
        }
        // An actor the driver has not started (or has stopped) is not ours to run: the
        // driver routes its requests here only while it runs.
        let entry = owned.get_mut(&info.id).ok_or(Error::ActorStopped)?;
        if entry.destroyed {
            return Err(Error::ActorNotFound);
        }
        if entry.asleep {
            return Err(Error::ActorStopped);
        }
        if let Some(handle) = &entry.handle {
            if !handle.has_exited() {
                return Ok(handle.clone());
            }
        }
        self.spawn(entry)
    }

    fn live(&self, id: &str) -> Option<ActorHandle> {
        let owned = self.owned.lock();
        owned.get(id)?.handle.clone()
    }

    fn live_count(&self) -> usize {
        let owned = self.owned.lock();
        owned
            .values()
            .filter(|entry| entry.handle.is_some())
            .count()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

impl Lifecycle for Driven {
    fn mark_dying(&self, info: &Arc<ActorInfo>, stopped: Arc<TaskSignals>) {
        if let Some(entry) = self.owned.lock().get_mut(&info.id) {
            entry.destroyed = true;
        }
        self.directory.mark_dying(info, stopped);
    }

    fn forget_key(&self, info: &ActorInfo) {
        self.directory.forget_key(info);
    }

    /// The task tagged `generation` has stopped and flushed. If the driver did not ask for
    /// it (the actor slept or destroyed itself), the driver is told, unless the drain is on
    /// (the driver stops everything then).
    fn left(&self, id: &str, generation: u64) {
        let intent = {
            let mut owned = self.owned.lock();
            let Some(entry) = owned.get_mut(id) else {
                return;
            };
            if entry.generation != generation {
                return;
            }
            entry.handle = None;
            entry.asleep = !entry.destroyed;
            self.directory.forget_key(&entry.info);
            if self.is_closed() || self.env.stop.is_cancelled() {
                None
            } else {
                Some(entry.destroyed)
            }
        };
        match intent {
            Some(true) => self.intents.destroy(id, generation),
            Some(false) => self.intents.sleep(id, generation),
            None => {}
        }
    }
}
