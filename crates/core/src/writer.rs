//! The group-commit writer: the one thread that writes to the database.
//!
//! Every durable change (a new actor, an actor's new state) and every output that must wait
//! for durability (an action's reply) is sent here as a [`WriteOp`]. The thread takes
//! everything queued, applies it in arrival order inside one transaction, commits, and only
//! then runs each op's release callback. That is both the group commit (many actors' writes
//! share one fsync) and the output gate (no reply leaves before the state it observed is on
//! disk). Ops that write nothing still wait for every earlier op's commit, so replies from
//! one actor leave in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::host::{KvWrite, Payload, ScheduleOp};
use crate::integrity::Integrity;
use crate::store::{ActorRecord, Store};

/// The most ops one transaction takes; a longer queue is split over several commits.
const MAX_BATCH_OPS: usize = 4096;

/// Called once the op's batch has committed (or failed to).
pub type Release = Box<dyn FnOnce(Result<()>) + Send>;

/// How a new actor row is inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// Fail with `actor.already_exists` if the key is taken.
    Create,
    /// Return the existing row if the key is taken.
    GetOrCreate,
}

/// What happens to a schedule after one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// It ran (or gave up): delete it.
    Done,
    /// It failed: run it again at `at_ms`, counting the failure.
    Retry {
        /// When to run it again, in epoch milliseconds.
        at_ms: i64,
        /// Failures so far, this one included.
        attempts: u32,
    },
}

/// Everything one commit writes for one actor.
#[derive(Debug, Default)]
pub struct Writes {
    /// The actor's new state.
    pub state: Option<Vec<u8>>,
    /// Key-value writes, in order.
    pub kv: Vec<KvWrite>,
    /// Schedule changes, in order.
    pub schedules: Vec<ScheduleOp>,
    /// The outcome of the schedule whose run produced this commit.
    pub settle: Option<(String, Settle)>,
}

impl Writes {
    fn is_empty(&self) -> bool {
        self.state.is_none()
            && self.kv.is_empty()
            && self.schedules.is_empty()
            && self.settle.is_none()
    }
}

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

/// Counters the writer keeps, for tests and metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub transactions: AtomicU64,
    /// Ops applied.
    pub ops: AtomicU64,
    /// How long each committed transaction took, fsync included.
    pub commit_seconds: crate::metrics::Histogram<crate::metrics::CommitBuckets>,
}

/// The sending side of the writer. Cloneable; the thread stops once every handle is dropped
/// and the queue is empty.
#[derive(Clone)]
pub struct WriterHandle {
    /// Unbounded on purpose: each actor has at most one action running at a time and bounded
    /// mailboxes, so the queue is bounded by the work already admitted; blocking an actor on
    /// the writer would only move the queue elsewhere.
    tx: mpsc::UnboundedSender<WriteOp>,
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
    /// Starts the writer thread over a new writer connection to `store`. Must be called
    /// within a tokio runtime.
    pub fn start(store: &Store) -> Result<Writer> {
        let conn = store.connect(true)?;
        let integrity = store.integrity();
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let span = tracing::Span::current();
        let thread = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            run(conn, rx, &thread_stats, &integrity);
        });
        Ok(Writer {
            handle: Some(WriterHandle { tx }),
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
        self.tx.send(op).map_err(|_| Error::WriterClosed)
    }

    /// Queues a commit whose `release` runs after it is durable. If the writer has stopped,
    /// `release` runs at once with `storage.writer_closed`.
    pub fn commit(&self, actor_id: Arc<str>, writes: Option<Box<Writes>>, release: Release) {
        let writes = writes.filter(|writes| !writes.is_empty());
        let op = WriteOp::Commit {
            actor_id,
            writes,
            release,
        };
        if let Err(mpsc::error::SendError(WriteOp::Commit { release, .. })) = self.tx.send(op) {
            release(Err(Error::WriterClosed));
        }
    }

    /// Deletes an actor's row, KV and schedules; resolves once durable.
    pub async fn delete_actor(&self, actor_id: Arc<str>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let release: Release = Box::new(move |result| {
            // The caller may have stopped waiting.
            let _ = tx.send(result);
        });
        if let Err(mpsc::error::SendError(WriteOp::DeleteActor { release, .. })) =
            self.tx.send(WriteOp::DeleteActor { actor_id, release })
        {
            release(Err(Error::WriterClosed));
        }
        rx.await.map_err(|_| Error::WriterClosed)?
    }

    /// Resolves once everything queued before it is durable.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.commit(
            Arc::from(""),
            None,
            Box::new(move |result| {
                // The flusher may have stopped waiting; nobody else needs the result.
                let _ = tx.send(result);
            }),
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

/// The writer thread's loop: batch, apply, commit, release.
fn run(
    mut conn: Connection,
    mut rx: mpsc::UnboundedReceiver<WriteOp>,
    stats: &WriterStats,
    integrity: &Integrity,
) {
    let mut batch = Vec::new();
    let mut closing = false;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(op) = next.take() {
            match op {
                WriteOp::Close => closing = true,
                op => batch.push(op),
            }
            if closing || batch.len() >= MAX_BATCH_OPS {
                break;
            }
            next = rx.try_recv().ok();
        }
        apply(&mut conn, &mut batch, stats, integrity);
        if closing {
            break;
        }
    }
    drop(rx);
    if let Err((_, err)) = conn.close() {
        tracing::warn!(error = %err, "closing the writer connection failed");
    }
    tracing::debug!("storage writer stopped");
}

/// What one op in a batch produced, held until the commit decides its fate.
enum Outcome {
    Created(
        oneshot::Sender<Result<(ActorRecord, bool)>>,
        Result<(ActorRecord, bool)>,
    ),
    Release(Release),
}

fn apply(
    conn: &mut Connection,
    batch: &mut Vec<WriteOp>,
    stats: &WriterStats,
    integrity: &Integrity,
) {
    let count = batch.len() as u64;
    let writes = batch.iter().any(|op| match op {
        WriteOp::CreateActor { .. } | WriteOp::DeleteActor { .. } => true,
        WriteOp::Commit { writes, .. } => writes.is_some(),
        WriteOp::Close => false,
    });
    let mut outcomes = Vec::with_capacity(batch.len());
    let started = std::time::Instant::now();
    let result = if writes {
        write_batch(conn, batch.drain(..), &mut outcomes, integrity)
            .map_err(|err| integrity.observe(err))
    } else {
        outcomes.extend(batch.drain(..).map(|op| match op {
            WriteOp::Commit { release, .. } => Outcome::Release(release),
            WriteOp::CreateActor { .. } | WriteOp::DeleteActor { .. } | WriteOp::Close => {
                unreachable!("a batch without writes holds only commits")
            }
        }));
        Ok(())
    };
    if writes && result.is_ok() {
        stats.transactions.fetch_add(1, Ordering::Relaxed);
        stats.commit_seconds.observe(started.elapsed());
    }
    stats.ops.fetch_add(count, Ordering::Relaxed);
    if let Err(err) = &result {
        tracing::error!(error = %err, ops = count, "commit failed; the batch's outputs get an error");
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
            Outcome::Release(release) => release(match &result {
                Ok(()) => Ok(()),
                Err(err) => Err(err.duplicate()),
            }),
        }
    }
}

fn write_batch(
    conn: &mut Connection,
    ops: impl Iterator<Item = WriteOp>,
    outcomes: &mut Vec<Outcome>,
    integrity: &Integrity,
) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for op in ops {
        match op {
            WriteOp::CreateActor {
                record,
                input,
                mode,
                reply,
            } => {
                let created =
                    create_actor(&tx, record, input, mode).map_err(|err| integrity.observe(err));
                outcomes.push(Outcome::Created(reply, created));
            }
            WriteOp::Commit {
                actor_id,
                writes,
                release,
            } => {
                if let Some(writes) = writes {
                    apply_writes(&tx, &actor_id, *writes)?;
                }
                outcomes.push(Outcome::Release(release));
            }
            WriteOp::DeleteActor { actor_id, release } => {
                for sql in [
                    "DELETE FROM kv WHERE actor_id = ?1",
                    "DELETE FROM schedules WHERE actor_id = ?1",
                    "DELETE FROM actors WHERE id = ?1",
                ] {
                    tx.prepare_cached(sql)?.execute([&*actor_id])?;
                }
                outcomes.push(Outcome::Release(release));
            }
            WriteOp::Close => unreachable!("the loop keeps close out of batches"),
        }
    }
    // Nothing more is committed once damage has been seen; the counter and its record let
    // the next open notice commits that the log lost (see `integrity.rs`).
    integrity.check()?;
    let seq = crate::integrity::next_commit_seq(&tx)?;
    tx.commit()?;
    integrity.record(seq);
    Ok(())
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
            ScheduleOp::Add(schedule) => tx
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
            ScheduleOp::Cancel { id } => tx
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
    Ok(())
}

fn create_actor(
    tx: &rusqlite::Transaction<'_>,
    record: ActorRecord,
    input: Option<Payload>,
    mode: CreateMode,
) -> Result<(ActorRecord, bool)> {
    let existing = crate::store::actor_id_by_key(tx, &record.name, &record.key)?;
    if let Some(id) = existing {
        return match mode {
            CreateMode::Create => Err(Error::ActorAlreadyExists),
            CreateMode::GetOrCreate => Ok((ActorRecord { id, ..record }, false)),
        };
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
