//! The group-commit writer: the one thread that writes to the database.
//!
//! Every durable change (a new actor, an actor's new state) and every output that must wait
//! for durability (an action's reply) is sent here as a [`WriteOp`]. The thread takes
//! everything queued, applies it in arrival order inside one transaction, commits, and only
//! then runs each op's release callback. That is both the group commit (many actors' writes
//! share one fsync) and the output gate (no reply leaves before the state it observed is on
//! disk). Ops that write nothing still wait for every earlier op's commit, so replies from
//! one actor leave in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use rusqlite::{Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
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

/// One unit of work for the writer.
pub enum WriteOp {
    /// Inserts an actor row (or finds the existing one) and replies once durable.
    CreateActor {
        record: ActorRecord,
        input: Option<String>,
        mode: CreateMode,
        /// Receives the row that holds the key, and whether this op created it.
        reply: oneshot::Sender<Result<(ActorRecord, bool)>>,
    },
    /// Stores an actor's new state (if any), then releases the output that waited on it.
    Commit {
        actor_id: Arc<str>,
        state: Option<Vec<u8>>,
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
}

/// The sending side of the writer. Cloneable; the thread stops once every handle is dropped
/// and the queue is empty.
#[derive(Clone)]
pub struct WriterHandle {
    /// Unbounded on purpose: each actor has at most one action running at a time and bounded
    /// mailboxes, so the queue is bounded by the work already admitted; blocking an actor on
    /// the writer would only move the queue elsewhere.
    tx: mpsc::UnboundedSender<WriteOp>,
    stats: Arc<WriterStats>,
}

/// Owns the writer thread; `join` waits for it to finish what was queued.
pub struct Writer {
    handle: Option<WriterHandle>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<WriterStats>,
}

impl Writer {
    /// Starts the writer thread over a new writer connection to `store`.
    pub fn start(store: &Store) -> Result<Writer> {
        let conn = store.connect(true)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("keel-writer".into())
            .spawn(move || {
                let _entered = span.enter();
                run(conn, rx, &thread_stats);
            })
            .map_err(|e| Error::io("spawning the writer thread", e))?;
        Ok(Writer {
            handle: Some(WriterHandle {
                tx,
                stats: stats.clone(),
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
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
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
    pub fn commit(&self, actor_id: Arc<str>, state: Option<Vec<u8>>, release: Release) {
        let op = WriteOp::Commit {
            actor_id,
            state,
            release,
        };
        if let Err(mpsc::error::SendError(WriteOp::Commit { release, .. })) = self.tx.send(op) {
            release(Err(Error::WriterClosed));
        }
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
        input: Option<String>,
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

    /// The writer's counters.
    pub fn stats(&self) -> &Arc<WriterStats> {
        &self.stats
    }
}

/// The writer thread's loop: batch, apply, commit, release.
fn run(mut conn: Connection, mut rx: mpsc::UnboundedReceiver<WriteOp>, stats: &WriterStats) {
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
        apply(&mut conn, &mut batch, stats);
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

fn apply(conn: &mut Connection, batch: &mut Vec<WriteOp>, stats: &WriterStats) {
    let count = batch.len() as u64;
    let writes = batch.iter().any(|op| match op {
        WriteOp::CreateActor { .. } => true,
        WriteOp::Commit { state, .. } => state.is_some(),
        WriteOp::Close => false,
    });
    let mut outcomes = Vec::with_capacity(batch.len());
    let result = if writes {
        write_batch(conn, batch.drain(..), &mut outcomes)
    } else {
        outcomes.extend(batch.drain(..).map(|op| match op {
            WriteOp::Commit { release, .. } => Outcome::Release(release),
            WriteOp::CreateActor { .. } | WriteOp::Close => {
                unreachable!("a batch without writes holds only commits")
            }
        }));
        Ok(())
    };
    if writes && result.is_ok() {
        stats.transactions.fetch_add(1, Ordering::Relaxed);
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
) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Only an actor's last state in the batch needs writing.
    let mut states: HashMap<Arc<str>, Vec<u8>> = HashMap::new();
    for op in ops {
        match op {
            WriteOp::CreateActor {
                record,
                input,
                mode,
                reply,
            } => {
                let created = create_actor(&tx, record, input, mode);
                outcomes.push(Outcome::Created(reply, created));
            }
            WriteOp::Commit {
                actor_id,
                state,
                release,
            } => {
                if let Some(state) = state {
                    states.insert(actor_id, state);
                }
                outcomes.push(Outcome::Release(release));
            }
            WriteOp::Close => unreachable!("the loop keeps close out of batches"),
        }
    }
    {
        let mut update =
            tx.prepare_cached("UPDATE actors SET state = ?2, input = NULL WHERE id = ?1")?;
        for (id, state) in &states {
            update.execute((&**id, state))?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn create_actor(
    tx: &rusqlite::Transaction<'_>,
    record: ActorRecord,
    input: Option<String>,
    mode: CreateMode,
) -> Result<(ActorRecord, bool)> {
    let existing: Option<String> = tx
        .prepare_cached("SELECT id FROM actors WHERE name = ?1 AND key = ?2")?
        .query_row((&record.name, &record.key), |row| row.get(0))
        .optional()?;
    if let Some(id) = existing {
        return match mode {
            CreateMode::Create => Err(Error::ActorAlreadyExists),
            CreateMode::GetOrCreate => Ok((ActorRecord { id, ..record }, false)),
        };
    }
    tx.prepare_cached(
        "INSERT INTO actors (id, name, key, created_at, input) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute((&record.id, &record.name, &record.key, now_ms(), &input))?;
    Ok((record, true))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
