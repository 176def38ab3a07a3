//! What an actor's task and its handles share about the task's life: whether the task has
//! stopped, and how many keep-awake holds are open.
//!
//! Every awake actor holds one, so it is kept small: two atomics and two `Notify`s (about 100
//! bytes with its `Arc`), where a `watch` channel for each was about 350 bytes apiece (a
//! `watch` keeps eight `Notify`s for its receivers).
//!
//! - `stopped` turns `true` once, when the task has left the live set
//!   ([`StopSignal::signal`]), or when the task is dropped without signalling (a panic
//!   unwound it, or the runtime dropped it): either way, whoever waits is woken.
//! - `holds` is changed by the handles; the task alone waits for its changes
//!   ([`TaskSignals::holds_changed`]), which are remembered while it is not waiting.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// The shared part; see the module doc.
#[derive(Default)]
pub(crate) struct TaskSignals {
    stopped: AtomicBool,
    holds: AtomicUsize,
    /// Woken (all waiters) when `stopped` turns `true`.
    on_stop: Notify,
    /// Woken (the task) when `holds` changes.
    on_holds: Notify,
}

impl TaskSignals {
    /// Whether the task has stopped (or is gone).
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Resolves once the task has stopped (or is gone).
    pub(crate) async fn wait_stopped(&self) {
        loop {
            let notified = self.on_stop.notified();
            tokio::pin!(notified);
            // Registered before the check, so a stop between the two still wakes it.
            notified.as_mut().enable();
            if self.is_stopped() {
                return;
            }
            notified.await;
        }
    }

    /// How many keep-awake holds are open.
    pub(crate) fn holds(&self) -> usize {
        self.holds.load(Ordering::SeqCst)
    }

    /// Opens (`held`) or closes a keep-awake hold; closing more than were opened is ignored.
    pub(crate) fn change_holds(&self, held: bool) {
        let _ = self
            .holds
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |count| {
                Some(if held {
                    count.saturating_add(1)
                } else {
                    count.saturating_sub(1)
                })
            });
        // A permit is kept if the task is not waiting now: it sees the change on its next wait.
        self.on_holds.notify_one();
    }

    /// Resolves once the holds changed since the last time this resolved. Only the task waits
    /// on it.
    pub(crate) async fn holds_changed(&self) {
        self.on_holds.notified().await;
    }

    fn set_stopped(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.on_stop.notify_waiters();
    }
}

/// The task's side: signals `stopped` once, by [`StopSignal::signal`] or when dropped.
pub(crate) struct StopSignal(Arc<TaskSignals>);

impl StopSignal {
    /// A new pair of signals, and the task's side of them.
    pub(crate) fn new() -> (StopSignal, Arc<TaskSignals>) {
        let shared = Arc::new(TaskSignals::default());
        (StopSignal(shared.clone()), shared)
    }

    /// The shared signals.
    pub(crate) fn shared(&self) -> &Arc<TaskSignals> {
        &self.0
    }

    /// The task has stopped and left the live set.
    pub(crate) fn signal(self) {
        // Drop signals.
    }
}

impl Drop for StopSignal {
    fn drop(&mut self) {
        self.0.set_stopped();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn every_waiter_wakes_once_stopped_including_those_that_came_late() {
        let (signal, shared) = StopSignal::new();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(async move { shared.wait_stopped().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(!shared.is_stopped());
        signal.signal();
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("a waiter was not woken")
                .unwrap();
        }
        // After the fact it resolves at once.
        tokio::time::timeout(Duration::from_secs(5), shared.wait_stopped())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_task_dropped_without_signalling_counts_as_stopped() {
        let (signal, shared) = StopSignal::new();
        let waiter = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.wait_stopped().await })
        };
        tokio::task::yield_now().await;
        drop(signal);
        assert!(shared.is_stopped());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_change_of_holds_made_while_the_task_is_busy_is_seen_by_its_next_wait() {
        let (_signal, shared) = StopSignal::new();
        shared.change_holds(true);
        shared.change_holds(true);
        shared.change_holds(false);
        shared.change_holds(false);
        shared.change_holds(false);
        assert_eq!(
            shared.holds(),
            0,
            "closing more than were opened is ignored"
        );
        tokio::time::timeout(Duration::from_secs(5), shared.holds_changed())
            .await
            .expect("the change made before the wait was lost");
        // Seen once: the next wait waits for the next change.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), shared.holds_changed())
                .await
                .is_err()
        );
    }
}
