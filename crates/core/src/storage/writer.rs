//! The group-commit writer: the one thread that writes to the database.
//!
//! Every durable change (a new actor, an actor's new state) and every output that must wait
//! for durability (an action's reply) is sent here as a [`WriteOp`]. The thread takes
//! everything queued, applies it in arrival order inside one transaction, commits, and only
//! then runs each op's release callback. That is both the group commit (many actors' writes
//! share one fsync) and the output gate (no reply leaves before the state it observed is on
//! disk). Ops that write nothing still wait for every earlier op's commit, so replies from
//! one actor leave in order.
//!
//! A failed commit changes nothing: the transaction rolls back, every op in the batch is
//! released with the error, and the connection is made usable again (rolled back, or
//! reopened), so the writer goes on once the cause (a full disk, say) is gone. A `COMMIT`
//! that failed after writing to the WAL (its sync failed) is followed at once by an empty
//! commit over those frames, so that a crash cannot resurrect it.
//!
//! Because an actor runs its next calls before the earlier ones are durable, a failed commit
//! also poisons the actor's instance ([`Poison`]): the writer refuses every later commit of that
//! instance, with the same error, until the actor task has replaced the instance with one
//! loaded from committed state.
//!
//! A commit sent while the writer is idle skips the thread: its sender applies it, and runs
//! its release, before [`WriterHandle::commit`] returns (see `queue.rs` for when, and what
//! keeps the order). It is the same batch of one, through the same code, that the thread
//! would have applied; it only saves the two thread hand-offs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::config::Durability;
use crate::error::{Error, Result};
use crate::faults::{self, Failpoint, Fault, FaultState};
use crate::host::{KvWrite, Payload, ScheduleWrite};
use crate::metrics::WriterStats;
use crate::storage::integrity::Integrity;
use crate::storage::queue::{Inline, Sender, Sent, WriteQueue};
use crate::storage::store::{ActorRecord, Store};

/// The most ops one transaction takes; a longer queue is split over several commits.
const MAX_BATCH_OPS: usize = 4096;

pub use crate::storage::seam::{ConnWrite, CreateMode, DbChange, Poison, Release, Settle, Writes};

/// One unit of work for the writer.
pub enum WriteOp {
    /// Inserts an actor row (or finds the existing one) and replies once durable.
    CreateActor {
        /// The row to insert.
        record: ActorRecord,
        /// The creation input, stored with the row.
        input: Option<Payload>,
        /// What to do when the key already has a row.
        mode: CreateMode,
        /// Receives the row that holds the key, and whether this op created it.
        reply: oneshot::Sender<Result<(ActorRecord, bool)>>,
    },
    /// Applies an actor's writes (if any), then releases the output that waited on them.
    Commit {
        /// The actor whose writes these are.
        actor_id: Arc<str>,
        /// What to write; `None` only orders `release` behind earlier commits.
        writes: Option<Box<Writes>>,
        /// The poison mark of the instance that produced the writes, if an actor did.
        poison: Option<Arc<Poison>>,
        /// What to let out once the commit is durable.
        release: Release,
    },
    /// Deletes an actor with its KV and schedules.
    DeleteActor {
        /// The actor to delete.
        actor_id: Arc<str>,
        /// What to let out once the deletion is durable.
        release: Release,
    },
    /// Commits what came before, then stops the thread; later sends fail.
    Close,
}

/// The sending side of the writer. Cloneable; the thread stops once every handle is dropped
/// and the queue is empty.
#[derive(Clone)]
pub struct WriterHandle {
    shared: Arc<Shared>,
    /// Counts as one handle in the queue for all its clones; dropping the last clone stops
    /// sends.
    _alive: Arc<Alive>,
}

/// What the handles and the writer thread share.
struct Shared {
    /// Ops waiting for the writer, in send order. Unbounded on purpose: each actor has at most
    /// one action running at a time and bounded mailboxes, so the queue is bounded by the work
    /// already admitted; blocking an actor on the writer would only move the queue elsewhere.
    queue: WriteQueue<WriteOp>,
    /// The connection and what applies a batch, locked by whoever holds the queue's right to
    /// apply (so never contended); `None` once the writer has closed or crashed.
    core: Mutex<Option<WriterThread>>,
    /// The writer's counters (the thread's own copy is in `core`).
    stats: Arc<WriterStats>,
}

/// Stops sends when the last [`WriterHandle`] clone drops.
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.queue.drop_handle();
    }
}

/// Owns the writer thread; `join` waits for it to finish what was queued.
pub struct Writer {
    handle: Option<WriterHandle>,
    /// The writer runs as a blocking task: tokio's test clock does not auto-advance while it
    /// runs, so tests with paused time move time only when they say so.
    thread: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<WriterStats>,
}

impl Writer {
    /// Starts the writer thread over a new writer connection to `store`, checking the
    /// failpoints of `faults` if given. Must be called within a tokio runtime.
    pub(crate) fn start(store: &Arc<Store>, faults: Option<Arc<FaultState>>) -> Result<Writer> {
        let conn = store.connect(true)?;
        let integrity = store.integrity();
        let stats = Arc::new(WriterStats::default());
        let shared = Arc::new(Shared {
            // Under `full` an inline commit's flush holds the sender's tokio worker, so only a
            // sender that nobody waits behind applies one, on a disk that flushes fast (see
            // `queue.rs`).
            queue: WriteQueue::new(match store.durability() {
                Durability::Relaxed => Inline::Idle,
                Durability::Full => Inline::Alone,
            }),
            core: Mutex::new(Some(WriterThread {
                conn,
                store: store.clone(),
                faults,
                stats: stats.clone(),
                integrity,
            })),
            stats: stats.clone(),
        });
        let span = tracing::Span::current();
        let thread_shared = shared.clone();
        let thread = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            run(&thread_shared);
        });
        Ok(Writer {
            handle: Some(WriterHandle {
                _alive: Arc::new(Alive(shared.clone())),
                shared,
            }),
            thread: Some(thread),
            stats,
        })
    }

    /// A handle for sending ops.
    pub fn handle(&self) -> WriterHandle {
        self.handle.clone().expect("the writer is running")
    }

    /// The writer's counters.
    pub fn stats(&self) -> &Arc<WriterStats> {
        &self.stats
    }

    /// Commits everything queued so far, stops the thread and waits for it to exit. Ops sent
    /// afterwards fail with `storage.writer_closed`.
    pub async fn close(mut self) {
        if let Some(handle) = self.handle.take() {
            // A send fails only if the thread is already gone, which is what we want.
            let _ = handle.send(WriteOp::Close);
        }
        if let Some(thread) = self.thread.take() {
            // A panic in the writer thread has already been reported by the panic hook.
            let _ = thread.await;
        }
    }
}

impl WriterHandle {
    /// Queues an op. Fails only when the writer has stopped.
    pub fn send(&self, op: WriteOp) -> Result<()> {
        let closes = matches!(op, WriteOp::Close);
        match self.shared.queue.send(op, None, closes) {
            Sent::Queued | Sent::Slow => Ok(()),
            Sent::Inline(_) => unreachable!("only commits are applied inline"),
            Sent::Refused(_) => Err(Error::WriterClosed),
        }
    }

    /// Queues a commit whose `release` runs after it is durable, or applies it at once on
    /// this thread when the writer is idle: `release` may then run before this returns. If
    /// the writer has stopped, `release` runs at once with `storage.writer_closed`. An actor
    /// passes its instance's `poison`, so the commit is refused if an earlier one of the
    /// instance failed, and says whether it is `alone` (no other actor has a call in
    /// progress, and no call waits for this actor behind this one: under `full` only such a
    /// commit may be applied here, see `queue.rs`).
    pub fn commit(
        &self,
        actor_id: Arc<str>,
        writes: Option<Box<Writes>>,
        poison: Option<Arc<Poison>>,
        release: Release,
        alone: bool,
    ) {
        let writes = writes.filter(|writes| !writes.is_empty());
        let sender = Sender {
            actor: &actor_id,
            alone,
        };
        let sent = self.shared.queue.send(
            WriteOp::Commit {
                actor_id: actor_id.clone(),
                writes,
                poison,
                release,
            },
            Some(sender),
            false,
        );
        match sent {
            Sent::Queued => {}
            Sent::Slow => {
                self.shared.stats.slow.fetch_add(1, Ordering::Relaxed);
            }
            Sent::Inline(op) => self.shared.apply_inline(op),
            Sent::Refused(op) => refuse(op),
        }
    }

    /// Deletes an actor's row, KV and schedules; resolves once durable.
    pub async fn delete_actor(&self, actor_id: Arc<str>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let release: Release = Box::new(move |result| {
            // The caller may have stopped waiting.
            let _ = tx.send(result);
        });
        if let Sent::Refused(op) =
            self.shared
                .queue
                .send(WriteOp::DeleteActor { actor_id, release }, None, false)
        {
            refuse(op);
        }
        rx.await.map_err(|_| Error::WriterClosed)?
    }

    /// The queue, for tests of when commits skip it.
    #[cfg(test)]
    pub(crate) fn shared_queue(&self) -> &WriteQueue<WriteOp> {
        &self.shared.queue
    }

    /// Runs `f` on the writer's own connection, between batches (the writer idle).
    #[cfg(test)]
    pub(crate) fn with_writer_conn<T>(&self, f: impl FnOnce(&rusqlite::Connection) -> T) -> T {
        self.shared.queue.wait_idle();
        let core = self.shared.core.lock();
        f(&core.as_ref().expect("the writer is open").conn)
    }

    /// Resolves once everything queued before it is durable.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.commit(
            Arc::from(""),
            None,
            None,
            Box::new(move |result| {
                // The flusher may have stopped waiting; nobody else needs the result.
                let _ = tx.send(result);
            }),
            false,
        );
        rx.await.map_err(|_| Error::WriterClosed)?
    }

    /// Inserts (or finds) an actor row; resolves once it is durable.
    pub async fn create_actor(
        &self,
        record: ActorRecord,
        input: Option<Payload>,
        mode: CreateMode,
    ) -> Result<(ActorRecord, bool)> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::CreateActor {
            record,
            input,
            mode,
            reply,
        })?;
        rx.await.map_err(|_| Error::WriterClosed)?
    }
}

/// Releases an op the writer refused, with `storage.writer_closed`.
fn refuse(op: WriteOp) {
    match op {
        WriteOp::Commit { release, .. } | WriteOp::DeleteActor { release, .. } => {
            release(Err(Error::WriterClosed))
        }
        // Dropping the reply tells its waiter the writer is closed.
        WriteOp::CreateActor { .. } | WriteOp::Close => {}
    }
}

impl Shared {
    /// Applies `op` on the calling thread as a batch of one, holding the queue's right to
    /// apply (which [`WriteQueue::send`] just gave this caller).
    fn apply_inline(&self, op: WriteOp) {
        let started = Instant::now();
        let mut batch = vec![op];
        let mut core = self.core.lock();
        let Some(writer) = core.as_mut() else {
            // Unreachable while the right to apply is held: the thread closes the connection
            // only after taking `Close`, which it cannot take before this caller finishes.
            drop(core);
            batch.drain(..).for_each(refuse);
            self.queue.finish(started);
            return;
        };
        // Counted first: the release, which runs within `apply`, may be what a reader of the
        // count waited for.
        writer.stats.inline.fetch_add(1, Ordering::Relaxed);
        if writer.apply(&mut batch) {
            drop(core);
            self.queue.finish(started);
        } else {
            tracing::debug!("storage writer stopped by an injected crash");
            // Dropped, not closed, as a crashed process would leave it.
            core.take();
            drop(core);
            // Whatever is still queued is dropped unreleased, as after a real crash.
            drop(self.queue.stop());
        }
    }
}

/// The writer thread's loop: take a batch, apply, commit, release; until `Close`, every
/// handle is gone, or an injected crash.
fn run(shared: &Shared) {
    let mut batch = Vec::new();
    while shared
        .queue
        .take(&mut batch, MAX_BATCH_OPS, |op| matches!(op, WriteOp::Close))
    {
        let started = Instant::now();
        let closing = matches!(batch.last(), Some(WriteOp::Close));
        if closing {
            batch.pop();
        }
        let mut core = shared.core.lock();
        let Some(writer) = core.as_mut() else {
            // An inline sender crashed the writer: dropped unreleased, and `take` now ends
            // the loop.
            batch.clear();
            continue;
        };
        if !writer.apply(&mut batch) {
            tracing::debug!("storage writer stopped by an injected crash");
            core.take();
            drop(core);
            // Whatever is still queued is dropped unreleased: as after a real crash, its
            // callers are never acknowledged.
            drop(shared.queue.stop());
            return;
        }
        drop(core);
        if closing {
            break;
        }
        shared.queue.finish(started);
    }
    // Sends are refused from here on; nothing can be queued behind `Close`.
    drop(shared.queue.stop());
    let writer = shared.core.lock().take();
    if let Some(writer) = writer {
        if let Err((_, err)) = writer.conn.close() {
            tracing::warn!(error = %err, "closing the writer connection failed");
        }
    }
    tracing::debug!("storage writer stopped");
}

/// The writer thread's state: its connection, the store to reopen it from, the faults, and
/// the damage checks every commit goes through.
struct WriterThread {
    conn: Connection,
    store: Arc<Store>,
    faults: Option<Arc<FaultState>>,
    stats: Arc<WriterStats>,
    integrity: Arc<Integrity>,
}

/// Why a batch did not commit.
enum Refused {
    /// SQLite (or an injected fault) refused it; every op is released with the error.
    Failed(Error),
    /// `COMMIT` itself failed, so some of the batch's frames may already be in the WAL,
    /// beyond its last valid commit; every op is released with the error.
    CommitFailed(Error),
    /// A crash was injected: nothing is released and the writer stops.
    Crashed,
}

impl From<rusqlite::Error> for Refused {
    fn from(err: rusqlite::Error) -> Self {
        Refused::Failed(Error::Storage(err))
    }
}

impl From<Error> for Refused {
    fn from(err: Error) -> Self {
        Refused::Failed(err)
    }
}

impl WriterThread {
    /// Applies one batch and releases its ops. Returns `false` after an injected crash.
    fn apply(&mut self, batch: &mut Vec<WriteOp>) -> bool {
        let count = batch.len() as u64;
        self.answer_existing_keys(batch);
        if batch.is_empty() {
            self.stats.ops.fetch_add(count, Ordering::Relaxed);
            return true;
        }
        let writes = batch.iter().any(|op| match op {
            WriteOp::CreateActor { .. } | WriteOp::DeleteActor { .. } => true,
            WriteOp::Commit { writes, poison, .. } => {
                writes.is_some() && !poison.as_ref().is_some_and(|poison| poison.is_set())
            }
            WriteOp::Close => false,
        });
        let mut outcomes = Vec::with_capacity(batch.len());
        let started = std::time::Instant::now();
        let result = if writes {
            self.write_batch(batch.drain(..), &mut outcomes)
                .map_err(|refused| match refused {
                    Refused::Failed(err) => Refused::Failed(self.integrity.observe(err)),
                    Refused::CommitFailed(err) => {
                        Refused::CommitFailed(self.integrity.observe(err))
                    }
                    Refused::Crashed => Refused::Crashed,
                })
        } else {
            outcomes.extend(batch.drain(..).map(|op| match op {
                WriteOp::Commit {
                    poison, release, ..
                } => Outcome::Release(release, refusal(&poison).map_or(Ok(None), Err)),
                WriteOp::CreateActor { .. } | WriteOp::DeleteActor { .. } | WriteOp::Close => {
                    unreachable!("a batch without writes holds only commits")
                }
            }));
            Ok(())
        };
        let result = match result {
            Ok(()) => Ok(()),
            Err(Refused::Crashed) => return false,
            Err(Refused::Failed(err)) => Err(err),
            Err(Refused::CommitFailed(err)) => {
                self.restore_connection();
                if !self.fence() {
                    return false;
                }
                Err(err)
            }
        };
        if writes && result.is_ok() {
            self.stats.transactions.fetch_add(1, Ordering::Relaxed);
            self.stats.commit_seconds.observe(started.elapsed());
        }
        self.stats.ops.fetch_add(count, Ordering::Relaxed);
        if let Err(err) = &result {
            tracing::error!(error = %err, ops = count, "commit failed; the batch's outputs get an error");
            self.restore_connection();
        }
        for outcome in outcomes {
            match outcome {
                Outcome::Created(reply, created) => {
                    let value = match &result {
                        Ok(()) => created,
                        Err(err) => Err(err.duplicate()),
                    };
                    // The caller may have given up waiting; the row is written either way.
                    let _ = reply.send(value);
                }
                Outcome::Release(release, own) => release(match (&result, own) {
                    // Refused because its instance was already poisoned.
                    (_, Err(err)) => Err(err),
                    (Ok(()), Ok(_)) => Ok(()),
                    (Err(err), Ok(wrote)) => {
                        // Its instance ran on top of writes that are now lost: the writer
                        // refuses the instance's later commits until it is replaced. This
                        // happens before the next batch, so none of them slips through.
                        if let Some(poison) = wrote {
                            poison.set(err);
                        }
                        Err(err.duplicate())
                    }
                }),
            }
        }
        true
    }

    /// Answers the creations whose key already has a row, outside any transaction: that row
    /// is committed (this thread is the only writer), so its caller waits for no commit and
    /// no sync. Skipped while the connection is not in autocommit (a batch failed and could
    /// not be rolled back), once damage has been seen (the transaction refuses the batch with
    /// `storage.corrupt`, as every read is refused), and for a batch that deletes an actor,
    /// whose row must not be handed out before the delete. A lookup that fails leaves its op
    /// to the transaction, which reports the error as it always did.
    fn answer_existing_keys(&mut self, batch: &mut Vec<WriteOp>) {
        let creates = batch
            .iter()
            .any(|op| matches!(op, WriteOp::CreateActor { .. }));
        let deletes = batch
            .iter()
            .any(|op| matches!(op, WriteOp::DeleteActor { .. }));
        if !creates || deletes || !self.conn.is_autocommit() || self.integrity.check().is_err() {
            return;
        }
        let conn = &self.conn;
        let mut kept = Vec::with_capacity(batch.len());
        for op in batch.drain(..) {
            let WriteOp::CreateActor {
                record,
                input,
                mode,
                reply,
            } = op
            else {
                kept.push(op);
                continue;
            };
            match crate::storage::store::actor_id_by_key(conn, &record.name, &record.key) {
                Ok(Some(id)) => {
                    // The caller may have given up waiting; nothing was written for it.
                    let _ = reply.send(mode.answer_existing(ActorRecord { id, ..record }));
                }
                Ok(None) | Err(_) => kept.push(WriteOp::CreateActor {
                    record,
                    input,
                    mode,
                    reply,
                }),
            }
        }
        *batch = kept;
    }

    /// Makes a failed `COMMIT` definitely failed, before its callers hear so. When the
    /// commit failed after writing frames to the WAL (its sync failed, say), those frames
    /// stay in the file past the last valid commit, and a crash before the next commit would
    /// let recovery find them: the refused change would come back. Committing an empty
    /// transaction at once overwrites them, which breaks the WAL's checksum chain, so
    /// recovery stops before them. If this commit fails too, the refused change stays
    /// possible after a crash; that is logged. Returns `false` after an injected crash.
    fn fence(&mut self) -> bool {
        let faults = self.faults.clone();
        let fenced = (|| -> rusqlite::Result<i64> {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let seq = crate::storage::integrity::next_commit_seq(&tx)?;
            tx.commit()?;
            Ok(seq)
        })();
        if faults.as_deref().is_some_and(FaultState::has_crashed) {
            return false;
        }
        match fenced {
            Ok(seq) => self.integrity.record(seq),
            Err(err) => {
                tracing::error!(error = %err, "committing after a failed commit failed too; after a crash the failed commit may be found on disk");
                self.restore_connection();
            }
        }
        true
    }

    /// Leaves the connection usable after a failed batch: rolled back, or else reopened.
    fn restore_connection(&mut self) {
        if self.conn.is_autocommit() {
            return;
        }
        match self.conn.execute_batch("ROLLBACK") {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(error = %err, "rolling back the failed commit failed; reopening the writer connection")
            }
        }
        match self.store.connect(true) {
            Ok(conn) => self.conn = conn,
            Err(err) => {
                tracing::error!(error = %err, "reopening the writer connection failed; the next commit tries again")
            }
        }
    }

    fn write_batch(
        &mut self,
        ops: impl Iterator<Item = WriteOp>,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<(), Refused> {
        let faults = self.faults.as_deref();
        let integrity = &self.integrity;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for op in ops {
            match op {
                WriteOp::CreateActor {
                    record,
                    input,
                    mode,
                    reply,
                } => {
                    let created = create_actor(&tx, record, input, mode)
                        .map_err(|err| integrity.observe(err));
                    outcomes.push(Outcome::Created(reply, created));
                }
                WriteOp::Commit {
                    actor_id,
                    writes,
                    poison,
                    release,
                } => {
                    if let Some(err) = refusal(&poison) {
                        outcomes.push(Outcome::Release(release, Err(err)));
                        continue;
                    }
                    let wrote = match writes {
                        Some(writes) => {
                            apply_writes(&tx, &actor_id, *writes)?;
                            poison
                        }
                        None => None,
                    };
                    outcomes.push(Outcome::Release(release, Ok(wrote)));
                }
                WriteOp::DeleteActor { actor_id, release } => {
                    for sql in [
                        "DELETE FROM kv WHERE actor_id = ?1",
                        "DELETE FROM schedules WHERE actor_id = ?1",
                        "DELETE FROM conns WHERE actor_id = ?1",
                        "DELETE FROM db_log WHERE actor_id = ?1",
                        "DELETE FROM actors WHERE id = ?1",
                    ] {
                        tx.prepare_cached(sql)?.execute([&*actor_id])?;
                    }
                    outcomes.push(Outcome::Release(release, Ok(None)));
                }
                WriteOp::Close => unreachable!("the loop keeps close out of batches"),
            }
        }
        // Nothing more is committed once damage has been seen; the counter and its record let
        // the next open notice commits that the log lost (see `integrity.rs`).
        integrity.check()?;
        let seq = integrity.count_commit(&tx)?;
        match check(faults, Failpoint::BeforeWalWrite) {
            Fault::Continue => {}
            Fault::Fail => return Err(Refused::Failed(faults::injected_full())),
            Fault::Crash => return Err(Refused::Crashed),
        }
        let committed = tx.commit();
        // A crash injected inside SQLite's commit (at the WAL sync) surfaces as its error.
        if faults.is_some_and(FaultState::has_crashed) {
            return Err(Refused::Crashed);
        }
        committed.map_err(|err| Refused::CommitFailed(Error::Storage(err)))?;
        if let Some(seq) = seq {
            integrity.record(seq);
        }
        if check(faults, Failpoint::AfterCommitBeforeReply) == Fault::Crash {
            return Err(Refused::Crashed);
        }
        Ok(())
    }
}

/// Asks the faults, if any, what to do at `point`.
fn check(faults: Option<&FaultState>, point: Failpoint) -> Fault {
    match faults {
        Some(faults) => faults.check(point),
        None => Fault::Continue,
    }
}

/// The error a commit of a poisoned instance is refused with, if it is poisoned.
fn refusal(poison: &Option<Arc<Poison>>) -> Option<Error> {
    poison.as_ref().and_then(|poison| poison.refusal())
}

/// What one op in a batch produced, held until the commit decides its fate.
enum Outcome {
    Created(
        oneshot::Sender<Result<(ActorRecord, bool)>>,
        Result<(ActorRecord, bool)>,
    ),
    /// A commit or delete: `Ok` with the poison mark of the instance whose writes it applied,
    /// or `Err` if it was refused (poisoned already) and must not be applied.
    Release(Release, Result<Option<Arc<Poison>>>),
}

fn apply_writes(tx: &rusqlite::Transaction<'_>, actor_id: &str, writes: Writes) -> Result<()> {
    if let Some(state) = writes.state {
        tx.prepare_cached(
            "UPDATE actors SET state = ?2, input = NULL, input_encoding = NULL WHERE id = ?1",
        )?
        .execute((actor_id, state))?;
    }
    for write in writes.kv {
        match write {
            KvWrite::Put { key, value } => tx
                .prepare_cached(
                    "INSERT INTO kv (actor_id, key, value) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (actor_id, key) DO UPDATE SET value = excluded.value",
                )?
                .execute((actor_id, key, value))?,
            KvWrite::Delete { key } => tx
                .prepare_cached("DELETE FROM kv WHERE actor_id = ?1 AND key = ?2")?
                .execute((actor_id, key))?,
        };
    }
    for op in writes.schedules {
        match op {
            ScheduleWrite::Add(schedule) => tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO schedules (id, actor_id, at_ms, action, args, attempts) \
                     VALUES (?1, ?2, ?3, ?4, ?5, 0)",
                )?
                .execute((
                    &schedule.id,
                    actor_id,
                    schedule.at_ms,
                    &schedule.action,
                    &schedule.args,
                ))?,
            ScheduleWrite::Cancel { id } => tx
                .prepare_cached("DELETE FROM schedules WHERE id = ?1 AND actor_id = ?2")?
                .execute((id, actor_id))?,
        };
    }
    match writes.settle {
        Some((id, Settle::Done)) => {
            tx.prepare_cached("DELETE FROM schedules WHERE id = ?1")?
                .execute([id])?;
        }
        Some((id, Settle::Retry { at_ms, attempts })) => {
            tx.prepare_cached("UPDATE schedules SET at_ms = ?2, attempts = ?3 WHERE id = ?1")?
                .execute((id, at_ms, attempts))?;
        }
        None => {}
    }
    for write in writes.conns {
        match write {
            ConnWrite::Open(conn) => tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO conns (actor_id, id, token, encoding, params, state) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute((
                    actor_id,
                    &conn.id,
                    &conn.token,
                    conn.encoding.as_str(),
                    &conn.params,
                    &conn.state,
                ))?,
            ConnWrite::State { id, state } => tx
                .prepare_cached("UPDATE conns SET state = ?3 WHERE actor_id = ?1 AND id = ?2")?
                .execute((actor_id, id, state))?,
            ConnWrite::Close { id } => tx
                .prepare_cached("DELETE FROM conns WHERE actor_id = ?1 AND id = ?2")?
                .execute((actor_id, id))?,
        };
    }
    if let Some(change) = writes.db {
        apply_db_change(tx, actor_id, change)?;
    }
    Ok(())
}

/// Logs one call's change to its actor's SQL database, and drops the entries the actor's
/// database holds durably (see `actor_db.rs`).
fn apply_db_change(tx: &rusqlite::Transaction<'_>, actor_id: &str, change: DbChange) -> Result<()> {
    tx.prepare_cached("INSERT INTO db_log (actor_id, seq, changeset) VALUES (?1, ?2, ?3)")?
        .execute((actor_id, change.seq as i64, change.changeset))?;
    tx.prepare_cached("DELETE FROM db_log WHERE actor_id = ?1 AND seq < ?2")?
        .execute((actor_id, change.trim_below as i64))?;
    Ok(())
}

fn create_actor(
    tx: &rusqlite::Transaction<'_>,
    record: ActorRecord,
    input: Option<Payload>,
    mode: CreateMode,
) -> Result<(ActorRecord, bool)> {
    let existing = crate::storage::store::actor_id_by_key(tx, &record.name, &record.key)?;
    if let Some(id) = existing {
        return mode.answer_existing(ActorRecord { id, ..record });
    }
    let (input, encoding) = match input {
        Some(payload) => (Some(payload.bytes), Some(payload.encoding.as_str())),
        None => (None, None),
    };
    tx.prepare_cached(
        "INSERT INTO actors (id, name, key, created_at, input, input_encoding) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute((
        &record.id,
        &record.name,
        &record.key,
        now_ms(),
        input,
        encoding,
    ))?;
    Ok((record, true))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
