//! The writer's queue, and when a commit skips it: ops wait here for the writer in the order
//! they were sent, and a commit sent to an idle writer is applied by its sender instead.
//!
//! Handing a commit to the writer thread costs two thread wake-ups (the thread's, then the
//! waiting task's once the release has run), which on the sequential path is as much as the
//! commit itself when it does not wait for a disk sync. So [`WriteQueue::send`] lets the
//! sender apply the commit itself, on its own thread, before `commit` returns, when the writer
//! is idle: nothing is queued, no batch is being applied, and the last batch ended at least
//! as long ago as it took (the writer was busy at most half the time lately). Under load the
//! last condition fails, commits queue, and the writer thread groups them as before: one
//! transaction per batch.
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
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::storage::writer::WriteOp;

/// The queue shared by every writer handle and the writer thread.
pub(crate) struct WriteQueue {
    state: Mutex<State>,
    /// The writer thread waits on it in [`WriteQueue::take`]; notified when an op is queued
    /// while nobody applies, when an inline sender finishes with ops queued, and when sends
    /// stop.
    ready: Condvar,
    /// Whether commits may be applied inline at all (see [`WriteQueue::new`]).
    inline: bool,
    /// Notified whenever a batch finishes, for tests that wait for an idle writer.
    #[cfg(test)]
    finished: Condvar,
}

struct State {
    ops: VecDeque<WriteOp>,
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
}

/// What [`WriteQueue::send`] did with an op.
pub(crate) enum Sent {
    /// It waits in the queue for the writer thread.
    Queued,
    /// The caller applies it now, then calls [`WriteQueue::finish`] (or [`WriteQueue::stop`]).
    Inline(WriteOp),
    /// Sends are refused; the op comes back for the caller to release with the error.
    Refused(WriteOp),
}

impl WriteQueue {
    /// An empty queue with one handle. `inline` allows commits to be applied by their
    /// senders when the writer is idle.
    pub(crate) fn new(inline: bool) -> WriteQueue {
        WriteQueue {
            state: Mutex::new(State {
                ops: VecDeque::new(),
                applying: false,
                open: true,
                stopped: false,
                handles: 1,
                idle_since: Instant::now(),
                last_batch: Duration::ZERO,
            }),
            ready: Condvar::new(),
            inline,
            #[cfg(test)]
            finished: Condvar::new(),
        }
    }

    /// Queues `op`, or hands it back to be applied inline when `may_inline` and the writer
    /// is idle (see the module doc), or refuses it once sends have stopped.
    pub(crate) fn send(&self, op: WriteOp, may_inline: bool) -> Sent {
        let mut state = self.state.lock();
        if !state.open {
            return Sent::Refused(op);
        }
        if matches!(op, WriteOp::Close) {
            state.open = false;
        }
        if may_inline
            && self.inline
            && !state.applying
            && state.ops.is_empty()
            && state.idle_since.elapsed() >= state.last_batch
        {
            state.applying = true;
            return Sent::Inline(op);
        }
        state.ops.push_back(op);
        if !state.applying {
            self.ready.notify_one();
        }
        Sent::Queued
    }

    /// For the writer thread: waits for ops and moves up to `max` of them (stopping after a
    /// `Close`) into `batch`, claiming the right to apply them. Returns `false` once there
    /// will be nothing more to take.
    pub(crate) fn take(&self, batch: &mut Vec<WriteOp>, max: usize) -> bool {
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
                    let close = matches!(op, WriteOp::Close);
                    batch.push(op);
                    if close {
                        break;
                    }
                }
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
        if !state.ops.is_empty() || !state.open {
            self.ready.notify_one();
        }
        #[cfg(test)]
        self.finished.notify_all();
    }

    /// Stops the writer for good: later sends are refused, and what is still queued is
    /// returned unreleased (after an injected crash, as after a real one, its senders are
    /// never acknowledged).
    pub(crate) fn stop(&self) -> VecDeque<WriteOp> {
        let mut state = self.state.lock();
        state.open = false;
        state.stopped = true;
        self.ready.notify_all();
        #[cfg(test)]
        self.finished.notify_all();
        std::mem::take(&mut state.ops)
    }

    /// Waits until nothing is queued or being applied, then forgets how long the last batch
    /// took, so that the next commit finds the writer idle.
    #[cfg(test)]
    pub(crate) fn forget_last_batch(&self) {
        let mut state = self.state.lock();
        while !state.stopped && (state.applying || !state.ops.is_empty()) {
            self.finished.wait(&mut state);
        }
        state.last_batch = Duration::ZERO;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::{mpsc, Arc};
    use std::thread::{self, ThreadId};
    use std::time::Duration;

    use parking_lot::Mutex;

    use crate::config::Durability;
    use crate::storage::store::{ActorRecord, Store};
    use crate::storage::writer::{CreateMode, Release, Writer, WriterHandle, Writes};

    /// A store in a new temp dir, its writer, and one actor row.
    async fn writer_with_actor(dir: &tempfile::TempDir) -> (Arc<Store>, Writer, WriterHandle) {
        let store = Store::open(dir.path(), Durability::Relaxed).unwrap();
        let writer = Writer::start(&store, None).unwrap();
        let handle = writer.handle();
        let record = ActorRecord {
            id: "a1".into(),
            name: "counter".into(),
            key: "k".into(),
        };
        handle
            .create_actor(record, None, CreateMode::GetOrCreate)
            .await
            .unwrap();
        (store, writer, handle)
    }

    fn state(byte: u8) -> Option<Box<Writes>> {
        Some(Box::new(Writes {
            state: Some(vec![byte]),
            ..Writes::default()
        }))
    }

    /// A release that notes which op it was and on which thread it ran.
    fn noting(log: &Arc<Mutex<Vec<(u8, ThreadId)>>>, op: u8) -> Release {
        let log = log.clone();
        Box::new(move |result| {
            result.unwrap();
            log.lock().push((op, thread::current().id()));
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_writer_commits_on_the_senders_thread_before_commit_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer, handle) = writer_with_actor(&dir).await;
        let transactions = writer.stats().transactions.load(Ordering::Relaxed);
        handle.shared_queue().forget_last_batch();
        let log = Arc::new(Mutex::new(Vec::new()));
        handle.commit("a1".into(), state(7), None, noting(&log, 1));
        // Released already, here: durable before `commit` returned.
        assert_eq!(*log.lock(), vec![(1, thread::current().id())]);
        assert_eq!(
            writer.stats().transactions.load(Ordering::Relaxed),
            transactions + 1
        );
        assert_eq!(store.load("a1").unwrap().unwrap().state, Some(vec![7]));
        writer.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_sent_while_one_is_applied_inline_are_grouped_and_released_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer, handle) = writer_with_actor(&dir).await;
        let transactions = writer.stats().transactions.load(Ordering::Relaxed);
        handle.shared_queue().forget_last_batch();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, started) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        // The first commit is applied inline on its own thread, whose release holds the
        // writer until the test lets it go.
        let first = {
            let (handle, log) = (handle.clone(), log.clone());
            thread::spawn(move || {
                let release = noting(&log, 1);
                handle.commit(
                    "a1".into(),
                    state(1),
                    None,
                    Box::new(move |result| {
                        started_tx.send(thread::current().id()).unwrap();
                        go_rx.recv().unwrap();
                        release(result);
                    }),
                );
                thread::current().id()
            })
        };
        let inline_thread = started.recv().unwrap();
        for op in 2..=4 {
            handle.commit("a1".into(), state(op), None, noting(&log, op));
        }
        // Queued behind the first: none released yet, on any thread.
        assert!(log.lock().is_empty());
        go.send(()).unwrap();
        assert_eq!(first.join().unwrap(), inline_thread);
        handle.flush().await.unwrap();
        let log = log.lock().clone();
        let order: Vec<u8> = log.iter().map(|(op, _)| *op).collect();
        assert_eq!(order, vec![1, 2, 3, 4]);
        assert_eq!(log[0].1, inline_thread);
        let main = thread::current().id();
        for (_, thread) in &log[1..] {
            assert_ne!(*thread, inline_thread);
            assert_ne!(*thread, main);
        }
        assert_eq!(log[1].1, log[3].1, "the queued commits share one batch");
        // The inline commit, then one transaction for the three queued ones.
        assert_eq!(
            writer.stats().transactions.load(Ordering::Relaxed),
            transactions + 2
        );
        assert_eq!(store.load("a1").unwrap().unwrap().state, Some(vec![4]));
        writer.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_right_after_a_long_batch_goes_to_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, writer, handle) = writer_with_actor(&dir).await;
        handle.shared_queue().forget_last_batch();
        let log = Arc::new(Mutex::new(Vec::new()));
        let slow = noting(&log, 1);
        // A batch that takes 200 ms (its release stands in for a slow disk): the writer was
        // busy nearly all of the time since, so the next commit is queued, not applied here.
        handle.commit(
            "a1".into(),
            state(1),
            None,
            Box::new(move |result| {
                thread::sleep(Duration::from_millis(200));
                slow(result);
            }),
        );
        handle.commit("a1".into(), state(2), None, noting(&log, 2));
        assert_eq!(
            log.lock().len(),
            1,
            "the second commit was not applied inline"
        );
        handle.flush().await.unwrap();
        let log = log.lock().clone();
        assert_eq!(log[0].1, thread::current().id());
        assert_eq!(log[1].0, 2);
        assert_ne!(log[1].1, thread::current().id());
        writer.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_close_commits_are_refused_with_writer_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, writer, handle) = writer_with_actor(&dir).await;
        writer.close().await;
        handle.shared_queue().forget_last_batch();
        let (tx, rx) = mpsc::channel();
        handle.commit(
            "a1".into(),
            state(1),
            None,
            Box::new(move |result| tx.send(result.unwrap_err().code().to_string()).unwrap()),
        );
        assert_eq!(rx.try_recv().unwrap(), "writer_closed");
    }
}
