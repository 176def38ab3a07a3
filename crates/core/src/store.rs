//! The SQLite database behind every actor: opening, locking, schema migrations and reads.
//!
//! One process owns a data directory at a time: `open` takes an exclusive lock on a `LOCK`
//! file beside the database and keeps it for the store's lifetime, so a second process gets
//! `storage.locked`. The schema is versioned with `PRAGMA user_version` and only migrates
//! forward; a database from a newer keel, or a file that is not a database, is an error and is
//! never reset. All writes go through the group-commit writer (`writer.rs`); this module only
//! reads, through a small pool of read connections that WAL mode lets run beside the writer.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::config::Durability;
use crate::error::{Error, Result};
use crate::host::{Encoding, Payload, Schedule};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "keel.db";
/// File name of the process lock inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

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
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

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

/// The open database: the process lock, the path, and the read pool.
pub struct Store {
    path: PathBuf,
    durability: Durability,
    /// Idle read connections; a reader takes one and puts it back.
    readers: Mutex<Vec<Connection>>,
    /// Held until [`Store::close`] or drop; releasing it hands the directory to other processes.
    lock: Mutex<Option<File>>,
    /// Set by [`Store::close`]; reads fail afterwards.
    closed: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`, locks the directory and migrates
    /// the schema.
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
        let store = Store {
            path,
            durability,
            readers: Mutex::new(Vec::new()),
            lock: Mutex::new(Some(lock)),
            closed: std::sync::atomic::AtomicBool::new(false),
        };
        let conn = store.connect(true)?;
        store.migrate(&conn)?;
        store.readers.lock().push(store.connect(false)?);
        Ok(Arc::new(store))
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens a connection with keel's pragmas. `writer` connections set the durability.
    pub(crate) fn connect(&self, writer: bool) -> Result<Connection> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        // With faults configured for this database, the connection opens through their VFS.
        let conn = match crate::faults::FaultState::for_path(&self.path) {
            Some(_) => {
                Connection::open_with_flags_and_vfs(&self.path, flags, crate::faults::VFS_NAME)
            }
            None => Connection::open_with_flags(&self.path, flags),
        }
        .map_err(|e| self.classify(e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // The first statement that reads the file is where a corrupt file shows itself.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(|e| self.classify(e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::StorageCorrupt {
                path: self.path.display().to_string(),
                source: rusqlite::Error::InvalidQuery,
            });
        }
        if writer {
            let sync = match self.durability {
                Durability::Full => "FULL",
                Durability::Relaxed => "NORMAL",
            };
            conn.execute_batch(&format!("PRAGMA synchronous = {sync};"))?;
        }
        Ok(conn)
    }

    /// Maps "this is not a database" failures to `storage.corrupt`.
    fn classify(&self, err: rusqlite::Error) -> Error {
        let corrupt = matches!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::NotADatabase) | Some(rusqlite::ErrorCode::DatabaseCorrupt)
        );
        if corrupt {
            Error::StorageCorrupt {
                path: self.path.display().to_string(),
                source: err,
            }
        } else {
            Error::Storage(err)
        }
    }

    fn migrate(&self, conn: &Connection) -> Result<()> {
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|e| self.classify(e))?;
        if version > SCHEMA_VERSION {
            return Err(Error::StorageTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let next = index as i64 + 1;
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; {migration} PRAGMA user_version = {next}; COMMIT;"
            ))
            .map_err(|e| self.classify(e))?;
            tracing::debug!(version = next, "migrated database schema");
        }
        Ok(())
    }

    /// Closes the read connections and releases the directory lock. The writer must already
    /// be closed; reads fail afterwards with `registry.shut_down`.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.readers.lock().clear();
        if let Some(lock) = self.lock.lock().take() {
            if let Err(err) = lock.unlock() {
                tracing::warn!(error = %err, "releasing the data directory lock failed");
            }
        }
    }

    /// Runs `f` with a pooled read connection.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::RegistryShutDown);
        }
        let conn = match self.readers.lock().pop() {
            Some(conn) => conn,
            None => self.connect(false)?,
        };
        let result = f(&conn);
        self.readers.lock().push(conn);
        result.map_err(|e| self.classify(e))
    }

    /// Looks an actor up by type name and canonical key.
    pub fn find_by_key(&self, name: &str, key: &str) -> Result<Option<ActorRecord>> {
        self.read(|conn| {
            conn.prepare_cached("SELECT id FROM actors WHERE name = ?1 AND key = ?2")?
                .query_row((name, key), |row| {
                    Ok(ActorRecord {
                        id: row.get(0)?,
                        name: name.to_string(),
                        key: key.to_string(),
                    })
                })
                .optional()
        })
    }

    /// Looks an actor up by id.
    pub fn find_by_id(&self, id: &str) -> Result<Option<ActorRecord>> {
        self.read(|conn| {
            conn.prepare_cached("SELECT name, key FROM actors WHERE id = ?1")?
                .query_row([id], |row| {
                    Ok(ActorRecord {
                        id: id.to_string(),
                        name: row.get(0)?,
                        key: row.get(1)?,
                    })
                })
                .optional()
        })
    }

    /// Loads what an actor's task needs to start.
    pub fn load(&self, id: &str) -> Result<Option<ActorSnapshot>> {
        self.read(|conn| {
            conn.prepare_cached("SELECT state, input, input_encoding FROM actors WHERE id = ?1")?
                .query_row([id], |row| {
                    let input: Option<Vec<u8>> = row.get(1)?;
                    let encoding: Option<String> = row.get(2)?;
                    Ok(ActorSnapshot {
                        state: row.get(0)?,
                        input: input.map(|bytes| Payload {
                            encoding: encoding
                                .as_deref()
                                .and_then(Encoding::parse)
                                .unwrap_or_default(),
                            bytes,
                        }),
                    })
                })
                .optional()
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
                "SELECT id, at_ms, action, args, attempts FROM schedules \
                 WHERE actor_id = ?1 ORDER BY at_ms, id",
            )?;
            let rows = select.query_map([actor_id], |row| schedule_row(row, actor_id))?;
            rows.collect()
        })
    }

    /// One schedule by id, if it is still pending.
    pub fn schedule(&self, id: &str) -> Result<Option<StoredSchedule>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT id, at_ms, action, args, attempts, actor_id FROM schedules WHERE id = ?1",
            )?
            .query_row([id], |row| {
                let actor_id: String = row.get(5)?;
                schedule_row(row, &actor_id)
            })
            .optional()
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
    fn prefix_successors() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[0x61, 0xff]), Some(vec![0x62]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
        assert_eq!(prefix_successor(b""), None);
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
