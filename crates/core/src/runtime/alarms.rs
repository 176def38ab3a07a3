//! The alarm timer: one task that fires every actor's durable schedules when they fall due.
//!
//! Schedules live in storage; the in-memory index of when each falls due
//! (`actor/schedules.rs`) is loaded at start-up (so schedules that fell due while the process was down fire at
//! once) and updated after each commit that adds, cancels or retries one. When one falls due,
//! the timer sends it to its actor's mailbox, waking the actor if it sleeps. The actor runs
//! the action and settles the schedule in the same commit as the action's effects, so a
//! schedule whose run committed is never run again; a run lost to a crash runs again after
//! restart (at least once).

use std::sync::Arc;

use crate::actor::schedules::{offer_again_delay, Firing, SCHEDULE_BUSY_RETRY};
use crate::actor::Command;
use crate::error::Error;
use crate::runtime::dispatch::Dispatch;

/// The timer task: fires due schedules until the drain begins.
pub(crate) async fn run(dispatch: Arc<Dispatch>) {
    loop {
        let now = dispatch.clock.now_ms();
        for (id, actor_id, firing) in dispatch.schedules.take_due(now) {
            fire(&dispatch, id, actor_id, firing).await;
        }
        let next = dispatch.schedules.next_due();
        let deadline = next.map(|at| dispatch.clock.instant_at(at));
        tokio::select! {
            // The drain outranks every alarm: actors are stopping.
            biased;
            _ = dispatch.stop.cancelled() => break,
            // A schedule was added or moved: look again.
            _ = dispatch.schedules.changed.notified() => {}
            // The earliest schedule fell due.
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {}
        }
    }
    tracing::debug!(pending = dispatch.schedules.len(), "alarm timer stopped");
}

/// Sends one due schedule to its actor.
/// `firing` keeps it counted as pending until it is delivered (or given up).
async fn fire(dispatch: &Dispatch, id: String, actor_id: Arc<str>, firing: Firing) {
    let stored = match dispatch.storage.schedule(&id).await {
        Ok(Some(stored)) => stored,
        // Cancelled, or already run, since it was indexed.
        Ok(None) => return,
        Err(err) => {
            // Offered again later, as a failed commit is: the read failing is not an attempt
            // (its attempts are unknown, so it waits as a first retry would).
            tracing::warn!(error = %err, schedule_id = %id, actor_id = %actor_id, "reading a due schedule failed; offering it again later");
            let retry_at = dispatch.clock.now_ms() + offer_again_delay(0).as_millis() as i64;
            dispatch.schedules.add(id, actor_id, retry_at);
            return;
        }
    };
    let handle = match dispatch
        .resolve_id(&actor_id)
        .await
        .and_then(|info| dispatch.activate(&info))
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
    match handle.send(Command::Alarm { stored, firing }) {
        Ok(()) => dispatch.metrics.schedule_fired(),
        Err(err) => {
            tracing::debug!(error = %err, schedule_id = %id, "actor busy; offering the schedule again later");
            let retry_at = dispatch.clock.now_ms() + SCHEDULE_BUSY_RETRY.as_millis() as i64;
            dispatch.schedules.add(id, actor_id, retry_at);
        }
    }
}
