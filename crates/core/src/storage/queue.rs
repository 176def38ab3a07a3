//! The writer's queue, and when a commit skips it: ops wait here for the writer in the order
//! they were sent, and a commit sent to an idle writer is applied by its sender instead.
//!
//! Handing a commit to the writer thread costs two thread wake-ups (the thread's, then the
//! waiting task's once the release has run), which on the sequential path is as much as the
//! commit itself when it does not wait for a disk sync. So [`WriteQueue::send`] lets the
//! sender apply the commit itself, on its own thread, before `commit` returns, when the writer
//! is idle: nothing is queued, no batch is being applied, the last batch ended at least as long
//! ago as it took (the writer was busy at most half the time lately), and the last batch was
//! alone (one op, and nothing was queued behind it by the time it finished). Under load the
//! last two conditions fail, commits queue, and the writer thread groups them as before: one
//! transaction per batch.
//!
//! The last condition is there for bursts. With many actors each with a call in flight, commits
//! come in bursts (one per batch of completions from JS), and the pause before a burst is
//! often longer than the last batch took; by the first three conditions alone the first commit
//! of every burst was applied inline, as a transaction of its own, with its flush holding the
//! sender's tokio worker (the only one on a small machine) while the rest of the burst waited
//! behind it. A burst's batches hold several ops, or have ops queued behind them, so after one
//! the next burst's first commit queues with the rest. One-call-at-a-time traffic makes every
//! batch alone, so it keeps skipping the queue; and a lone commit after a burst, applied by the
//! thread, is alone too, so the one after it skips the queue again.
//!
//! Under `durability: "full"` applying a commit waits for its flush, and an inline commit's
//! flush holds the sender's tokio worker, and with it every other actor's replies and
//! completions. The rules above do not keep that off the 64-connection counter: a commit can
//! find the writer idle because the worker it would come from was itself blocked, and inline
//! commits there cost more transactions and more CPU per call (bench/README.md, "Actors
//! without `db` lose nothing"). So under `full` ([`Inline::Alone`]) a commit is applied inline
//! only when nobody can be waiting behind it: its sender is alone (no other actor of the
//! runtime is handling a message, and no message waits for the sender's actor behind this
//! call: those run while the thread flushes, and their commits share the next flush), the
//! commit sent before it was the same actor's (one actor called one call at a time; with
//! several actors busy their commits interleave), the last batch was alone, and that batch,
//! flush included, took at most [`INLINE_FLUSH_BOUND`], so a request that arrives meanwhile
//! waits at most that long, as it would behind a plain Node server's synchronous commit. The
//! duty-cycle rule does not apply there: a flush takes longer than the gap between one
//! caller's calls, and the other rules already rule out a burst.
//!
//! What must stay true:
//! - **One applier at a time.** Whoever is applying (the thread or an inline sender) holds
//!   `applying`; an op is applied inline only when it would have been the next op taken and
//!   nobody is applying, so the commit order is the order of `send`, inline or queued.
//! - **A batch's releases run before the next batch starts**, because `applying` is cleared
//!   ([`WriteQueue::finish`]) only after they ran; a poison mark set by a failed batch is
//!   therefore seen by every later commit of the instance.
//! - **Nothing waits unseen.** An op queued while an inline sender applies is taken by the
//!   thread as soon as that sender finishes ([`WriteQueue::finish`] wakes it).
//! - After `Close`, after the last handle is gone or after an injected crash, sends are
//!   refused (their sender releases them with `storage.writer_closed`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// The longest a batch may have taken for the next commit under `full` to be applied inline:
/// that long the sender's thread (a tokio worker) is held by the flush, and requests that
/// arrive meanwhile wait for it. A disk that flushes slower than this gains little from two
/// wake-ups saved, next to its flush.
pub(crate) const INLINE_FLUSH_BOUND: Duration = Duration::from_millis(1);

/// When commits may be applied by their senders (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inline {
    /// When the writer is idle (`durability: "relaxed"`: applying waits for no flush).
    Idle,
    /// When the writer is idle, the sender is alone (see [`Sender::alone`]), the last commit
    /// sent was the same actor's, and the last batch, its flush included, took at most
    /// [`INLINE_FLUSH_BOUND`] (`durability: "full"`).
    Alone,
}

/// Who sends a commit, for whether it may be applied inline.
pub(crate) struct Sender<'a> {
    /// The actor whose commit it is.
    pub(crate) actor: &'a Arc<str>,
    /// No other actor has a call in progress, and no call waits for this one's actor behind
    /// it (`Storage::commit`'s `alone`).
    pub(crate) alone: bool,
}

/// The queue shared by every writer handle and the writer thread.
/// Generic over the op type `Op`, so that it needs nothing of the writer's.
pub(crate) struct WriteQueue<Op> {
    state: Mutex<State<Op>>,
    /// The writer thread waits on it in [`WriteQueue::take`]; notified when an op is queued
    /// while nobody applies, when an inline sender finishes with ops queued, and when sends
    /// stop.
    ready: Condvar,
    /// When commits may be applied inline (see [`WriteQueue::new`]).
    inline: Inline,
    /// Notified whenever a batch finishes, for tests that wait for an idle writer.
    #[cfg(test)]
    finished: Condvar,
}

struct State<Op> {
    ops: VecDeque<Op>,
    /// Someone is applying a batch (the thread, or a sender inline).
    applying: bool,
    /// Sends are accepted: false once `Close` is queued or every handle is gone.
    open: bool,
    /// The writer has stopped for good (an injected crash, or it closed): `take` returns.
    stopped: bool,
    /// Live writer handles; sends stop when the last one goes.
    handles: usize,
    /// When the last batch ended.
    idle_since: Instant,
    /// How long the last batch took to apply and release.
    last_batch: Duration,
    /// How many ops the batch being applied (or the last one) holds.
    batch_ops: usize,
    /// Whether the last batch was alone: one op, with nothing queued behind it when it
    /// finished.
    last_alone: bool,
    /// The actor of the last op sent, if it was a commit.
    last_actor: Option<Arc<str>>,
}

/// What [`WriteQueue::send`] did with an op.
pub(crate) enum Sent<Op> {
    /// It waits in the queue for the writer thread.
    Queued,
    /// It waits in the queue for the writer thread only because the last batch took longer
    /// than [`INLINE_FLUSH_BOUND`]: every other rule would have let its sender apply it.
    Slow,
    /// The caller applies it now, then calls [`WriteQueue::finish`] (or [`WriteQueue::stop`]).
    Inline(Op),
    /// Sends are refused; the op comes back for the caller to release with the error.
    Refused(Op),
}

impl<Op> WriteQueue<Op> {
    /// An empty queue with one handle; `inline` says when commits may be applied by their
    /// senders.
    pub(crate) fn new(inline: Inline) -> WriteQueue<Op> {
        WriteQueue {
            state: Mutex::new(State {
                ops: VecDeque::new(),
                applying: false,
                open: true,
                stopped: false,
                handles: 1,
                idle_since: Instant::now(),
                last_batch: Duration::ZERO,
                batch_ops: 0,
                last_alone: true,
                last_actor: None,
            }),
            ready: Condvar::new(),
            inline,
            #[cfg(test)]
            finished: Condvar::new(),
        }
    }

    /// Queues `op`, or hands it back to be applied inline when it is a commit (`sender` is
    /// given) and the writer is idle (see the module doc), or refuses it once sends have
    /// stopped. `closes` marks the op after which sends are refused (`Close`).
    pub(crate) fn send(&self, op: Op, sender: Option<Sender<'_>>, closes: bool) -> Sent<Op> {
        let mut state = self.state.lock();
        if !state.open {
            return Sent::Refused(op);
        }
        if closes {
            state.open = false;
        }
        let same_actor = match (&sender, &state.last_actor) {
            (Some(sender), Some(last)) => **last == **sender.actor,
            _ => false,
        };
        state.last_actor = sender.as_ref().map(|sender| sender.actor.clone());
        let idle = !state.applying && state.ops.is_empty() && state.last_alone;
        let (allowed, slow) = match (&sender, self.inline) {
            (None, _) => (false, false),
            (Some(_), Inline::Idle) => (state.idle_since.elapsed() >= state.last_batch, false),
            // Nobody waits behind the sender, so how busy the writer was lately says nothing
            // about a burst (a flush takes longer than the gap between sequential calls).
            (Some(sender), Inline::Alone) => {
                let fast = state.last_batch <= INLINE_FLUSH_BOUND;
                let rest = sender.alone && same_actor && idle;
                (rest && fast, rest && !fast)
            }
        };
        if allowed && idle {
            state.applying = true;
            state.batch_ops = 1;
            return Sent::Inline(op);
        }
        state.ops.push_back(op);
        if !state.applying {
            self.ready.notify_one();
        }
        if slow {
            Sent::Slow
        } else {
            Sent::Queued
        }
    }

    /// For the writer thread: waits for ops and moves up to `max` of them (stopping after one
    /// that `closes`) into `batch`, claiming the right to apply them. Returns `false` once
    /// there will be nothing more to take.
    pub(crate) fn take(
        &self,
        batch: &mut Vec<Op>,
        max: usize,
        closes: impl Fn(&Op) -> bool,
    ) -> bool {
        let mut state = self.state.lock();
        loop {
            if state.stopped {
                return false;
            }
            if !state.applying && !state.ops.is_empty() {
                state.applying = true;
                while batch.len() < max {
                    let Some(op) = state.ops.pop_front() else {
                        break;
                    };
                    let close = closes(&op);
                    batch.push(op);
                    if close {
                        break;
                    }
                }
                state.batch_ops = batch.len();
                return true;
            }
            if !state.open && !state.applying {
                return false;
            }
            self.ready.wait(&mut state);
        }
    }

    /// Gives up the right to apply after a batch that began at `started` has been applied
    /// and released, waking the writer thread if ops queued meanwhile.
    pub(crate) fn finish(&self, started: Instant) {
        let mut state = self.state.lock();
        let now = Instant::now();
        state.applying = false;
        state.last_batch = now.saturating_duration_since(started);
        state.idle_since = now;
        state.last_alone = state.batch_ops == 1 && state.ops.is_empty();
        if !state.ops.is_empty() || !state.open {
            self.ready.notify_one();
        }
        #[cfg(test)]
        self.finished.notify_all();
    }

    /// Stops the writer for good: later sends are refused, and what is still queued is
    /// returned unreleased (after an injected crash, as after a real one, its senders are
    /// never acknowledged).
    pub(crate) fn stop(&self) -> VecDeque<Op> {
        let mut state = self.state.lock();
        state.open = false;
        state.stopped = true;
        self.ready.notify_all();
        #[cfg(test)]
        self.finished.notify_all();
        std::mem::take(&mut state.ops)
    }

    /// Waits until nothing is queued or being applied, then forgets the last batch (how long
    /// it took, and whether it was alone), so that the next commit finds the writer idle.
    #[cfg(test)]
    pub(crate) fn forget_last_batch(&self) {
        let mut state = self.idle_state();
        state.last_batch = Duration::ZERO;
        state.last_alone = true;
    }

    /// Waits until nothing is queued or being applied (or the writer stopped).
    #[cfg(test)]
    pub(crate) fn wait_idle(&self) {
        drop(self.idle_state());
    }

    #[cfg(test)]
    fn idle_state(&self) -> parking_lot::MutexGuard<'_, State<Op>> {
        let mut state = self.state.lock();
        while !state.stopped && (state.applying || !state.ops.is_empty()) {
            self.finished.wait(&mut state);
        }
        state
    }

    /// Drops a handle; once the last is gone sends stop, and the thread ends after what is
    /// queued.
    pub(crate) fn drop_handle(&self) {
        let mut state = self.state.lock();
        state.handles -= 1;
        if state.handles == 0 {
            state.open = false;
            self.ready.notify_all();
        }
    }
}
