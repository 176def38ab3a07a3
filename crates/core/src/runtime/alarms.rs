//! The alarm timer: one task that fires every actor's durable schedules when they fall due.
//!
//! Schedules live in the database; this module keeps an in-memory index of when each falls
//! due, loaded at start-up (so schedules that fell due while the process was down fire at
//! once) and updated after each commit that adds, cancels or retries one. When one falls due,
//! the timer sends it to its actor's mailbox, waking the actor if it sleeps. The actor runs
//! the action and settles the schedule in the same commit as the action's effects, so a
//! schedule whose run committed is never run again; a run lost to a crash runs again after
//! restart (at least once).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::actor::Command;
use crate::error::Error;
use crate::host::ScheduleOp;
use crate::runtime::Core;

/// How many times a schedule runs before keel gives up on it: the first run and four retries.
pub const SCHEDULE_MAX_ATTEMPTS: u32 = 5;
/// The delay before the first retry; each later retry doubles it.
pub const SCHEDULE_RETRY_BASE: Duration = Duration::from_secs(1);
/// The longest delay between retries.
pub const SCHEDULE_RETRY_MAX: Duration = Duration::from_secs(60);
/// How long to wait before offering a schedule again to an actor whose mailbox was full.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// The delay before retry number `attempts` (1 for the first retry).
pub fn retry_delay(attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(16);
    (SCHEDULE_RETRY_BASE * factor).min(SCHEDULE_RETRY_MAX)
}

#[derive(Default)]
struct Index {
    /// Pending schedules in firing order: (due, schedule id).
    by_time: BTreeSet<(i64, String)>,
    /// Each pending schedule's due time and actor.
    by_id: HashMap<String, (i64, Arc<str>)>,
}

/// The in-memory index of pending schedules, shared by the timer task and the actors.
#[derive(Default)]
pub(crate) struct Alarms {
    index: Mutex<Index>,
    /// Wakes the timer when the index changes; `notify_one` keeps a permit, so a change made
    /// while the timer is busy is never missed.
    changed: Notify,
}

impl Alarms {
    /// Adds (or moves) a schedule.
    pub(crate) fn add(&self, id: String, actor_id: Arc<str>, at_ms: i64) {
        let mut index = self.index.lock();
        if let Some((old, _)) = index.by_id.insert(id.clone(), (at_ms, actor_id)) {
            index.by_time.remove(&(old, id.clone()));
        }
        index.by_time.insert((at_ms, id));
        drop(index);
        self.changed.notify_one();
    }

    /// Forgets a schedule.
    pub(crate) fn remove(&self, id: &str) {
        let mut index = self.index.lock();
        if let Some((at_ms, _)) = index.by_id.remove(id) {
            index.by_time.remove(&(at_ms, id.to_string()));
        }
    }

    /// Applies the schedule changes of a commit that succeeded.
    pub(crate) fn apply(&self, actor_id: &Arc<str>, ops: &[ScheduleOp]) {
        for op in ops {
            match op {
                ScheduleOp::Add(schedule) => {
                    self.add(schedule.id.clone(), actor_id.clone(), schedule.at_ms)
                }
                ScheduleOp::Cancel { id } => self.remove(id),
            }
        }
    }

    /// How many schedules are pending.
    pub(crate) fn len(&self) -> usize {
        self.index.lock().by_id.len()
    }

    fn next_due(&self) -> Option<i64> {
        self.index.lock().by_time.first().map(|(at, _)| *at)
    }

    fn take_due(&self, now_ms: i64) -> Vec<(String, Arc<str>)> {
        let mut index = self.index.lock();
        let mut due = Vec::new();
        while let Some((at, _)) = index.by_time.first() {
            if *at > now_ms {
                break;
            }
            let (_, id) = index.by_time.pop_first().expect("the first entry exists");
            if let Some((_, actor_id)) = index.by_id.remove(&id) {
                due.push((id, actor_id));
            }
        }
        due
    }
}

/// The timer task: fires due schedules until the drain begins.
pub(crate) async fn run(core: Arc<Core>) {
    loop {
        let now = core.clock.now_ms();
        for (id, actor_id) in core.alarms.take_due(now) {
            fire(&core, id, actor_id);
        }
        let next = core.alarms.next_due();
        let deadline = next.map(|at| core.clock.instant_at(at));
        tokio::select! {
            // The drain outranks every alarm: actors are stopping.
            biased;
            _ = core.stop.cancelled() => break,
            // A schedule was added or moved: look again.
            _ = core.alarms.changed.notified() => {}
            // The earliest schedule fell due.
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {}
        }
    }
    tracing::debug!(pending = core.alarms.len(), "alarm timer stopped");
}

/// Sends one due schedule to its actor.
fn fire(core: &Arc<Core>, id: String, actor_id: Arc<str>) {
    let stored = match core.store.schedule(&id) {
        Ok(Some(stored)) => stored,
        // Cancelled, or already run, since it was indexed.
        Ok(None) => return,
        Err(err) => {
            // Offered again later, as a failed commit is: the read failing is not an attempt.
            tracing::warn!(error = %err, schedule_id = %id, actor_id = %actor_id, "reading a due schedule failed; offering it again later");
            let retry_at = core.clock.now_ms() + retry_delay(1).as_millis() as i64;
            core.alarms.add(id, actor_id, retry_at);
            return;
        }
    };
    let handle = match core
        .resolve_id(&actor_id)
        .and_then(|info| core.handle_for(&info))
    {
        Ok(handle) => handle,
        // The actor was destroyed; its schedules went with it.
        Err(Error::ActorNotFound) => return,
        Err(Error::RegistryShuttingDown) => return,
        Err(err) => {
            tracing::warn!(error = %err, schedule_id = %id, actor_id = %actor_id, "waking an actor for a schedule failed");
            return;
        }
    };
    match handle.send(Command::Alarm { stored }) {
        Ok(()) => core.metrics.schedule_fired(),
        Err(err) => {
            tracing::debug!(error = %err, schedule_id = %id, "actor busy; offering the schedule again later");
            let retry_at = core.clock.now_ms() + BUSY_RETRY.as_millis() as i64;
            core.alarms.add(id, actor_id, retry_at);
        }
    }
}
