//! An actor's outbox: where a commit's release hands over what leaves for clients (the call's
//! events, its reply, the closes it asked for), so that none of it runs on storage's thread.
//!
//! Storage runs each commit's release on its own thread, in commit order (the embedded
//! writer releases a whole batch before it starts the next one). Fanning a broadcast out to
//! many connections there would hold up every other actor's commit behind this actor's
//! clients; so a release only applies what is cheap and in memory (the schedule index, the
//! pending-commit count) and hands the rest to the outbox. A tracked task per actor takes what
//! was handed over, in order, and runs it.
//!
//! What must stay true:
//! - Order: deliveries run in the order they were handed over, which is commit order; each
//!   delivery queues a call's events before its reply and its closes after both. So a
//!   connection hears the events of a call before its reply, and calls in commit order, as
//!   when it all ran in the release.
//! - Once an actor has an outbox, every release of its instance goes through it (an earlier
//!   release must not be overtaken by a later one that skipped the queue).
//! - Nothing is lost by a drainer that has gone (a forced drain): a delivery handed over then
//!   runs at once, where it was handed over.

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// What a release hands over: queue events, answer the caller, close connections.
pub(crate) type Delivery = Box<dyn FnOnce() + Send>;

/// The sending side of an actor's outbox. Cloneable: the actor task and every pending
/// release hold one; the drainer ends once all are gone.
#[derive(Clone)]
pub(crate) struct Outbox {
    /// Unbounded, like the writer's queue it mirrors: each entry is one commit already
    /// admitted, so the queue is bounded by the actor's mailbox and pipelining.
    tx: mpsc::UnboundedSender<Delivery>,
}

impl Outbox {
    /// Starts the drainer on `tracker`, in `span`. `force` (the forced drain) stops it at once.
    pub(crate) fn start(
        tracker: &TaskTracker,
        force: &CancellationToken,
        span: tracing::Span,
    ) -> Outbox {
        let (tx, mut rx) = mpsc::unbounded_channel::<Delivery>();
        let force = force.clone();
        tracker.spawn(
            async move {
                loop {
                    tokio::select! {
                        // A forced drain abandons what is left: its callers hear `shut_down`.
                        biased;
                        _ = force.cancelled() => break,
                        // The next delivery, or `None` once every sender is gone.
                        next = rx.recv() => match next {
                            Some(delivery) => delivery(),
                            None => break,
                        },
                    }
                }
            }
            .instrument(span),
        );
        Outbox { tx }
    }

    /// Hands a delivery over; it runs after every delivery handed over before it.
    pub(crate) fn send(&self, delivery: Delivery) {
        if let Err(mpsc::error::SendError(delivery)) = self.tx.send(delivery) {
            delivery();
        }
    }

    /// Resolves once every delivery handed over before this call has run.
    pub(crate) async fn drained(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Box::new(move || {
            // The waiter may have given up.
            let _ = tx.send(());
        }));
        // An error means the drainer was abandoned by a forced drain: nothing to wait for.
        let _ = rx.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn deliveries_run_in_the_order_they_were_handed_over() {
        let tracker = TaskTracker::new();
        let outbox = Outbox::start(&tracker, &CancellationToken::new(), tracing::Span::none());
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..100 {
            let seen = seen.clone();
            outbox.send(Box::new(move || seen.lock().unwrap().push(i)));
        }
        outbox.drained().await;
        assert_eq!(*seen.lock().unwrap(), (0..100).collect::<Vec<_>>());
        drop(outbox);
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn after_a_forced_drain_a_delivery_still_runs() {
        let tracker = TaskTracker::new();
        let force = CancellationToken::new();
        let outbox = Outbox::start(&tracker, &force, tracing::Span::none());
        force.cancel();
        tracker.close();
        tracker.wait().await;
        let ran = Arc::new(Mutex::new(false));
        let flag = ran.clone();
        outbox.send(Box::new(move || *flag.lock().unwrap() = true));
        assert!(*ran.lock().unwrap());
    }
}
