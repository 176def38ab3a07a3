//! One actor's durable data in the engine: its schema, its snapshot, and its group commit.
//!
//! Each engine actor has its own SQLite database in the engine, reached only through the
//! generation-fenced remote SQLite requests (see `remote.rs`); the engine's KV requests are not
//! fenced, so nothing durable goes there. The schema mirrors what keel-core's `store.rs` keeps
//! per actor, so one actor model maps one to one: `keel_actor` (one row: identity, creation
//! input, state and its encoding), `keel_kv`, `keel_schedules`, `keel_conns` (the durable
//! connections of a type with hibernatable connections: their token, params and `conn.state`,
//! written in the batch of the call that admitted, changed or closed them), `keel_sockets`
//! (where the gateway holds the sockets of those connections, so an activation in another
//! process can tell it which ones it cannot restore), and `keel_schema` (the version, for
//! forward migrations).
//!
//! What must stay true:
//! - One commit is one atomic batch, or part of one: its writes land together or not at all.
//! - At most one batch per actor instance is in flight. Commits queued behind it coalesce into
//!   the next batch (group commit per actor), in the order they were queued.
//! - A commit's release runs only after the batch holding it was acknowledged (or failed), and
//!   releases run in commit order.
//! - After a failed batch the store refuses every later commit with that batch's error: those
//!   commits were computed on top of writes that may not have landed. The owner recovers by
//!   opening a new store (which loads what is committed), or stops if it was fenced off.
//! - The engine's alarm of the actor is the earliest due time of its stored schedules, or none:
//!   set when the store opens (from what it loaded) and after each acknowledged batch that
//!   changed the schedules (from a read in that same batch), before the batch's releases run.
//!   So a sleeping actor is started again when its next schedule falls due, and the last alarm
//!   of an activation reaches the engine before its stop does. While no batch has changed an
//!   actor's schedules since its first start (`keel_no_alarm` holds its row), the engine holds
//!   no alarm keel set for it, and its starts send none: most actors never schedule, and each
//!   alarm is an event the engine processes.

use std::time::{Duration, Instant};

use keel_core::store::{ActorSnapshot, StoredConn, StoredSchedule};
use keel_core::writer::{ConnWrite, Release, Settle, Writes};
use keel_core::{Encoding, Error, KvWrite, Payload, Result, Schedule, ScheduleWrite};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::remote::Remote;
use crate::sql::{damage, Rows, Statement, Value};

/// The schema version this build writes; a newer one is `storage.too_new`.
pub const SCHEMA_VERSION: i64 = 1;

/// The most statements one coalesced batch carries. A single commit larger than this still
/// goes as one batch: a commit is never split.
const MAX_BATCH_STATEMENTS: usize = 1024;

/// The most bytes (roughly, as sent) one coalesced batch carries; the engine answers frames
/// up to 20 MiB, and smaller batches keep one slow commit from holding many replies.
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Creates the schema if absent; every statement is idempotent, so this runs on every start.
const CREATE_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS keel_schema (version INTEGER NOT NULL) STRICT",
    "INSERT INTO keel_schema (version) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM keel_schema)",
    "CREATE TABLE IF NOT EXISTS keel_actor (
        id              INTEGER PRIMARY KEY CHECK (id = 1),
        name            TEXT NOT NULL,
        key             TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        input           BLOB,
        input_encoding  TEXT,
        state           BLOB,
        state_encoding  TEXT
    ) STRICT",
    "CREATE TABLE IF NOT EXISTS keel_kv (
        key    BLOB PRIMARY KEY,
        value  BLOB NOT NULL
    ) STRICT, WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS keel_schedules (
        id        TEXT PRIMARY KEY,
        at_ms     INTEGER NOT NULL,
        action    TEXT NOT NULL,
        args      BLOB NOT NULL,
        attempts  INTEGER NOT NULL DEFAULT 0
    ) STRICT",
    "CREATE INDEX IF NOT EXISTS keel_schedules_by_due ON keel_schedules (at_ms, id)",
    // The actor's durable connections (types with hibernatable connections), as keel-core's
    // `conns` table keeps them embedded.
    "CREATE TABLE IF NOT EXISTS keel_conns (
        id        TEXT PRIMARY KEY,
        token     TEXT NOT NULL,
        encoding  TEXT NOT NULL,
        params    BLOB NOT NULL,
        state     BLOB
    ) STRICT, WITHOUT ROWID",
    // The gateway's hibernatable sockets of the actor: the gateway's and the request's ids,
    // and the path and headers (a JSON object) the socket opened with.
    "CREATE TABLE IF NOT EXISTS keel_sockets (
        gateway_id  BLOB NOT NULL,
        request_id  BLOB NOT NULL,
        path        TEXT NOT NULL,
        headers     TEXT NOT NULL,
        PRIMARY KEY (gateway_id, request_id)
    ) STRICT, WITHOUT ROWID",
    // One row from the actor's first start until a batch changes its schedules (the batch
    // deletes it): while it is there the engine holds no alarm keel set for the actor, so a
    // start with no schedules has none to clear. Written only when the actor row is not there
    // yet, so an actor stored before this table existed has no row, and its starts clear.
    "CREATE TABLE IF NOT EXISTS keel_no_alarm (id INTEGER PRIMARY KEY CHECK (id = 1)) STRICT",
    "INSERT INTO keel_no_alarm (id) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM keel_actor)",
    // The actor's SQL database (`c.db`, see `db.rs`): its changes since the image, one per
    // call, in parts, and its image (the whole file, in parts) with the newest change it holds.
    "CREATE TABLE IF NOT EXISTS keel_db_log (
        seq    INTEGER NOT NULL,
        part   INTEGER NOT NULL,
        bytes  BLOB NOT NULL,
        PRIMARY KEY (seq, part)
    ) STRICT, WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS keel_db_image (
        image  INTEGER NOT NULL,
        part   INTEGER NOT NULL,
        bytes  BLOB NOT NULL,
        PRIMARY KEY (image, part)
    ) STRICT, WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS keel_db_head (
        id     INTEGER PRIMARY KEY CHECK (id = 1),
        image  INTEGER NOT NULL,
        seq    INTEGER NOT NULL,
        parts  INTEGER NOT NULL,
        bytes  INTEGER NOT NULL
    ) STRICT",
];

/// Inserts the actor's row on its first start only; later starts keep what is stored.
const INSERT_ACTOR: &str =
    "INSERT INTO keel_actor (id, name, key, created_at, input, input_encoding) \
     VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING";

/// Read at the end of a batch that changed the schedules: what the actor's alarm must be.
const NEXT_DUE: &str = "SELECT MIN(at_ms) FROM keel_schedules";

/// In a batch that changed the schedules, before [`NEXT_DUE`]: the engine may hold an alarm
/// for the actor from then on.
const MAY_HAVE_ALARM: &str = "DELETE FROM keel_no_alarm";

/// The reads of a load, in this order.
const LOAD: &[&str] = &[
    "SELECT version FROM keel_schema",
    "SELECT state, state_encoding, input, input_encoding FROM keel_actor WHERE id = 1",
    "SELECT id, at_ms, action, args, attempts FROM keel_schedules ORDER BY at_ms, id",
    "SELECT id, token, encoding, params, state FROM keel_conns ORDER BY id",
    "SELECT gateway_id, request_id, path, headers FROM keel_sockets",
    "SELECT COUNT(*) FROM keel_no_alarm",
];

/// Who the actor is, written once, on its first start.
#[derive(Debug, Clone)]
pub struct ActorIdentity {
    /// The actor type's name.
    pub name: String,
    /// The canonical key string.
    pub key: String,
    /// When the engine created the actor, in epoch milliseconds.
    pub created_at_ms: i64,
    /// The creation input, kept until the state is first written.
    pub input: Option<Payload>,
}

/// What an actor's start needs: its state and creation input, its pending schedules and its
/// durable connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The last committed state with its encoding; `None` until the state was first written.
    pub state: Option<Payload>,
    /// The creation input, present until the state was first written.
    pub input: Option<Payload>,
    /// Pending schedules, soonest first.
    pub schedules: Vec<StoredSchedule>,
    /// The durable connections (types with hibernatable connections), by id.
    pub conns: Vec<StoredConn>,
    /// The gateway's hibernatable sockets of the actor, as recorded when they opened.
    pub sockets: Vec<StoredSocket>,
    /// Whether no batch has changed the actor's schedules since its first start, so that the
    /// engine holds no alarm keel set for it.
    pub never_alarmed: bool,
}

/// A hibernatable socket of the actor at the engine's gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSocket {
    /// The gateway's id.
    pub gateway_id: [u8; 4],
    /// The socket's request id at that gateway.
    pub request_id: [u8; 4],
    /// The path (and query) the socket opened with.
    pub path: String,
    /// The headers the socket opened with.
    pub headers: std::collections::HashMap<String, String>,
}

impl Snapshot {
    /// keel-core's start snapshot (state, input and connections; schedules go to the alarm
    /// index).
    pub fn core(&self) -> ActorSnapshot {
        ActorSnapshot {
            state: self.state.as_ref().map(|state| state.bytes.clone()),
            input: self.input.clone(),
            conns: self.conns.clone(),
        }
    }
}

/// Counters of one store's group commit, published after every change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Batches sent so far (acknowledged, failed or in flight).
    pub batches: u64,
    /// Commits (and deletes) whose batch was acknowledged.
    pub acknowledged: u64,
    /// Commits (and deletes) whose batch failed, or that were refused after a failure.
    pub failed: u64,
    /// Whether a batch is in flight now.
    pub in_flight: bool,
    /// The round trip of the last acknowledged batch.
    pub last_round_trip: Duration,
}

/// One queued unit of work for the commit task.
enum Op {
    /// One call's writes.
    Commit {
        writes: Box<Writes>,
        release: Release,
    },
    /// Deletes the actor's state, KV and schedules; nothing is committed after it.
    Delete { release: Release },
    /// Statements of keel's own (an image of the actor's SQL database), in a batch alone.
    Batch {
        statements: Vec<Statement>,
        release: Release,
    },
}

impl Op {
    fn into_release(self) -> Release {
        match self {
            Op::Commit { release, .. } | Op::Delete { release } | Op::Batch { release, .. } => {
                release
            }
        }
    }
}

/// The actor instance's handle to its storage. Dropping it lets the commit task finish what
/// is queued and stop.
pub struct ActorStore {
    remote: Remote,
    /// The commit task holds the other end and ends once every sender is gone and the queue
    /// is empty. Unbounded on purpose, as keel-core's writer queue: an actor runs one call at
    /// a time behind a bounded mailbox, so the queue is bounded by work already admitted.
    ops: mpsc::UnboundedSender<Op>,
    stats: watch::Receiver<CommitStats>,
    state_encoding: Encoding,
}

impl ActorStore {
    /// Opens the storage of one actor instance: creates the schema on the actor's first start
    /// (writing `identity` then) and loads the snapshot, in one batch. `state_encoding` is how
    /// the host encodes state; it is stored with every state write.
    pub(crate) async fn open(
        remote: Remote,
        identity: &ActorIdentity,
        state_encoding: Encoding,
    ) -> Result<(ActorStore, Snapshot)> {
        let mut statements: Vec<Statement> = CREATE_SCHEMA
            .iter()
            .copied()
            .map(Statement::plain)
            .collect();
        let (input, input_encoding) = match &identity.input {
            Some(input) => (Some(input.bytes.clone()), Some(input.encoding.as_str())),
            None => (None, None),
        };
        statements.push(Statement::new(
            INSERT_ACTOR,
            vec![
                identity.name.as_str().into(),
                identity.key.as_str().into(),
                identity.created_at_ms.into(),
                input.into(),
                input_encoding.into(),
            ],
        ));
        let first_read = statements.len();
        statements.extend(LOAD.iter().copied().map(Statement::plain));
        let mut results = remote.batch(statements).await?;
        let snapshot = parse_load(
            remote.actor_id(),
            results.split_off(first_read),
            state_encoding,
        )?
        .ok_or_else(|| {
            damage(
                remote.actor_id(),
                "the actor row is missing after its insert",
            )
        })?;
        let alarm = start_alarm(&remote, &snapshot);
        Ok((ActorStore::start(remote, state_encoding, alarm), snapshot))
    }

    fn start(remote: Remote, state_encoding: Encoding, alarm: Option<i64>) -> ActorStore {
        let (ops, rx) = mpsc::unbounded_channel();
        let (stats_tx, stats) = watch::channel(CommitStats::default());
        let task = CommitTask {
            remote: remote.clone(),
            rx,
            failure: None,
            stats: stats_tx,
            state_encoding,
            carried: None,
            alarm,
        };
        let span = tracing::debug_span!(
            "engine_commits",
            actor_id = %remote.actor_id(),
            generation = remote.generation()
        );
        tokio::spawn(task.run().instrument(span));
        ActorStore {
            remote,
            ops,
            stats,
            state_encoding,
        }
    }

    /// A fresh store of the same activation, with the alarm set from `snapshot` (just loaded):
    /// for an instance that reloaded after a failed batch, whose commits are computed on what
    /// is committed again. Ops still queued on this store keep their refusal. A fenced-off
    /// activation gains nothing by it: the engine refuses its batches again.
    pub fn renewed(&self, snapshot: &Snapshot) -> ActorStore {
        let alarm = start_alarm(&self.remote, snapshot);
        ActorStore::start(self.remote.clone(), self.state_encoding, alarm)
    }

    /// Runs `statements` as one batch of their own, in order with the store's commits (after
    /// every earlier one, before every later one); resolves once it was acknowledged.
    pub(crate) async fn write(&self, statements: Vec<Statement>) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(Op::Batch {
            statements,
            release: Box::new(move |result| {
                // The waiter may be gone; nothing to tell then.
                let _ = tx.send(result);
            }),
        });
        rx.await.map_err(|_| Error::WriterClosed)?
    }

    /// Records a hibernatable socket of the actor at the gateway (see [`StoredSocket`]), in
    /// order with the store's commits; a failure is logged, and fails the store's later
    /// commits as any failed batch does.
    pub(crate) fn record_socket(&self, socket: &StoredSocket) {
        let headers = serde_json::to_string(&socket.headers).unwrap_or_else(|_| "{}".into());
        self.write_later(
            "recording a hibernatable socket",
            vec![Statement::new(
                "INSERT OR REPLACE INTO keel_sockets (gateway_id, request_id, path, headers) \
                 VALUES (?, ?, ?, ?)",
                vec![
                    socket.gateway_id.to_vec().into(),
                    socket.request_id.to_vec().into(),
                    socket.path.as_str().into(),
                    headers.into(),
                ],
            )],
        );
    }

    /// Forgets a hibernatable socket of the actor that ended (see [`ActorStore::record_socket`]).
    pub(crate) fn forget_socket(&self, gateway_id: [u8; 4], request_id: [u8; 4]) {
        self.write_later(
            "forgetting a hibernatable socket",
            vec![Statement::new(
                "DELETE FROM keel_sockets WHERE gateway_id = ? AND request_id = ?",
                vec![gateway_id.to_vec().into(), request_id.to_vec().into()],
            )],
        );
    }

    /// Queues keel's own `statements` as a batch of their own, without waiting for it.
    fn write_later(&self, what: &'static str, statements: Vec<Statement>) {
        self.enqueue(Op::Batch {
            statements,
            release: Box::new(move |result| {
                if let Err(err) = result {
                    tracing::warn!(error = %err, what, "an engine batch of keel's own failed");
                }
            }),
        });
    }

    /// Runs reads as one batch, outside the commit queue: they see acknowledged batches only.
    pub(crate) async fn read(
        &self,
        statements: Vec<Statement>,
    ) -> Result<Vec<rivet_envoy_client::protocol::SqliteExecuteResult>> {
        self.remote.batch(statements).await
    }

    /// How many changes of the actor's SQL database its log holds: what its next start
    /// replays on top of the image (see `db.rs`; bounded while the actor is awake too).
    pub async fn sql_log_len(&self) -> Result<u64> {
        let results = self
            .read(vec![Statement::plain(
                "SELECT count(DISTINCT seq) FROM keel_db_log",
            )])
            .await?;
        let count = results
            .into_iter()
            .next()
            .map(|result| Rows::new(self.actor_id(), result).values(1))
            .transpose()?
            .and_then(|mut rows| rows.pop())
            .and_then(|mut row| row.pop())
            .ok_or_else(|| damage(self.actor_id(), "counting the SQL log returned no row"))?
            .integer(self.actor_id(), "the SQL log's length")?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Whether a batch of this store failed (every later commit is then refused).
    pub fn has_failed(&self) -> bool {
        self.stats.borrow().failed > 0
    }

    /// The actor's id.
    pub fn actor_id(&self) -> &str {
        self.remote.actor_id()
    }

    /// The generation every request of this store carries.
    pub fn generation(&self) -> u32 {
        self.remote.generation()
    }

    /// Loads the committed snapshot in one batch of reads; `None` once the actor was deleted.
    pub async fn load(&self) -> Result<Option<Snapshot>> {
        let statements = LOAD.iter().copied().map(Statement::plain).collect();
        let results = self.remote.batch(statements).await?;
        parse_load(self.actor_id(), results, self.state_encoding)
    }

    /// Queues one call's writes; `release` runs once the batch holding them is acknowledged
    /// (with `Ok`) or failed. Never blocks: the writes coalesce with whatever else is queued.
    pub fn commit(&self, writes: Writes, release: Release) {
        self.enqueue(Op::Commit {
            writes: Box::new(writes),
            release,
        });
    }

    /// Queues the deletion of the actor's state, KV and schedules, after every earlier commit;
    /// later commits are refused with `actor.not_found`.
    pub fn delete(&self, release: Release) {
        self.enqueue(Op::Delete { release });
    }

    fn enqueue(&self, op: Op) {
        if let Err(mpsc::error::SendError(op)) = self.ops.send(op) {
            // The task ends only once every sender is dropped, and this store holds one; a
            // task that panicked is the only way here.
            (op.into_release())(Err(Error::WriterClosed));
        }
    }

    /// The group commit's counters, updated as batches go and come back.
    pub fn stats(&self) -> watch::Receiver<CommitStats> {
        self.stats.clone()
    }

    /// Reads KV values; `None` where a key is absent. Reads see committed writes only.
    pub async fn kv_get(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let statements = keys
            .iter()
            .map(|key| {
                Statement::new(
                    "SELECT value FROM keel_kv WHERE key = ?",
                    vec![key.clone().into()],
                )
            })
            .collect();
        let results = self.remote.batch(statements).await?;
        results
            .into_iter()
            .map(|result| {
                let mut rows = Rows::new(self.actor_id(), result).values(1)?;
                match rows.pop() {
                    Some(mut row) => row.remove(0).blob(self.actor_id(), "a KV value").map(Some),
                    None => Ok(None),
                }
            })
            .collect()
    }

    /// Lists KV entries whose key starts with `prefix`, in key order (or reverse), at most
    /// `limit` of them.
    pub async fn kv_list(
        &self,
        prefix: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        // Keys with the prefix are exactly those in [prefix, successor(prefix)).
        let limit = Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX));
        let statement = match (prefix_successor(prefix), reverse) {
            (Some(upper), false) => Statement::new(
                "SELECT key, value FROM keel_kv WHERE key >= ? AND key < ? ORDER BY key ASC LIMIT ?",
                vec![prefix.to_vec().into(), upper.into(), limit],
            ),
            (Some(upper), true) => Statement::new(
                "SELECT key, value FROM keel_kv WHERE key >= ? AND key < ? ORDER BY key DESC LIMIT ?",
                vec![prefix.to_vec().into(), upper.into(), limit],
            ),
            (None, false) => Statement::new(
                "SELECT key, value FROM keel_kv WHERE key >= ? ORDER BY key ASC LIMIT ?",
                vec![prefix.to_vec().into(), limit],
            ),
            (None, true) => Statement::new(
                "SELECT key, value FROM keel_kv WHERE key >= ? ORDER BY key DESC LIMIT ?",
                vec![prefix.to_vec().into(), limit],
            ),
        };
        let mut results = self.remote.batch(vec![statement]).await?;
        let rows = Rows::new(self.actor_id(), results.remove(0)).values(2)?;
        rows.into_iter()
            .map(|row| {
                let mut row = row.into_iter();
                let key = row.next().unwrap_or(Value::Null);
                let value = row.next().unwrap_or(Value::Null);
                Ok((
                    key.blob(self.actor_id(), "a KV key")?,
                    value.blob(self.actor_id(), "a KV value")?,
                ))
            })
            .collect()
    }
}

/// Owns the queue of one store: sends one batch at a time and releases what it carried.
struct CommitTask {
    remote: Remote,
    rx: mpsc::UnboundedReceiver<Op>,
    /// The error of the first failed batch (or `actor.not_found` after a delete): every later
    /// op is refused with it.
    failure: Option<Error>,
    stats: watch::Sender<CommitStats>,
    state_encoding: Encoding,
    /// An op taken from the queue that did not fit the last batch; it opens the next one.
    carried: Option<Op>,
    /// The alarm last set in the engine for this activation.
    alarm: Option<i64>,
}

impl CommitTask {
    async fn run(mut self) {
        loop {
            let first = match self.carried.take() {
                Some(op) => op,
                // `None` once every store handle is dropped and the queue is empty.
                None => match self.rx.recv().await {
                    Some(op) => op,
                    None => return,
                },
            };
            if let Some(err) = &self.failure {
                self.refuse(first, err);
                continue;
            }
            let ops = self.take_batch(first);
            self.send(ops).await;
        }
    }

    /// Takes `first` and whatever is queued behind it, up to the batch limits; a delete ends
    /// the batch, and keel's own statements go alone.
    fn take_batch(&mut self, first: Op) -> Vec<Op> {
        let (mut statements, mut bytes) = op_size(&first);
        let mut ops = vec![first];
        while !matches!(ops.last(), Some(Op::Delete { .. } | Op::Batch { .. })) {
            let Ok(next) = self.rx.try_recv() else { break };
            let (next_statements, next_bytes) = op_size(&next);
            if matches!(next, Op::Batch { .. })
                || statements + next_statements > MAX_BATCH_STATEMENTS
                || bytes + next_bytes > MAX_BATCH_BYTES
            {
                self.carried = Some(next);
                break;
            }
            statements += next_statements;
            bytes += next_bytes;
            ops.push(next);
        }
        ops
    }

    async fn send(&mut self, mut ops: Vec<Op>) {
        let mut statements = batch_statements(&mut ops, self.state_encoding);
        let reschedules = ops.iter().any(changes_schedules);
        if reschedules {
            statements.push(Statement::plain(MAY_HAVE_ALARM));
            statements.push(Statement::plain(NEXT_DUE));
        }
        let count = ops.len() as u64;
        let result = if statements.is_empty() {
            Ok(())
        } else {
            self.stats.send_modify(|stats| {
                stats.batches += 1;
                stats.in_flight = true;
            });
            let sent = Instant::now();
            let result = self.remote.batch(statements).await;
            let round_trip = sent.elapsed();
            self.stats.send_modify(|stats| {
                stats.in_flight = false;
                if result.is_ok() {
                    stats.last_round_trip = round_trip;
                }
            });
            tracing::trace!(
                ops = count,
                ?round_trip,
                ok = result.is_ok(),
                "engine batch done"
            );
            match result {
                Ok(mut results) if reschedules => {
                    self.reset_alarm(results.pop()).await;
                    Ok(())
                }
                other => other.map(drop),
            }
        };
        match result {
            Ok(()) => {
                let deleted = matches!(ops.last(), Some(Op::Delete { .. }));
                if deleted {
                    self.failure = Some(Error::ActorNotFound);
                }
                self.stats.send_modify(|stats| stats.acknowledged += count);
                for op in ops {
                    (op.into_release())(Ok(()));
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, ops = count, "engine commit failed");
                self.failure = Some(err.duplicate());
                self.stats.send_modify(|stats| stats.failed += count);
                for op in ops {
                    (op.into_release())(Err(err.duplicate()));
                }
            }
        }
    }

    /// Sets the engine's alarm from the batch's last read (the earliest due schedule), if it
    /// changed. The batch is committed either way: an unreadable answer only logs.
    async fn reset_alarm(
        &mut self,
        read: Option<rivet_envoy_client::protocol::SqliteExecuteResult>,
    ) {
        let next = match read.map(|read| next_due(self.remote.actor_id(), read)) {
            Some(Ok(next)) => next,
            Some(Err(err)) => {
                tracing::warn!(error = %err, "reading the next due schedule failed; the alarm is unchanged");
                return;
            }
            None => return,
        };
        if next != self.alarm {
            tracing::debug!(alarm_ms = ?next, "setting the engine alarm");
            self.remote.set_alarm(next).await;
            self.alarm = next;
        }
    }

    fn refuse(&self, op: Op, err: &Error) {
        self.stats.send_modify(|stats| stats.failed += 1);
        (op.into_release())(Err(err.duplicate()));
    }
}

/// Sets the engine's alarm for an activation starting from `snapshot` (schedules soonest
/// first), and returns it: on every start, since the previous activation may have committed a
/// schedule change and died before its alarm reached the engine. An actor whose schedules no
/// batch has changed has no alarm to clear, and none is sent.
fn start_alarm(remote: &Remote, snapshot: &Snapshot) -> Option<i64> {
    let (alarm, send) = alarm_at_start(snapshot);
    if send {
        remote.set_alarm_later(alarm);
    }
    alarm
}

/// The alarm of an activation starting from `snapshot`, and whether the engine must be told.
fn alarm_at_start(snapshot: &Snapshot) -> (Option<i64>, bool) {
    let alarm = snapshot.schedules.first().map(|s| s.schedule.at_ms);
    (alarm, alarm.is_some() || !snapshot.never_alarmed)
}

/// The statements of a batch of ops, in order (keel's own statements are moved out of their
/// op). Only the last state write of the batch is sent: each overwrites the whole state, so
/// the earlier ones would be overwritten within the same transaction anyway.
fn batch_statements(ops: &mut [Op], state_encoding: Encoding) -> Vec<Statement> {
    let last_state = ops.iter().rposition(|op| match op {
        Op::Commit { writes, .. } => writes.state.is_some(),
        Op::Delete { .. } | Op::Batch { .. } => false,
    });
    ops.iter_mut()
        .enumerate()
        .flat_map(|(index, op)| op_statements(op, state_encoding, Some(index) == last_state))
        .collect()
}

/// Whether the op adds, moves or removes a schedule (a delete removes them all).
fn changes_schedules(op: &Op) -> bool {
    match op {
        Op::Commit { writes, .. } => !writes.schedules.is_empty() || writes.settle.is_some(),
        Op::Delete { .. } => true,
        Op::Batch { .. } => false,
    }
}

/// The earliest due time in a [`NEXT_DUE`] read; `None` if no schedule is left.
fn next_due(
    actor_id: &str,
    result: rivet_envoy_client::protocol::SqliteExecuteResult,
) -> Result<Option<i64>> {
    match Rows::new(actor_id, result).values(1)?.pop() {
        Some(mut row) => match row.remove(0) {
            Value::Null => Ok(None),
            value => value.integer(actor_id, "the next due time").map(Some),
        },
        None => Ok(None),
    }
}

/// How many statements one op adds to a batch at most, and roughly how many bytes.
fn op_size(op: &Op) -> (usize, usize) {
    let writes = match op {
        Op::Commit { writes, .. } => writes,
        Op::Delete { .. } => return (8, 64),
        Op::Batch { statements, .. } => {
            let bytes = statements.iter().map(Statement::size).sum();
            return (statements.len(), bytes);
        }
    };
    let state = writes.state.as_ref().map_or(0, |state| state.len() + 128);
    let kv: usize = writes
        .kv
        .iter()
        .map(|write| match write {
            KvWrite::Put { key, value } => key.len() + value.len() + 96,
            KvWrite::Delete { key } => key.len() + 48,
        })
        .sum();
    let schedules: usize = writes
        .schedules
        .iter()
        .map(|op| match op {
            ScheduleWrite::Add(schedule) => {
                schedule.id.len() + schedule.action.len() + schedule.args.len() + 128
            }
            ScheduleWrite::Cancel { id } => id.len() + 48,
        })
        .sum();
    let db = writes.db.as_ref().map_or(0, |db| db.changeset.len() + 64);
    let conns: usize = writes
        .conns
        .iter()
        .map(|write| match write {
            ConnWrite::Open(conn) => {
                conn.id.len()
                    + conn.token.len()
                    + conn.params.len()
                    + conn.state.as_ref().map_or(0, Vec::len)
                    + 128
            }
            ConnWrite::State { id, state } => id.len() + state.len() + 64,
            ConnWrite::Close { id } => id.len() + 48,
        })
        .sum();
    let count = usize::from(writes.state.is_some())
        + writes.kv.len()
        + writes.schedules.len()
        + writes.conns.len()
        + usize::from(writes.settle.is_some())
        + writes
            .db
            .as_ref()
            .map_or(0, |db| db.changeset.len().div_ceil(crate::db::PART_BYTES));
    (count, state + kv + schedules + conns + db + 64)
}

/// The statements of one op; `with_state` says whether to include its state write.
fn op_statements(op: &mut Op, state_encoding: Encoding, with_state: bool) -> Vec<Statement> {
    let writes = match op {
        Op::Commit { writes, .. } => writes,
        Op::Delete { .. } => {
            return vec![
                Statement::plain("DELETE FROM keel_kv"),
                Statement::plain("DELETE FROM keel_schedules"),
                Statement::plain("DELETE FROM keel_conns"),
                Statement::plain("DELETE FROM keel_sockets"),
                Statement::plain("DELETE FROM keel_db_log"),
                Statement::plain("DELETE FROM keel_db_image"),
                Statement::plain("DELETE FROM keel_db_head"),
                Statement::plain("DELETE FROM keel_actor"),
            ];
        }
        Op::Batch { statements, .. } => return std::mem::take(statements),
    };
    let mut statements = Vec::new();
    if let (Some(state), true) = (&writes.state, with_state) {
        statements.push(Statement::new(
            "UPDATE keel_actor SET state = ?, state_encoding = ?, input = NULL, \
             input_encoding = NULL WHERE id = 1",
            vec![state.clone().into(), state_encoding.as_str().into()],
        ));
    }
    for write in &writes.kv {
        statements.push(match write {
            KvWrite::Put { key, value } => Statement::new(
                "INSERT INTO keel_kv (key, value) VALUES (?, ?) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                vec![key.clone().into(), value.clone().into()],
            ),
            KvWrite::Delete { key } => Statement::new(
                "DELETE FROM keel_kv WHERE key = ?",
                vec![key.clone().into()],
            ),
        });
    }
    for op in &writes.schedules {
        statements.push(match op {
            ScheduleWrite::Add(schedule) => Statement::new(
                "INSERT OR REPLACE INTO keel_schedules (id, at_ms, action, args, attempts) \
                 VALUES (?, ?, ?, ?, 0)",
                vec![
                    schedule.id.as_str().into(),
                    schedule.at_ms.into(),
                    schedule.action.as_str().into(),
                    schedule.args.clone().into(),
                ],
            ),
            ScheduleWrite::Cancel { id } => Statement::new(
                "DELETE FROM keel_schedules WHERE id = ?",
                vec![id.as_str().into()],
            ),
        });
    }
    match &writes.settle {
        Some((id, Settle::Done)) => statements.push(Statement::new(
            "DELETE FROM keel_schedules WHERE id = ?",
            vec![id.as_str().into()],
        )),
        Some((id, Settle::Retry { at_ms, attempts })) => statements.push(Statement::new(
            "UPDATE keel_schedules SET at_ms = ?, attempts = ? WHERE id = ?",
            vec![
                (*at_ms).into(),
                i64::from(*attempts).into(),
                id.as_str().into(),
            ],
        )),
        None => {}
    }
    for write in &writes.conns {
        statements.push(match write {
            ConnWrite::Open(conn) => Statement::new(
                "INSERT OR REPLACE INTO keel_conns (id, token, encoding, params, state) \
                 VALUES (?, ?, ?, ?, ?)",
                vec![
                    conn.id.as_str().into(),
                    conn.token.as_str().into(),
                    conn.encoding.as_str().into(),
                    conn.params.clone().into(),
                    conn.state.clone().into(),
                ],
            ),
            ConnWrite::State { id, state } => Statement::new(
                "UPDATE keel_conns SET state = ? WHERE id = ?",
                vec![state.clone().into(), id.as_str().into()],
            ),
            ConnWrite::Close { id } => Statement::new(
                "DELETE FROM keel_conns WHERE id = ?",
                vec![id.as_str().into()],
            ),
        });
    }
    // The call's SQL changes, under the next number of the actor's log, in parts (the engine
    // refuses a bound value much over 128 KiB): plain inserts, so a number logged already (a
    // second writer) fails the whole batch. `trim_below` is the embedded log's: here the log
    // is trimmed only by a newer image (`db.rs`), since the local copy that holds the older
    // changes goes with the activation.
    if let Some(db) = &writes.db {
        let seq = i64::try_from(db.seq).unwrap_or(i64::MAX);
        for (part, bytes) in db.changeset.chunks(crate::db::PART_BYTES).enumerate() {
            statements.push(Statement::new(
                "INSERT INTO keel_db_log (seq, part, bytes) VALUES (?, ?, ?)",
                vec![seq.into(), (part as i64).into(), bytes.to_vec().into()],
            ));
        }
    }
    statements
}

/// Reads the results of the [`LOAD`] statements; `None` if the actor row is gone.
fn parse_load(
    actor_id: &str,
    results: Vec<rivet_envoy_client::protocol::SqliteExecuteResult>,
    state_encoding: Encoding,
) -> Result<Option<Snapshot>> {
    let [schema, actor, schedules, conns, sockets, never_alarmed]: [_; 6] = results
        .try_into()
        .map_err(|_| damage(actor_id, "a load returned the wrong number of results"))?;
    let version = match Rows::new(actor_id, schema).values(1)?.as_mut_slice() {
        [row] => row.remove(0).integer(actor_id, "the schema version")?,
        rows => {
            return Err(damage(
                actor_id,
                format!("keel_schema has {} rows, not one", rows.len()),
            ))
        }
    };
    if version > SCHEMA_VERSION {
        return Err(Error::StorageTooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    let Some(row) = Rows::new(actor_id, actor).values(4)?.pop() else {
        return Ok(None);
    };
    let [state, encoding, input, input_encoding]: [Value; 4] = row
        .try_into()
        .map_err(|_| damage(actor_id, "the actor row has the wrong width"))?;
    let state = state.optional_blob(actor_id, "the state")?;
    let state = match state {
        Some(bytes) => {
            let name = encoding.optional_text(actor_id, "the state encoding")?;
            let encoding = name
                .as_deref()
                .and_then(Encoding::parse)
                .ok_or_else(|| damage(actor_id, "the state encoding is missing or unknown"))?;
            Some(Payload { encoding, bytes })
        }
        None => None,
    };
    let input = match input.optional_blob(actor_id, "the creation input")? {
        Some(bytes) => {
            let name = input_encoding.optional_text(actor_id, "the input encoding")?;
            let encoding = name
                .as_deref()
                .and_then(Encoding::parse)
                .ok_or_else(|| damage(actor_id, "the input encoding is missing or unknown"))?;
            Some(Payload { encoding, bytes })
        }
        None => None,
    };
    let schedules = Rows::new(actor_id, schedules)
        .values(5)?
        .into_iter()
        .map(|row| schedule_row(actor_id, row))
        .collect::<Result<Vec<_>>>()?;
    let conns = Rows::new(actor_id, conns)
        .values(5)?
        .into_iter()
        .map(|row| conn_row(actor_id, row))
        .collect::<Result<Vec<_>>>()?;
    let sockets = Rows::new(actor_id, sockets)
        .values(4)?
        .into_iter()
        .map(|row| socket_row(actor_id, row))
        .collect::<Result<Vec<_>>>()?;
    let never_alarmed = match Rows::new(actor_id, never_alarmed).values(1)?.as_mut_slice() {
        [row] => row.remove(0).integer(actor_id, "the no-alarm mark")? > 0,
        _ => return Err(damage(actor_id, "the no-alarm mark's count is not one row")),
    };
    let snapshot = Snapshot {
        state,
        input,
        schedules,
        conns,
        sockets,
        never_alarmed,
    };
    // The state is checked in the encoding it was written in; a host whose encoding changed
    // sees that in `Snapshot::state`.
    let check_encoding = snapshot
        .state
        .as_ref()
        .map_or(state_encoding, |state| state.encoding);
    snapshot.core().verify(actor_id, check_encoding)?;
    Ok(Some(snapshot))
}

fn socket_row(actor_id: &str, row: Vec<Value>) -> Result<StoredSocket> {
    let [gateway_id, request_id, path, headers]: [Value; 4] = row
        .try_into()
        .map_err(|_| damage(actor_id, "a socket row has the wrong width"))?;
    let id = |value: Value, what: &str| -> Result<[u8; 4]> {
        value
            .blob(actor_id, what)?
            .try_into()
            .map_err(|_| damage(actor_id, format!("{what} is not 4 bytes")))
    };
    let headers = headers.text(actor_id, "a socket's headers")?;
    Ok(StoredSocket {
        gateway_id: id(gateway_id, "a socket's gateway id")?,
        request_id: id(request_id, "a socket's request id")?,
        path: path.text(actor_id, "a socket's path")?,
        headers: serde_json::from_str(&headers)
            .map_err(|_| damage(actor_id, "a socket's headers are not a JSON object"))?,
    })
}

fn conn_row(actor_id: &str, row: Vec<Value>) -> Result<StoredConn> {
    let [id, token, encoding, params, state]: [Value; 5] = row
        .try_into()
        .map_err(|_| damage(actor_id, "a connection row has the wrong width"))?;
    let encoding = encoding.text(actor_id, "a connection's encoding")?;
    Ok(StoredConn {
        id: id.text(actor_id, "a connection id")?,
        token: token.text(actor_id, "a connection token")?,
        encoding: Encoding::parse(&encoding)
            .ok_or_else(|| damage(actor_id, "a connection's encoding is unknown"))?,
        params: params.blob(actor_id, "a connection's parameters")?,
        state: state.optional_blob(actor_id, "a connection's state")?,
    })
}

fn schedule_row(actor_id: &str, row: Vec<Value>) -> Result<StoredSchedule> {
    let [id, at_ms, action, args, attempts]: [Value; 5] = row
        .try_into()
        .map_err(|_| damage(actor_id, "a schedule row has the wrong width"))?;
    let attempts = attempts.integer(actor_id, "a schedule's attempts")?;
    Ok(StoredSchedule {
        actor_id: actor_id.to_string(),
        schedule: Schedule {
            id: id.text(actor_id, "a schedule id")?,
            at_ms: at_ms.integer(actor_id, "a schedule's due time")?,
            action: action.text(actor_id, "a schedule's action")?,
            args: args.blob(actor_id, "a schedule's arguments")?,
        },
        attempts: u32::try_from(attempts)
            .map_err(|_| damage(actor_id, "a schedule's attempts are out of range"))?,
    })
}

/// The smallest byte string greater than every string starting with `prefix`, or `None` if
/// there is none (the prefix is empty or all `0xff`).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < u8::MAX {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(writes: Writes) -> Op {
        Op::Commit {
            writes: Box::new(writes),
            release: Box::new(|_| {}),
        }
    }

    #[test]
    fn a_batch_sends_only_its_last_state_and_keeps_kv_order() {
        let ops = vec![
            commit(Writes {
                state: Some(b"1".to_vec()),
                kv: vec![KvWrite::Put {
                    key: b"a".to_vec(),
                    value: b"1".to_vec(),
                }],
                ..Writes::default()
            }),
            commit(Writes {
                state: Some(b"2".to_vec()),
                kv: vec![KvWrite::Delete { key: b"a".to_vec() }],
                ..Writes::default()
            }),
            commit(Writes::default()),
        ];
        let mut ops = ops;
        let statements = batch_statements(&mut ops, Encoding::Json);
        let sql: Vec<&str> = statements.iter().map(|s| s.sql).collect();
        assert_eq!(sql.len(), 3);
        assert!(sql[0].starts_with("INSERT INTO keel_kv"));
        assert!(sql[1].starts_with("UPDATE keel_actor"));
        assert_eq!(statements[1].params[0], Value::Blob(b"2".to_vec()));
        assert!(sql[2].starts_with("DELETE FROM keel_kv"));
    }

    #[test]
    fn a_call_s_changeset_goes_in_its_batch_in_parts_and_a_delete_drops_the_database() {
        let changeset: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        let mut ops = vec![
            commit(Writes {
                state: Some(b"1".to_vec()),
                db: Some(keel_core::DbChange {
                    seq: 7,
                    changeset: changeset.clone(),
                    trim_below: 7,
                }),
                ..Writes::default()
            }),
            Op::Delete {
                release: Box::new(|_| {}),
            },
        ];
        assert_eq!(op_size(&ops[0]).0, 4, "the state and three parts");
        let statements = batch_statements(&mut ops, Encoding::Json);
        let parts: Vec<&Statement> = statements
            .iter()
            .filter(|s| s.sql.starts_with("INSERT INTO keel_db_log"))
            .collect();
        assert_eq!(parts.len(), 3);
        let mut joined = Vec::new();
        for (index, part) in parts.iter().enumerate() {
            assert_eq!(part.params[0], Value::Integer(7));
            assert_eq!(part.params[1], Value::Integer(index as i64));
            let Value::Blob(bytes) = &part.params[2] else {
                panic!("a blob");
            };
            assert!(bytes.len() <= crate::db::PART_BYTES);
            joined.extend_from_slice(bytes);
        }
        assert_eq!(joined, changeset);
        assert!(
            !statements
                .iter()
                .any(|s| s.sql.contains("DELETE FROM keel_db_log WHERE")),
            "the embedded log's trim is not applied: the log is trimmed by images only"
        );
        for table in ["keel_db_log", "keel_db_image", "keel_db_head"] {
            assert!(
                statements
                    .iter()
                    .any(|s| s.sql == format!("DELETE FROM {table}")),
                "the delete drops {table}"
            );
        }
    }

    #[test]
    fn a_start_sends_an_alarm_only_if_the_actor_has_schedules_or_may_have_had_one() {
        let schedule = StoredSchedule {
            actor_id: "a".into(),
            schedule: Schedule {
                id: "s".into(),
                at_ms: 42,
                action: "tick".into(),
                args: vec![0x80],
            },
            attempts: 0,
        };
        let quiet = Snapshot {
            never_alarmed: true,
            ..Snapshot::default()
        };
        assert_eq!(
            alarm_at_start(&quiet),
            (None, false),
            "nothing to set or clear"
        );
        let scheduled = Snapshot {
            schedules: vec![schedule.clone()],
            ..quiet.clone()
        };
        assert_eq!(alarm_at_start(&scheduled), (Some(42), true));
        // Once a batch changed its schedules, or stored before the mark existed: cleared.
        let emptied = Snapshot::default();
        assert_eq!(alarm_at_start(&emptied), (None, true));
    }

    #[test]
    fn prefix_successor_covers_the_edges() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[b'a', 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
        assert_eq!(prefix_successor(b""), None);
    }
}
