//! The SQLite database behind every actor: opening, locking, schema migrations and reads.
//!
//! One process owns a data directory at a time: `open` takes an exclusive lock on a `LOCK`
//! file beside the database and keeps it for the store's lifetime, so a second process gets
//! `storage.locked`. The schema is versioned with `PRAGMA user_version` and only migrates
//! forward. Before anything writes to an existing file, `open` checks it: a database from a
//! newer keel, a file that is not a database, a database whose tables are not exactly the ones
//! keel's migrations create (another program's `keel.db`), and damage (see `integrity.rs`) are
//! all errors, and the file is left as it was, never reset. All writes go through the
//! group-commit writer (`writer.rs`); this module only reads, through a small pool of read
//! connections that WAL mode lets run beside the writer. Reads by key or id check that the row
//! they found is the one they asked for, so a damaged index cannot answer with another actor.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::config::Durability;
use crate::error::{Error, Result};
use crate::host::{Encoding, Payload, Schedule};
use crate::storage::integrity::{self, Integrity};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "keel.db";
/// File name of the process lock inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// The most read connections the store keeps open. Reads run on tokio's blocking threads, so
/// without a bound the pool would grow to the busiest moment's concurrency and keep every
/// connection (each with its own page cache, up to 2 MiB) for the process's life; beyond
/// this many, a read waits for a connection another read gives back.
pub(crate) const MAX_READERS: usize = 4;

/// Forward migrations; entry `i` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // Version 1: the actor directory, each actor's state, its key-value store and schedules.
    "CREATE TABLE actors (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        key             TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        input           BLOB,
        input_encoding  TEXT,
        state           BLOB,
        UNIQUE (name, key)
    ) STRICT;
    CREATE TABLE kv (
        actor_id  TEXT NOT NULL,
        key       BLOB NOT NULL,
        value     BLOB NOT NULL,
        PRIMARY KEY (actor_id, key)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE schedules (
        id        TEXT PRIMARY KEY,
        actor_id  TEXT NOT NULL,
        at_ms     INTEGER NOT NULL,
        action    TEXT NOT NULL,
        args      BLOB NOT NULL,
        attempts  INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    CREATE INDEX schedules_by_actor ON schedules (actor_id, at_ms);",
    // Version 2: the commit counter that every write transaction increments (see
    // `integrity.rs`).
    "CREATE TABLE commits (seq INTEGER NOT NULL) STRICT;
    INSERT INTO commits (seq) VALUES (0);",
    // Version 3: the durable connections of types with hibernatable connections.
    "CREATE TABLE conns (
        actor_id  TEXT NOT NULL,
        id        TEXT NOT NULL,
        token     TEXT NOT NULL,
        encoding  TEXT NOT NULL,
        params    BLOB NOT NULL,
        state     BLOB,
        PRIMARY KEY (actor_id, id)
    ) STRICT, WITHOUT ROWID;",
    // Version 4: the log of changes to actors' SQL databases (see `actor_db.rs`): each
    // actor's entries not yet durable in its own database, and the last one that is.
    "CREATE TABLE db_log (
        actor_id   TEXT NOT NULL,
        seq        INTEGER NOT NULL,
        changeset  BLOB NOT NULL,
        PRIMARY KEY (actor_id, seq)
    ) STRICT, WITHOUT ROWID;",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

pub use crate::storage::seam::{
    ActorListing, ActorRecord, ActorSnapshot, StoredConn, StoredSchedule,
};

impl ActorSnapshot {
    /// Checks that the state (in the host's `state_encoding`) and the input are each one
    /// well-formed value, so that damage inside them is `storage.corrupt` for this actor
    /// rather than a failure of the user code that would decode them.
    pub fn verify(&self, actor_id: &str, state_encoding: Encoding) -> Result<()> {
        let values = [
            ("state", state_encoding, self.state.as_deref()),
            (
                "creation input",
                self.input
                    .as_ref()
                    .map_or(Encoding::Json, |input| input.encoding),
                self.input.as_ref().map(|input| input.bytes.as_slice()),
            ),
        ];
        let conns = self.conns.iter().flat_map(|conn| {
            [
                (
                    "connection parameters",
                    conn.encoding,
                    Some(conn.params.as_slice()),
                ),
                ("connection state", state_encoding, conn.state.as_deref()),
            ]
        });
        for (what, encoding, bytes) in values.into_iter().chain(conns) {
            if let Some(bytes) = bytes.filter(|bytes| !integrity::well_formed(encoding, bytes)) {
                return Err(Error::StorageCorrupt {
                    detail: format!(
                        "the stored {what} of actor {actor_id} ({} bytes) is not well-formed {}",
                        bytes.len(),
                        encoding.as_str()
                    ),
                    actor_id: Some(actor_id.to_string()),
                    source: None,
                });
            }
        }
        Ok(())
    }
}

/// The open database: the process lock, the path, the read pool and its health.
pub struct Store {
    path: PathBuf,
    durability: Durability,
    /// The damage latch and the commit record, shared with the writer.
    integrity: Arc<Integrity>,
    /// The read connections: a reader takes an idle one (or opens one, up to
    /// [`MAX_READERS`]) and puts it back.
    readers: Mutex<Readers>,
    /// Signalled when a read connection is put back.
    reader_returned: Condvar,
    /// Held until [`Store::close`] or drop; releasing it hands the directory to other processes.
    lock: Mutex<Option<File>>,
    /// Set by [`Store::close`]; reads fail afterwards.
    closed: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`, locks the directory, checks an
    /// existing file and migrates the schema.
    pub fn open(data_dir: &Path, durability: Durability) -> Result<Arc<Store>> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| Error::io(format!("creating {}", data_dir.display()), e))?;
        let lock_path = data_dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("opening {}", lock_path.display()), e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::StorageLocked {
                    path: data_dir.display().to_string(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("locking {}", lock_path.display()), e))
            }
        }
        let path = data_dir.join(DB_FILE);
        let mark_path = data_dir.join(integrity::COMMITS_FILE);
        // Every check runs before the first write, so a refused file is left as it was.
        let found = inspect(&path)?;
        integrity::check_history(&path, &mark_path, found, integrity::read_mark(&mark_path)?)?;
        if !path.exists() {
            create(&path)?;
        }
        let conn = connect(&path, durability, true)?;
        migrate(&path, &conn)?;
        let seq = match durability {
            Durability::Full => integrity::commit_seq(&conn),
            // Relaxed commits leave the counter alone; each open counts once instead.
            Durability::Relaxed => integrity::count_open(&conn),
        }
        .map_err(|e| classify(&path, e))?;
        let integrity = Integrity::open(path.clone(), &mark_path, seq, durability)?;
        let store = Store {
            path,
            durability,
            integrity: Arc::new(integrity),
            readers: Mutex::new(Readers::default()),
            reader_returned: Condvar::new(),
            lock: Mutex::new(Some(lock)),
            closed: std::sync::atomic::AtomicBool::new(false),
        };
        let first = store.connect(false)?;
        let mut readers = store.readers.lock();
        readers.idle.push(first);
        readers.open = 1;
        drop(readers);
        Ok(Arc::new(store))
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The damage latch and commit record, for the writer.
    /// How hard its commits work to survive a power loss.
    pub(crate) fn durability(&self) -> Durability {
        self.durability
    }

    pub(crate) fn integrity(&self) -> Arc<Integrity> {
        self.integrity.clone()
    }

    /// Opens a connection with keel's pragmas. `writer` connections set the durability.
    pub(crate) fn connect(&self, writer: bool) -> Result<Connection> {
        connect(&self.path, self.durability, writer)
    }

    /// Closes the read connections and releases the directory lock. The writer must already
    /// be closed; reads fail afterwards with `registry.shut_down`.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.readers.lock().idle.clear();
        if let Some(lock) = self.lock.lock().take() {
            if let Err(err) = lock.unlock() {
                tracing::warn!(error = %err, "releasing the data directory lock failed");
            }
        }
    }

    /// Runs `f` with a pooled read connection. Once damage has been seen nothing is read, and
    /// a read that meets damage latches it.
    fn read<T, E: Into<Error>>(&self, f: impl FnOnce(&Connection) -> Result<T, E>) -> Result<T> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::RegistryShutDown);
        }
        self.integrity.check()?;
        let conn = self.take_reader()?;
        let result = f(&conn);
        self.readers.lock().idle.push(conn);
        self.reader_returned.notify_one();
        result.map_err(|e| self.integrity.observe(e.into()))
    }

    /// An idle read connection, a new one while fewer than [`MAX_READERS`] are open, or else
    /// the next one given back.
    fn take_reader(&self) -> Result<Connection> {
        let mut readers = self.readers.lock();
        loop {
            if let Some(conn) = readers.idle.pop() {
                return Ok(conn);
            }
            if readers.open < MAX_READERS {
                readers.open += 1;
                drop(readers);
                return self.connect(false).inspect_err(|_| {
                    self.readers.lock().open -= 1;
                    self.reader_returned.notify_one();
                });
            }
            self.reader_returned.wait(&mut readers);
        }
    }

    /// How many read connections are open (idle or in use).
    #[cfg(test)]
    pub(crate) fn open_readers(&self) -> usize {
        self.readers.lock().open
    }

    /// Looks an actor up by type name and canonical key.
    pub fn find_by_key(&self, name: &str, key: &str) -> Result<Option<ActorRecord>> {
        self.read(|conn| {
            Ok::<_, Error>(actor_id_by_key(conn, name, key)?.map(|id| ActorRecord {
                id,
                name: name.to_string(),
                key: key.to_string(),
            }))
        })
    }

    /// Looks an actor up by id.
    pub fn find_by_id(&self, id: &str) -> Result<Option<ActorRecord>> {
        self.read(|conn| {
            let row = conn
                .prepare_cached(
                    "SELECT id, name, key FROM actors NOT INDEXED \
                     WHERE rowid = (SELECT rowid FROM actors WHERE id = ?1)",
                )?
                .query_row([id], |row| {
                    Ok(ActorRecord {
                        id: row.get(0)?,
                        name: row.get(1)?,
                        key: row.get(2)?,
                    })
                })
                .optional()?;
            check_found_id("actors", id, row.as_ref().map(|row| row.id.as_str()))?;
            Ok::<_, Error>(row)
        })
    }

    /// Loads what an actor's task needs to start.
    pub fn load(&self, id: &str) -> Result<Option<ActorSnapshot>> {
        self.read(|conn| {
            let row = conn
                .prepare_cached(
                    "SELECT id, state, input, input_encoding FROM actors NOT INDEXED \
                     WHERE rowid = (SELECT rowid FROM actors WHERE id = ?1)",
                )?
                .query_row([id], |row| {
                    let found: String = row.get(0)?;
                    let input: Option<Vec<u8>> = row.get(2)?;
                    let encoding: Option<String> = row.get(3)?;
                    let snapshot = ActorSnapshot {
                        state: row.get(1)?,
                        input: input.map(|bytes| Payload {
                            encoding: encoding
                                .as_deref()
                                .and_then(Encoding::parse)
                                .unwrap_or_default(),
                            bytes,
                        }),
                        conns: Vec::new(),
                    };
                    Ok((found, snapshot))
                })
                .optional()?;
            check_found_id("actors", id, row.as_ref().map(|(found, _)| found.as_str()))?;
            let Some((_, mut snapshot)) = row else {
                return Ok(None);
            };
            let mut select = conn.prepare_cached(
                "SELECT id, token, encoding, params, state FROM conns WHERE actor_id = ?1",
            )?;
            let rows = select.query_map([id], |row| {
                let encoding: String = row.get(2)?;
                Ok((row.get(0)?, row.get(1)?, encoding, row.get(3)?, row.get(4)?))
            })?;
            for row in rows {
                let (conn_id, token, encoding, params, state): (String, String, String, _, _) =
                    row?;
                let encoding = Encoding::parse(&encoding).ok_or_else(|| Error::StorageCorrupt {
                    detail: format!(
                        "the stored connection {conn_id} of actor {id} has an unknown encoding"
                    ),
                    actor_id: Some(id.to_string()),
                    source: None,
                })?;
                snapshot.conns.push(StoredConn {
                    id: conn_id,
                    token,
                    encoding,
                    params,
                    state,
                });
            }
            Ok::<_, Error>(Some(snapshot))
        })
    }

    /// The actor's entries in the log of changes to its SQL database, in order.
    pub fn db_log(&self, actor_id: &str) -> Result<Vec<(u64, Vec<u8>)>> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT seq, changeset FROM db_log WHERE actor_id = ?1 ORDER BY seq",
            )?;
            let rows = statement.query_map([actor_id], |row| {
                Ok((row.get::<_, i64>(0)? as u64, row.get::<_, Vec<u8>>(1)?))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
    }

    /// Reads KV values; `None` where a key is absent.
    pub fn kv_get(&self, actor_id: &str, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        self.read(|conn| {
            let mut select =
                conn.prepare_cached("SELECT value FROM kv WHERE actor_id = ?1 AND key = ?2")?;
            keys.iter()
                .map(|key| {
                    select
                        .query_row((actor_id, key), |row| row.get(0))
                        .optional()
                })
                .collect()
        })
    }

    /// Lists KV entries whose key starts with `prefix`, in key order (or reverse), at most
    /// `limit` of them.
    pub fn kv_list(
        &self,
        actor_id: &str,
        prefix: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let order = if reverse { "DESC" } else { "ASC" };
        // Keys with the prefix are exactly those in [prefix, successor(prefix)).
        let upper = prefix_successor(prefix);
        let sql = match upper {
            Some(_) => format!(
                "SELECT key, value FROM kv WHERE actor_id = ?1 AND key >= ?2 AND key < ?3 \
                 ORDER BY key {order} LIMIT ?4"
            ),
            None => format!(
                "SELECT key, value FROM kv WHERE actor_id = ?1 AND key >= ?2 \
                 ORDER BY key {order} LIMIT ?4"
            ),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|conn| {
            let mut select = conn.prepare_cached(&sql)?;
            let upper = upper.unwrap_or_default();
            let rows = select
                .query_map(rusqlite::params![actor_id, prefix, upper, limit], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?;
            rows.collect()
        })
    }

    /// An actor's pending schedules, soonest first.
    pub fn schedules_of(&self, actor_id: &str) -> Result<Vec<StoredSchedule>> {
        self.read(|conn| {
            let mut select = conn.prepare_cached(
                "SELECT id, at_ms, action, args, attempts, actor_id FROM schedules NOT INDEXED \
                 WHERE rowid IN (SELECT rowid FROM schedules WHERE actor_id = ?1) \
                 ORDER BY at_ms, id",
            )?;
            let rows = select.query_map([actor_id], |row| {
                let owner: String = row.get(5)?;
                Ok((owner, schedule_row(row, actor_id)?))
            })?;
            rows.map(|row| {
                let (owner, stored) = row?;
                if owner != actor_id {
                    return Err(Error::corrupt(format!(
                        "the index schedules_by_actor is damaged: the schedules of actor \
                         {actor_id} include schedule {} of actor {owner}",
                        stored.schedule.id
                    )));
                }
                Ok(stored)
            })
            .collect::<Result<Vec<_>>>()
        })
    }

    /// One schedule by id, if it is still pending.
    pub fn schedule(&self, id: &str) -> Result<Option<StoredSchedule>> {
        self.read(|conn| {
            let row = conn
                .prepare_cached(
                    "SELECT id, at_ms, action, args, attempts, actor_id \
                     FROM schedules NOT INDEXED \
                     WHERE rowid = (SELECT rowid FROM schedules WHERE id = ?1)",
                )?
                .query_row([id], |row| {
                    let actor_id: String = row.get(5)?;
                    schedule_row(row, &actor_id)
                })
                .optional()?;
            let found = row.as_ref().map(|row| row.schedule.id.as_str());
            check_found_id("schedules", id, found)?;
            Ok::<_, Error>(row)
        })
    }

    /// Every pending schedule, for the alarm timer at start-up.
    pub fn all_schedules(&self) -> Result<Vec<(String, String, i64)>> {
        self.read(|conn| {
            let mut select = conn.prepare_cached("SELECT id, actor_id, at_ms FROM schedules")?;
            let rows = select.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            rows.collect()
        })
    }

    /// Actors in `(name, key)` order, of type `name` if given, strictly after the actor
    /// `after` names by `(name, key)`, at most `limit` of them.
    pub fn list_actors(
        &self,
        name: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<ActorListing>> {
        let (after_name, after_key) = after.unzip();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|conn| {
            let mut select = conn.prepare_cached(
                "SELECT id, name, key, created_at FROM actors \
                 WHERE (?1 IS NULL OR name = ?1) AND (?2 IS NULL OR (name, key) > (?2, ?3)) \
                 ORDER BY name, key LIMIT ?4",
            )?;
            let rows = select.query_map(
                rusqlite::params![name, after_name, after_key, limit],
                listing_row,
            )?;
            rows.collect()
        })
    }

    /// One actor's listing by id.
    pub fn actor_listing(&self, id: &str) -> Result<Option<ActorListing>> {
        self.read(|conn| {
            conn.prepare_cached("SELECT id, name, key, created_at FROM actors WHERE id = ?1")?
                .query_row([id], listing_row)
                .optional()
        })
    }

    /// KV entries whose key starts with `prefix` and comes strictly after `after` (if given),
    /// in key order, at most `limit` of them.
    pub fn kv_page(
        &self,
        actor_id: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let upper = prefix_successor(prefix);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|conn| {
            let mut select = conn.prepare_cached(
                "SELECT key, value FROM kv WHERE actor_id = ?1 AND key >= ?2 \
                 AND (?3 IS NULL OR key < ?3) AND (?4 IS NULL OR key > ?4) \
                 ORDER BY key LIMIT ?5",
            )?;
            let rows = select.query_map(
                rusqlite::params![actor_id, prefix, upper, after, limit],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            rows.collect()
        })
    }
}

#[cfg(test)]
impl Store {
    /// Holds the read pool's lock until the guard drops: a test's stand-in for a read that
    /// is stuck in SQLite (a busy database, a slow disk).
    pub(crate) fn hold_readers(&self) -> impl Drop + '_ {
        self.readers.lock()
    }
}

/// The store's read connections.
#[derive(Default)]
struct Readers {
    idle: Vec<Connection>,
    /// Idle and in use.
    open: usize,
}

/// Opens a connection to `path` with keel's pragmas. `writer` connections set the durability.
fn connect(path: &Path, durability: Durability, writer: bool) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    // With faults configured for this database, the connection opens through their VFS.
    let conn = match crate::faults::FaultState::for_path(path) {
        Some(_) => Connection::open_with_flags_and_vfs(path, flags, crate::faults::VFS_NAME),
        None => Connection::open_with_flags(path, flags),
    }
    .map_err(|e| classify(path, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(|e| classify(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::corrupt(format!(
            "the database at {} cannot be switched to WAL mode (it stays in {mode} mode)",
            path.display()
        )));
    }
    if writer {
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Relaxed => "NORMAL",
        };
        conn.execute_batch(&format!("PRAGMA synchronous = {sync};"))?;
    }
    Ok(conn)
}

/// Maps "this is not a database" and "this is malformed" failures to `storage.corrupt`.
fn classify(path: &Path, err: rusqlite::Error) -> Error {
    if crate::error::sqlite_reports_damage(&err) {
        Error::StorageCorrupt {
            detail: format!(
                "the database at {} is damaged or not a database: {err}",
                path.display()
            ),
            actor_id: None,
            source: Some(err),
        }
    } else {
        Error::Storage(err)
    }
}

/// Checks an existing database before anything writes to it, and returns its commit counter
/// (0 for a missing or empty file, or for one from before the counter existed).
///
/// The connection never changes the file: it sets no pragma and does not checkpoint when it
/// closes, so a damaged log stays as it was found.
fn inspect(path: &Path) -> Result<i64> {
    if !path.exists() {
        return Ok(0);
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e))?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let version = schema_version(path, &conn)?;
    let found = schema_of(&conn).map_err(|e| classify(path, e))?;
    let expected = expected_schema(version)?;
    if found != expected {
        let names = |objects: &[SchemaObject]| {
            let mut names: Vec<&str> = objects.iter().map(|object| object.1.as_str()).collect();
            names.dedup();
            names.join(", ")
        };
        return Err(Error::corrupt(format!(
            "the file at {} is not a keel database: at schema version {version} keel's schema \
             holds [{}], but the file holds [{}]. keel has not changed it",
            path.display(),
            names(&expected),
            names(&found),
        )));
    }
    if version == 0 {
        return Ok(0);
    }
    integrity::check_file(&conn, path)?;
    if version < 2 {
        return Ok(0);
    }
    integrity::commit_seq(&conn).map_err(|e| classify(path, e))
}

/// One schema object: type, name, table, and its SQL with whitespace collapsed.
type SchemaObject = (String, String, String, Option<String>);

/// The schema objects in `conn`'s main database, in a fixed order. Statistics tables that
/// `ANALYZE` adds are left out: running it on keel's database does not make it foreign.
fn schema_of(conn: &Connection) -> rusqlite::Result<Vec<SchemaObject>> {
    let mut select = conn.prepare(
        "SELECT type, name, tbl_name, sql FROM sqlite_schema \
         WHERE name NOT LIKE 'sqlite_stat%' ORDER BY name, type",
    )?;
    let rows = select.query_map([], |row| {
        let sql: Option<String> = row.get(3)?;
        Ok((
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            sql.map(|sql| sql.split_whitespace().collect::<Vec<_>>().join(" ")),
        ))
    })?;
    rows.collect()
}

/// The schema keel's migrations create up to `version`, built in memory.
fn expected_schema(version: i64) -> Result<Vec<SchemaObject>> {
    let conn = Connection::open_in_memory()?;
    for migration in MIGRATIONS.iter().take(version as usize) {
        conn.execute_batch(migration)?;
    }
    Ok(schema_of(&conn)?)
}

/// The file's schema version, refusing one written by a newer keel.
fn schema_version(path: &Path, conn: &Connection) -> Result<i64> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| classify(path, e))?;
    if version > SCHEMA_VERSION {
        return Err(Error::StorageTooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(version)
}

/// The side file a new database is built in, beside `path`, before it takes its place.
fn building_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

/// Builds a new database at `path`, which does not exist: the whole schema at once.
///
/// Migrating an empty file step by step costs about ten fsyncs (switching an empty file to
/// WAL mode goes through a rollback journal, then each migration is its own synced commit),
/// which was most of the time a first start spent opening storage. Instead the database is
/// built in a side file with syncs off (every migration in one transaction, then the switch
/// to WAL mode), synced once, and renamed into place; then the directory is synced. A crash
/// meanwhile leaves no database at `path`, only a stale side file that the next build
/// replaces, so a database that exists is always a complete one.
fn create(path: &Path) -> Result<()> {
    let building = building_path(path);
    for stale in ["", "-journal", "-wal", "-shm"] {
        let mut name = building.as_os_str().to_owned();
        name.push(stale);
        match std::fs::remove_file(&name) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(Error::io(
                    format!("removing {}", Path::new(&name).display()),
                    err,
                ))
            }
        }
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(&building, flags)?;
    // Nothing here needs to survive a crash: the file is synced whole before it is renamed.
    let _: String = conn.query_row("PRAGMA journal_mode = MEMORY", [], |row| row.get(0))?;
    conn.execute_batch("PRAGMA synchronous = OFF;")?;
    let mut script = String::from("BEGIN IMMEDIATE;");
    for migration in MIGRATIONS {
        script.push_str(migration);
        script.push(';');
    }
    script.push_str(&format!("PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"));
    conn.execute_batch(&script)?;
    // Written into the file's header, so every later connection opens it in WAL mode.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::corrupt(format!(
            "a new database at {} cannot be switched to WAL mode (it stays in {mode} mode)",
            building.display()
        )));
    }
    conn.close().map_err(|(_, err)| err)?;
    let synced = File::open(&building).and_then(|file| file.sync_all());
    synced.map_err(|e| Error::io(format!("syncing {}", building.display()), e))?;
    std::fs::rename(&building, path)
        .map_err(|e| Error::io(format!("renaming {} into place", building.display()), e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let synced = File::open(dir).and_then(|dir| dir.sync_all());
    synced.map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
    tracing::debug!(version = SCHEMA_VERSION, "created the database");
    Ok(())
}

fn migrate(path: &Path, conn: &Connection) -> Result<()> {
    let version = schema_version(path, conn)?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let next = index as i64 + 1;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {migration} PRAGMA user_version = {next}; COMMIT;"
        ))
        .map_err(|e| classify(path, e))?;
        tracing::debug!(version = next, "migrated database schema");
    }
    Ok(())
}

/// The id of the actor with this type name and canonical key, for the store's reads and the
/// writer's creations alike. The index only finds the rowid; the row is then read by it, and
/// its own name and key must match, so a damaged index entry that points at another actor's
/// row is reported as damage, never answered with that actor.
pub(crate) fn actor_id_by_key(conn: &Connection, name: &str, key: &str) -> Result<Option<String>> {
    let row: Option<(String, String, String)> = conn
        .prepare_cached(
            "SELECT id, name, key FROM actors NOT INDEXED \
             WHERE rowid = (SELECT rowid FROM actors WHERE name = ?1 AND key = ?2)",
        )?
        .query_row((name, key), |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    match row {
        Some((id, found_name, found_key)) if found_name != name || found_key != key => {
            Err(Error::corrupt(format!(
                "the key index of the actors table is damaged: type {name:?} key {key:?} leads \
                 to actor {id}, whose type is {found_name:?} and key {found_key:?}"
            )))
        }
        row => Ok(row.map(|(id, _, _)| id)),
    }
}

/// Damage unless the row that `table`'s id index found for `wanted` has that id.
fn check_found_id(table: &str, wanted: &str, found: Option<&str>) -> Result<()> {
    match found {
        Some(found) if found != wanted => Err(Error::corrupt(format!(
            "the id index of the {table} table is damaged: id {wanted} leads to the row of {found}"
        ))),
        _ => Ok(()),
    }
}

fn listing_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ActorListing> {
    Ok(ActorListing {
        id: row.get(0)?,
        name: row.get(1)?,
        key: row.get(2)?,
        created_at_ms: row.get(3)?,
    })
}

fn schedule_row(row: &rusqlite::Row<'_>, actor_id: &str) -> rusqlite::Result<StoredSchedule> {
    Ok(StoredSchedule {
        actor_id: actor_id.to_string(),
        schedule: Schedule {
            id: row.get(0)?,
            at_ms: row.get(1)?,
            action: row.get(2)?,
            args: row.get(3)?,
        },
        attempts: row.get(4)?,
    })
}

/// The smallest byte string greater than every string that starts with `prefix`, or `None`
/// if there is none (the prefix is empty or all `0xff`).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < 0xff {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_reads_share_a_bounded_set_of_connections() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::Full).unwrap();
        // Twice as many reads as connections, each held long enough that all are under way
        // at once: the pool opens no more than its bound, and every read still completes.
        let reads = 2 * MAX_READERS;
        let done: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..reads)
                .map(|_| {
                    scope.spawn(|| {
                        store.read(|conn| {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            conn.query_row("SELECT count(*) FROM actors", [], |row| {
                                row.get::<_, i64>(0)
                            })
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(done.iter().all(|read| matches!(read, Ok(0))), "{done:?}");
        assert_eq!(store.open_readers(), MAX_READERS);
        store.close();
    }

    #[test]
    fn prefix_successors() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[0x61, 0xff]), Some(vec![0x62]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
        assert_eq!(prefix_successor(b""), None);
    }

    /// Every table, index, and the version, as the step-by-step migration of an empty file
    /// leaves them.
    fn migrated_step_by_step(dir: &Path) -> (Vec<SchemaObject>, i64) {
        let path = dir.join("stepwise.db");
        let conn = connect(&path, Durability::Full, true).unwrap();
        migrate(&path, &conn).unwrap();
        (
            schema_of(&conn).unwrap(),
            schema_version(&path, &conn).unwrap(),
        )
    }

    #[test]
    fn a_new_database_is_built_whole_in_wal_mode_with_nothing_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::Full).unwrap();
        drop(store);
        let path = dir.path().join(DB_FILE);
        // The header says WAL (bytes 18 and 19 are 2) before any connection switches it.
        let header = std::fs::read(&path).unwrap();
        assert_eq!(&header[18..20], &[2, 2], "the new file is not in WAL mode");
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let built = (
            schema_of(&conn).unwrap(),
            schema_version(&path, &conn).unwrap(),
        );
        assert_eq!(built, migrated_step_by_step(dir.path()));
        assert_eq!(built.1, SCHEMA_VERSION);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(DB_FILE) && name.contains(".new"))
            .collect();
        assert!(names.is_empty(), "left beside the database: {names:?}");
    }

    #[test]
    fn a_build_interrupted_by_a_crash_leaves_no_database_and_is_redone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        // What a crash in the middle of a build leaves: a half-written side file and its log.
        let building = building_path(&path);
        std::fs::write(&building, vec![0x5au8; 4096]).unwrap();
        let mut wal = building.as_os_str().to_owned();
        wal.push("-wal");
        std::fs::write(&wal, vec![0x5au8; 100]).unwrap();
        let store = Store::open(dir.path(), Durability::Full).unwrap();
        assert_eq!(store.find_by_key("counter", "a").unwrap(), None);
        drop(store);
        assert!(!building.exists() && !Path::new(&wal).exists());
        // Opened again, it is the database just built, checked like any other.
        Store::open(dir.path(), Durability::Full).unwrap();
    }

    #[test]
    fn a_second_open_of_one_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path(), Durability::Full).unwrap();
        let err = Store::open(dir.path(), Durability::Full).err().unwrap();
        assert_eq!((err.group(), err.code()), ("storage", "locked"));
        drop(first);
        Store::open(dir.path(), Durability::Full).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_database_is_reported_not_reset() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = vec![0x5au8; 8192];
        std::fs::write(dir.path().join(DB_FILE), &garbage).unwrap();
        let err = Store::open(dir.path(), Durability::Full).err().unwrap();
        assert_eq!(err.code(), "corrupt");
        assert_eq!(std::fs::read(dir.path().join(DB_FILE)).unwrap(), garbage);
    }

    #[test]
    fn a_database_from_before_the_commit_counter_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), Durability::Full).unwrap());
        // What schema version 1 left: no commits table, no commit record, no conns table, no SQL log.
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(
            "DROP TABLE commits; DROP TABLE conns; DROP TABLE db_log; PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(conn);
        std::fs::remove_file(dir.path().join(integrity::COMMITS_FILE)).unwrap();
        let store = Store::open(dir.path(), Durability::Full).unwrap();
        let conn = store.connect(false).unwrap();
        assert_eq!(integrity::commit_seq(&conn).unwrap(), 0);
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_database_from_before_durable_connections_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), Durability::Full).unwrap());
        // What schema version 2 left: no conns table (nor the later SQL log).
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch("DROP TABLE conns; DROP TABLE db_log; PRAGMA user_version = 2;")
            .unwrap();
        drop(conn);
        let store = Store::open(dir.path(), Durability::Full).unwrap();
        let conn = store.connect(false).unwrap();
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'conns'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(tables, 1, "the conns table is created");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), Durability::Full).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(conn);
        let err = Store::open(dir.path(), Durability::Full).err().unwrap();
        assert_eq!(err.code(), "too_new");
    }
}
