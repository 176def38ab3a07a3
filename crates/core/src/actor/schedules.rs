//! Schedules of one actor: how a failed run is retried, and the in-memory index of when each
//! pending schedule falls due.
//!
//! The retry rules live here alone: a run that failed is retried after [`retry_delay`] until
//! it has failed [`SCHEDULE_MAX_ATTEMPTS`] times ([`after_failure`]); a failure before anything
//! of a run was committed (a failed read or commit) is no attempt, and the schedule is offered
//! again after the delay its next retry would wait ([`offer_again_delay`]); an actor whose
//! mailbox is full is offered it again after [`SCHEDULE_BUSY_RETRY`]. The schedule's format
//! (`Schedule`, `ScheduleOp`, `ScheduleWrite`) is in `host.rs`, below both the host and the
//! storage seams that carry it; its SQL is storage's.
//!
//! Schedules live in storage; this index mirrors them so the alarm timer (`runtime/alarms.rs`)
//! need not poll. What must stay true: the index changes only after the commit that changed a
//! schedule is durable (an actor applies its commit's schedule changes in the commit's
//! release), so it never fires a schedule that storage does not hold; a schedule may still be
//! fired after it was cancelled or run, and is then read again and skipped. A schedule taken
//! out to fire still counts as pending ([`Firing`]) until its actor begins to run it, or it
//! is dropped undelivered.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::host::ScheduleWrite;

/// How many times a schedule runs before keel gives up on it: the first run and four retries.
pub const SCHEDULE_MAX_ATTEMPTS: u32 = 5;
/// The delay before the first retry; each later retry doubles it.
pub const SCHEDULE_RETRY_BASE: Duration = Duration::from_secs(1);
/// The longest delay between retries.
pub const SCHEDULE_RETRY_MAX: Duration = Duration::from_secs(60);

/// How long a due schedule waits before it is offered again to an actor whose mailbox was
/// full; the offer is not an attempt.
pub const SCHEDULE_BUSY_RETRY: Duration = Duration::from_secs(1);

/// The delay before retry number `attempts` (1 for the first retry).
pub fn retry_delay(attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(16);
    (SCHEDULE_RETRY_BASE * factor).min(SCHEDULE_RETRY_MAX)
}

/// What follows a failed run, `attempts` counting every failed run so far, this one included:
/// the delay before the next run, or `None` once the schedule is given up.
pub fn after_failure(attempts: u32) -> Option<Duration> {
    (attempts < SCHEDULE_MAX_ATTEMPTS).then(|| retry_delay(attempts))
}

/// The delay before a schedule is offered again after a failure that left it unchanged in
/// storage (`attempts` failed runs so far): its next retry's delay, with no attempt counted.
pub fn offer_again_delay(attempts: u32) -> Duration {
    retry_delay(attempts + 1)
}

#[derive(Default)]
struct Index {
    /// Pending schedules in firing order: (due, schedule id).
    by_time: BTreeSet<(i64, String)>,
    /// Each pending schedule's due time and actor.
    by_id: HashMap<String, (i64, Arc<str>)>,
    /// Schedules taken out to fire and not yet begun by their actor.
    firing: usize,
}

/// The in-memory index of pending schedules, shared by the timer task and the actors.
#[derive(Default)]
pub(crate) struct Alarms {
    index: Mutex<Index>,
    /// Wakes the timer when the index changes; `notify_one` keeps a permit, so a change made
    /// while the timer is busy is never missed.
    pub(crate) changed: Notify,
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
    pub(crate) fn apply(&self, actor_id: &Arc<str>, ops: &[ScheduleWrite]) {
        for op in ops {
            match op {
                ScheduleWrite::Add(schedule) => {
                    self.add(schedule.id.clone(), actor_id.clone(), schedule.at_ms)
                }
                ScheduleWrite::Cancel { id } => self.remove(id),
            }
        }
    }

    /// How many schedules are pending.
    pub(crate) fn len(&self) -> usize {
        let index = self.index.lock();
        index.by_id.len() + index.firing
    }

    /// When the earliest pending schedule falls due.
    pub(crate) fn next_due(&self) -> Option<i64> {
        self.index.lock().by_time.first().map(|(at, _)| *at)
    }

    /// Takes every schedule due at `now_ms` out of the index; each stays counted as pending
    /// while its [`Firing`] lives.
    pub(crate) fn take_due(self: &Arc<Self>, now_ms: i64) -> Vec<(String, Arc<str>, Firing)> {
        let mut index = self.index.lock();
        let mut due = Vec::new();
        while let Some((at, _)) = index.by_time.first() {
            if *at > now_ms {
                break;
            }
            let (_, id) = index.by_time.pop_first().expect("the first entry exists");
            if let Some((_, actor_id)) = index.by_id.remove(&id) {
                index.firing += 1;
                let firing = Firing {
                    alarms: self.clone(),
                };
                due.push((id, actor_id, firing));
            }
        }
        due
    }
}

/// A due schedule on its way to its actor. It counts as pending until it is dropped: by the
/// actor as it begins to run the schedule, or by whoever gives up delivering it.
pub(crate) struct Firing {
    alarms: Arc<Alarms>,
}

impl Drop for Firing {
    fn drop(&mut self) {
        self.alarms.index.lock().firing -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_run_is_retried_after_1_2_4_and_8_seconds_then_given_up() {
        let delays: Vec<_> = (1..=SCHEDULE_MAX_ATTEMPTS).map(after_failure).collect();
        let secs = Duration::from_secs;
        assert_eq!(
            delays,
            [
                Some(secs(1)),
                Some(secs(2)),
                Some(secs(4)),
                Some(secs(8)),
                None
            ]
        );
        assert_eq!(retry_delay(40), SCHEDULE_RETRY_MAX);
        assert_eq!(offer_again_delay(0), secs(1));
        assert_eq!(offer_again_delay(2), secs(4));
    }
}
