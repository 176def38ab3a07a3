//! The `Storage` seam: everything the layers above need from durable storage, without a
//! SQLite type in sight.
//!
//! Today's implementation is `EmbeddedStorage` (`embedded.rs`: the SQLite file and the
//! group-commit writer). Another implementation (a remote, generation-fenced database that
//! takes one batch per commit, such as the engine's) is written against this trait alone,
//! which is public for that (`keel_core::Storage`), with the types it names: the snapshot,
//! records and schedules (`keel_core::store`), the writes, poison mark and release
//! (`keel_core::writer`).
//!
//! The contract:
//! - **Durable** means what a crash cannot take back: once a commit's `release` has run with
//!   `Ok`, a process restart (or a new owner of the actor) loads exactly those writes.
//! - **Ordering.** Commits are durable, and their `release` callbacks run, in the order
//!   `commit` was called (across actors too: a commit with no writes still waits for every
//!   earlier one, which is what keeps one actor's replies in order and what `flush` is).
//!   `release` runs exactly once, with `Ok` or with the error, also when storage has closed.
//! - **The output gate.** Nothing the caller holds back for a commit (a reply, an event) may
//!   be let out before its `release`; `release` must only hand off, never block, since it may
//!   run on storage's own thread, or on the caller's before `commit` returns (the embedded
//!   writer applies a commit to an idle writer inline); so a caller sets up whatever its
//!   `release` needs before calling `commit`.
//! - **A failure leaves nothing behind.** A commit that fails writes none of its writes, and
//!   marks the instance's [`Poison`] so that later commits of that instance are refused with the
//!   same error until the actor has replaced the instance (see `actor/task.rs`).
//! - **Reads** see every commit whose `release` has run. A read that meets damage reports
//!   `storage.corrupt` and latches it: later reads, commits and [`Storage::health`] fail too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::actor_type::DbConfig;
use crate::error::{DbError, Error, Result};
use crate::host::{Encoding, KvWrite, Payload, Schedule, ScheduleWrite};

/// Durable storage for every actor of a runtime. See the module doc for the contract.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// What an actor's task loads when it starts; `None` if the actor does not exist.
    async fn load(&self, actor_id: &str) -> Result<Option<ActorSnapshot>>;

    /// The actor with type `name` and canonical key `key`, if there is one.
    async fn find_by_key(&self, name: &str, key: &str) -> Result<Option<ActorRecord>>;

    /// The actor with this id, if there is one.
    async fn find_by_id(&self, id: &str) -> Result<Option<ActorRecord>>;

    /// Inserts an actor row (or, by `mode`, finds the one holding the key); resolves once
    /// durable, with the row that holds the key and whether this call created it.
    async fn create(
        &self,
        record: ActorRecord,
        input: Option<Payload>,
        mode: CreateMode,
    ) -> Result<(ActorRecord, bool)>;

    /// Commits one call's writes (state, KV writes, schedule changes, the settled schedule);
    /// `None` writes only orders `release` behind earlier commits. `release` runs once the
    /// writes are durable, or failed; `poison` is the instance's mark (see the module doc).
    /// `alone` says that no other actor of the runtime has a call in progress and no call
    /// waits for this actor behind this one, so that a commit holding the caller's thread (a
    /// tokio worker) for a disk flush delays no other call; a storage may ignore it.
    fn commit(
        &self,
        actor_id: Arc<str>,
        writes: Option<Box<Writes>>,
        poison: Option<Arc<Poison>>,
        release: Release,
        alone: bool,
    );

    /// Deletes an actor with its KV entries and schedules; resolves once durable, in commit
    /// order: nothing of the actor is committed after it.
    async fn delete(&self, actor_id: Arc<str>) -> Result<()>;

    /// Resolves once every commit made before it is durable.
    async fn flush(&self) -> Result<()>;

    /// The values of `keys` in the actor's KV store, in order.
    async fn kv_get(&self, actor_id: &str, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>>;

    /// The actor's KV entries whose key starts with `prefix`, in key order (or reversed), at
    /// most `limit` of them.
    async fn kv_list(
        &self,
        actor_id: &str,
        prefix: Vec<u8>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// The actor's KV entries under `prefix` strictly after `after`, in key order: one page
    /// of the inspector's listing.
    async fn kv_page(
        &self,
        actor_id: &str,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// The actor's pending schedules.
    async fn schedules_of(&self, actor_id: &str) -> Result<Vec<StoredSchedule>>;

    /// One pending schedule by id, if it is still pending.
    async fn schedule(&self, id: &str) -> Result<Option<StoredSchedule>>;

    /// Actors in `(name, key)` order, of type `name` if given, strictly after `after`.
    async fn list_actors(
        &self,
        name: Option<String>,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<ActorListing>>;

    /// One actor's listing by id.
    async fn actor_listing(&self, id: &str) -> Result<Option<ActorListing>>;

    /// `Ok` unless damage has been seen (then `storage.corrupt`): what `/health` reports.
    fn health(&self) -> Result<()>;

    /// Makes everything committed so far durable, then closes: later commits are released
    /// with `storage.writer_closed`, reads fail, and the data is handed to its next owner.
    async fn close(&self);

    /// Opens the SQL database of an actor whose type has one (creating it on first use), with
    /// every change the log holds for it applied. The actor's task holds it while it runs and
    /// closes it when it stops; `delete` removes it with the actor. A storage without
    /// per-actor databases refuses with `db.unavailable`.
    async fn open_db(&self, actor_id: Arc<str>, config: DbConfig) -> Result<Arc<dyn ActorDb>> {
        let _ = (actor_id, config);
        Err(DbError::Unavailable.with(
            "this storage has no per-actor SQL databases (`db` is not supported in this mode)",
        ))
    }
}

/// One actor's SQL database while its task runs. Its contract, with the commit's:
/// - A call's statements run in one transaction that nothing else sees until it is finished.
///   [`ActorDb::prepare`] ends the call: it returns the call's changes (`None` if it changed
///   nothing, and then the transaction is over already), which go into the call's
///   [`Writes::db`]; the commit's release then calls [`ActorDb::finish`], which makes the
///   transaction durable in the actor's database on `Ok` and rolls it back on an error. So a
///   change is in the actor's database only once its log entry is durable, and on start
///   [`Storage::open_db`] applies log entries the database has not (a crash in between).
/// - [`ActorDb::rollback`] drops a failed call's statements.
/// - The next call waits for [`ActorDb::settled`]: one call's changes at a time.
/// - Migrations (`onMigrate`) run between [`MigrationStep::Begin`] and its end, in a
///   transaction of their own that is committed to the actor's database directly (a schema
///   change is not a change the log carries), and may change the schema; calls may not.
#[async_trait]
pub trait ActorDb: Send + Sync + 'static {
    /// Tells this opening apart from the actor's earlier and later ones: a statement sent
    /// with another instance's token is refused, so late code of a discarded instance cannot
    /// reach the current one's transaction.
    fn token(&self) -> u64;

    /// A call of the actor's user code begins: statements are accepted until its
    /// [`ActorDb::prepare`] or [`ActorDb::rollback`]. Statements at any other time are work
    /// outside a call, with no commit to join, and are refused. Never blocks.
    fn enter(&self);

    /// Runs one statement; `params` and the result are in the codec of `actor_db.rs`.
    async fn execute(&self, sql: String, params: Vec<u8>) -> Result<Vec<u8>>;

    /// Begins or ends the migration transaction.
    async fn migration(&self, step: MigrationStep) -> Result<()>;

    /// Ends the current call: its changes, to commit, or `None`.
    async fn prepare(&self) -> Result<Option<DbChange>>;

    /// Drops the current call's statements.
    async fn rollback(&self);

    /// The commit carrying change `seq` was released: make it durable, or drop it. Never
    /// blocks (it runs in a release).
    fn finish(&self, seq: u64, durable: bool);

    /// Resolves once no prepared change waits for its commit.
    async fn settled(&self);

    /// Drops what is open and closes the database.
    async fn close(&self);
}

/// A step of the migration transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationStep {
    /// Begins it: statements may change the schema until it ends.
    Begin,
    /// `onMigrate` returned: commit it.
    Commit,
    /// `onMigrate` threw: roll it back.
    Rollback,
}

/// One call's changes to its actor's SQL database, in the same commit as its other writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbChange {
    /// The change's place in the actor's log: one more than the last change before it.
    pub seq: u64,
    /// The changes as an SQLite changeset.
    pub changeset: Vec<u8>,
    /// Every change of the actor below this number is durable in its database, so the log may
    /// drop them.
    pub trim_below: u64,
}

/// One row of the actor directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorRecord {
    /// Stable, generated id.
    pub id: String,
    /// Actor type name.
    pub name: String,
    /// Canonical key string.
    pub key: String,
}

/// One actor as the inspector lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorListing {
    /// Stable, generated id.
    pub id: String,
    /// Actor type name.
    pub name: String,
    /// Canonical key string.
    pub key: String,
    /// When the actor was created, in epoch milliseconds.
    pub created_at_ms: i64,
}

/// What an actor's task loads when it starts.
#[derive(Debug, Clone, Default)]
pub struct ActorSnapshot {
    /// The last committed state; `None` until the actor's state was first created.
    pub state: Option<Vec<u8>>,
    /// The creation input, kept until the state is first created.
    pub input: Option<Payload>,
    /// The actor's durable connections (types with hibernatable connections only), by id.
    pub conns: Vec<StoredConn>,
}

/// A durable connection of an actor whose type has hibernatable connections: what brings
/// it back after the actor slept or the server restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredConn {
    /// The connection's id, unique within its actor.
    pub id: String,
    /// The secret a client presents to resume the connection after a restart.
    pub token: String,
    /// The encoding of the connection's frames and of `params`.
    pub encoding: Encoding,
    /// The parameters the client connected with, in `encoding`.
    pub params: Vec<u8>,
    /// `conn.state`, in the host's state encoding; `None` when the connection has none.
    pub state: Option<Vec<u8>>,
}

/// One change to an actor's durable connections, committed with the call that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnWrite {
    /// A connection was admitted.
    Open(StoredConn),
    /// A call changed `conn.state`.
    State {
        /// The connection's id.
        id: String,
        /// The new state, in the host's state encoding.
        state: Vec<u8>,
    },
    /// The connection closed for good.
    Close {
        /// The connection's id.
        id: String,
    },
}

/// A stored schedule and how often it has failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSchedule {
    /// The actor it belongs to.
    pub actor_id: String,
    /// The schedule itself.
    pub schedule: Schedule,
    /// How many runs have failed so far.
    pub attempts: u32,
}

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

impl CreateMode {
    /// What a creation in this mode answers when the key already has the actor `found`.
    pub fn answer_existing(self, found: ActorRecord) -> Result<(ActorRecord, bool)> {
        match self {
            CreateMode::Create => Err(Error::ActorAlreadyExists),
            CreateMode::GetOrCreate => Ok((found, false)),
        }
    }
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
    pub schedules: Vec<ScheduleWrite>,
    /// The outcome of the schedule whose run produced this commit.
    pub settle: Option<(String, Settle)>,
    /// Changes to the actor's durable connections, in order.
    pub conns: Vec<ConnWrite>,
    /// The call's changes to the actor's SQL database, if it has one and they changed it.
    pub db: Option<DbChange>,
}

impl Writes {
    /// Whether the commit writes nothing (it only orders a release).
    pub fn is_empty(&self) -> bool {
        self.state.is_none()
            && self.kv.is_empty()
            && self.schedules.is_empty()
            && self.settle.is_none()
            && self.conns.is_empty()
            && self.db.is_none()
    }
}

/// Marks an actor instance that ran on top of a commit that failed. Shared by the actor's
/// task, which passes it with each commit and replaces the instance once it is set, and the
/// writer, which sets it when a batch holding the instance's writes fails and refuses the
/// instance's later commits while it is set.
#[derive(Debug, Default)]
pub struct Poison {
    /// Whether it is set: read on every commit, so a plain load on the common path.
    set: AtomicBool,
    /// The error of the commit that failed, given to every refused commit.
    error: Mutex<Option<Error>>,
}

impl Poison {
    /// Whether a commit of the instance has failed since the last [`Poison::clear`].
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Clears the mark once the instance was replaced; the writer then accepts its commits.
    pub fn clear(&self) {
        *self.error.lock() = None;
        self.set.store(false, Ordering::Release);
    }

    /// Marks the instance, keeping the first error (storage does, when a commit fails).
    pub fn set(&self, err: &Error) {
        let mut error = self.error.lock();
        if error.is_none() {
            *error = Some(err.duplicate());
        }
        self.set.store(true, Ordering::Release);
    }

    /// The error a refused commit gets, while the mark is set.
    pub fn refusal(&self) -> Option<Error> {
        if !self.is_set() {
            return None;
        }
        Some(
            self.error
                .lock()
                .as_ref()
                .map_or(Error::WriterClosed, Error::duplicate),
        )
    }
}
