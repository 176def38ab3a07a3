//! Keeps damage on disk from being served as data.
//!
//! SQLite reports some damage itself (a page that is not a b-tree page, a file that is not a
//! database), but reads much of it without complaint: a write-ahead log that lost its last
//! frames, or one whose frame checksum fails, silently ends where the damage starts, so the
//! database opens as it was some commits ago; a damaged index entry can point a lookup at
//! another row; a flipped bit inside a stored value is just another value. keel adds four
//! checks, and what must stay true is that each of them reports and never repairs, resets
//! or rewrites the file:
//!
//! - **An integrity check at open.** `PRAGMA integrity_check` runs before anything writes to
//!   the file: for 10,000 actors with 200-byte states (a 3.4 MB file) an open takes about
//!   15 ms instead of 1.6 ms, and the check grows linearly with the file (`quick_check` is
//!   about a third of it). It is the full check, not `quick_check`, because only the full
//!   one compares index entries with their rows: a key index that lost an entry would
//!   otherwise let a second actor be created for a key that has one.
//! - **A commit counter the log cannot roll back.** Every write transaction increments
//!   `commits.seq` inside the database, and right after each commit, before its replies leave,
//!   the writer writes the new value into a side file, [`COMMITS_FILE`], in place and without
//!   an fsync. At open, the database's counter must be at least the side file's; if it is
//!   lower, acknowledged commits are missing and the open is refused. The side file is written
//!   after the commit, so a crash between the two leaves it behind the database, never ahead:
//!   a healthy database is never refused. With `durability: "full"` the log is synced before
//!   the side file is written, so even a power loss cannot leave the side file ahead of the
//!   log. The cost is one more page in each commit's log frames and one `pwrite`, not an
//!   fsync: over 2,000 sequential fsync-bound commits (about 305 us each) the difference was
//!   within noise. With `"relaxed"` a power loss may legitimately lose the last commits, which
//!   keel cannot tell apart from damage, so the side file is written only at open (a shortfall
//!   against a relaxed record is a warning), and the counter counts opens instead of commits:
//!   each open increments it once, in a synced commit of its own, before the side file is
//!   written, and relaxed commits leave it alone. A log rolled back past the last open (a
//!   lost or truncated log, an older copy of the file) still falls behind the side file, as
//!   it would with a count per commit, since the side file was written at that open either
//!   way; a count per commit could see no more, because the record is not written after
//!   relaxed commits. It saves each relaxed commit the counter's page: an update, a read and
//!   a second page of log frames.
//! - **A damage latch at run time.** An SQLite corruption error, or a row that does not match
//!   the key or id it was looked up by, marks the store damaged: every later read and commit
//!   fails with `storage.corrupt`, and an integrity check runs once, for the log.
//! - **Well-formed values.** A stored state or input is checked before the host sees it, so
//!   damage inside a value is `storage.corrupt` for that actor, not a failure of user code.
//!
//! Limits: damage that leaves a value well-formed (a flipped bit inside a number) is not
//! detected; lost commits are noticed only while the side file survives, and with relaxed
//! durability a shortfall is only a warning. A missing or unreadable side file is not an
//! error (keel writes it afresh), so deleting it is how an operator accepts a database as it
//! is. An index that loses an entry while keel runs is found only at the next open.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags};

use crate::config::Durability;
use crate::error::{Error, Result};
use crate::host::Encoding;

/// File name of the side file that records the last acknowledged commit.
pub const COMMITS_FILE: &str = "keel.db-commits";

/// The side file's first bytes.
const MARK_MAGIC: &[u8; 8] = b"keelseq1";
/// The side file's length: magic, counter, its complement, durability, padding.
const MARK_LEN: usize = 32;
/// How many problems a refusal quotes from the integrity check.
const MAX_REPORTED_PROBLEMS: usize = 5;

/// What the side file says: the commit count at the last acknowledged commit, and whether the
/// commits were made with relaxed durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    pub(crate) seq: i64,
    pub(crate) relaxed: bool,
}

impl Mark {
    fn encode(self) -> [u8; MARK_LEN] {
        let mut bytes = [0u8; MARK_LEN];
        bytes[..8].copy_from_slice(MARK_MAGIC);
        bytes[8..16].copy_from_slice(&self.seq.to_le_bytes());
        bytes[16..24].copy_from_slice(&(!self.seq).to_le_bytes());
        bytes[24] = u8::from(self.relaxed);
        bytes
    }

    /// The mark in `bytes`, or `None` if they are not a whole, consistent record.
    fn decode(bytes: &[u8]) -> Option<Mark> {
        if bytes.len() != MARK_LEN || &bytes[..8] != MARK_MAGIC || bytes[24] > 1 {
            return None;
        }
        let seq = i64::from_le_bytes(bytes[8..16].try_into().ok()?);
        let check = i64::from_le_bytes(bytes[16..24].try_into().ok()?);
        (check == !seq && seq >= 0).then_some(Mark {
            seq,
            relaxed: bytes[24] == 1,
        })
    }
}

/// Reads the side file at `path`: `None` if there is none. One that cannot be read as a mark
/// (torn by a power loss, say) is logged and treated as absent: it can only weaken the check,
/// never refuse a healthy database.
pub(crate) fn read_mark(path: &Path) -> Result<Option<Mark>> {
    let mut bytes = Vec::with_capacity(MARK_LEN);
    match File::open(path) {
        Ok(mut file) => file
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(Error::io(format!("opening {}", path.display()), err)),
    };
    let mark = Mark::decode(&bytes);
    if mark.is_none() {
        tracing::warn!(path = %path.display(), "the commit record is unreadable; not checking the commit history this time");
    }
    Ok(mark)
}

/// Refuses a database whose commit counter (`found`) is behind the side file's `mark`: the
/// commits in between were acknowledged and are gone.
pub(crate) fn check_history(
    db: &Path,
    mark_path: &Path,
    found: i64,
    mark: Option<Mark>,
) -> Result<()> {
    let Some(mark) = mark.filter(|mark| mark.seq > found) else {
        return Ok(());
    };
    if mark.relaxed {
        tracing::warn!(
            expected = mark.seq,
            found,
            "the database holds fewer commits than were acknowledged; with relaxed durability \
             a power loss can do this, so keel opens it as it is"
        );
        return Ok(());
    }
    let (found, cause) = if db.exists() {
        (
            format!("holds {found} commits"),
            "its write-ahead log was truncated or damaged, or the file was replaced by an older \
             copy",
        )
    } else {
        ("is missing".to_string(), "it was deleted or moved")
    };
    Err(Error::corrupt(format!(
        "the database at {} {found}, but {} commits were acknowledged (recorded in {}): \
         {cause}. keel has changed nothing. Restore the data directory from a backup, or \
         delete {} to accept the database as it is without the missing commits",
        db.display(),
        mark.seq,
        mark_path.display(),
        mark_path.display(),
    )))
}

/// Runs `PRAGMA integrity_check` on `conn`; damage is `storage.corrupt` quoting the first
/// problems it lists.
pub(crate) fn check_file(conn: &Connection, db: &Path) -> Result<()> {
    let problems = integrity_problems(conn).map_err(|err| {
        if crate::error::sqlite_reports_damage(&err) {
            Error::StorageCorrupt {
                detail: format!("the database at {} is damaged: {err}", db.display()),
                actor_id: None,
                source: Some(err),
            }
        } else {
            Error::Storage(err)
        }
    })?;
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::corrupt(format!(
        "the database at {} is damaged: {}",
        db.display(),
        problems.join("; ")
    )))
}

/// The integrity check's findings; empty when the file is sound.
fn integrity_problems(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut check = conn.prepare(&format!("PRAGMA integrity_check({MAX_REPORTED_PROBLEMS})"))?;
    let lines = check.query_map([], |row| row.get::<_, String>(0))?;
    let lines: Vec<String> = lines.collect::<rusqlite::Result<_>>()?;
    Ok(if lines == ["ok"] { Vec::new() } else { lines })
}

/// The database's commit counter.
pub(crate) fn commit_seq(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT seq FROM commits", [], |row| row.get(0))
}

/// Under `relaxed` durability: increments the commit counter once for this open, in a synced
/// commit of its own, and returns its new value (see the module doc: relaxed commits leave
/// the counter alone).
pub(crate) fn count_open(conn: &Connection) -> rusqlite::Result<i64> {
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         BEGIN IMMEDIATE;
         UPDATE commits SET seq = seq + 1;
         COMMIT;
         PRAGMA synchronous = NORMAL;",
    )?;
    commit_seq(conn)
}

/// Increments the commit counter inside the writer's transaction and returns its new value.
///
/// Two statements, not `UPDATE … RETURNING`: SQLite gathers a `RETURNING` clause's rows in an
/// ephemeral table, which cost about 33,000 instructions per commit on the sequential path
/// (a b-tree opened and a zeroed page allocated every time) against about 8,000 for the plain
/// update and the read back, in the same transaction (bench/README.md, fourth pass).
pub(crate) fn next_commit_seq(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<i64> {
    tx.prepare_cached("UPDATE commits SET seq = seq + 1")?
        .execute([])?;
    tx.prepare_cached("SELECT seq FROM commits")?
        .query_row([], |row| row.get(0))
}

/// Whether `bytes` are one whole, well-formed value in `encoding`; for CBOR, one that keel's
/// value decoder accepts (see `cbor.rs`).
pub(crate) fn well_formed(encoding: Encoding, bytes: &[u8]) -> bool {
    match encoding {
        Encoding::Cbor => crate::cbor::skip(bytes, 0).is_ok_and(|end| end == bytes.len()),
        Encoding::Json => serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok(),
    }
}

/// The open database's health, shared by the store's readers and the writer: the damage
/// latch and the side file.
pub(crate) struct Integrity {
    path: PathBuf,
    relaxed: bool,
    /// Set, with its description, the first time damage is seen at run time.
    damage: OnceLock<String>,
    /// The side file, written in place after every commit.
    marks: Mutex<File>,
}

impl Integrity {
    /// Starts tracking the database at `path`, whose counter stands at `seq`: the side file
    /// at `mark_path` is (re)written with it and synced once, so it exists before the first
    /// commit is acknowledged.
    pub(crate) fn open(
        path: PathBuf,
        mark_path: &Path,
        seq: i64,
        durability: Durability,
    ) -> Result<Integrity> {
        let context = || format!("writing {}", mark_path.display());
        let mut file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(mark_path)
            .map_err(|e| Error::io(context(), e))?;
        let relaxed = durability == Durability::Relaxed;
        file.set_len(MARK_LEN as u64)
            .and_then(|()| file.write_all(&Mark { seq, relaxed }.encode()))
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(context(), e))?;
        Ok(Integrity {
            path,
            relaxed,
            damage: OnceLock::new(),
            marks: Mutex::new(file),
        })
    }

    /// Fails with `storage.corrupt` once damage has been seen.
    pub(crate) fn check(&self) -> Result<()> {
        match self.damage.get() {
            Some(detail) => Err(Error::corrupt(detail.clone())),
            None => Ok(()),
        }
    }

    /// Passes `err` through, unless it reports damage: then the store is latched damaged and
    /// the error becomes `storage.corrupt`. The first time, the whole file is checked and the
    /// findings are logged.
    pub(crate) fn observe(&self, err: Error) -> Error {
        if !err.is_corruption() {
            return err;
        }
        let (detail, source) = match err {
            Error::StorageCorrupt { detail, source, .. } => (detail, source),
            Error::Storage(source) => (
                format!("SQLite found damage in {}: {source}", self.path.display()),
                Some(source),
            ),
            other => (other.to_string(), None),
        };
        let mut first = false;
        self.damage.get_or_init(|| {
            first = true;
            format!("{detail}; keel stopped reading and writing the database when it found this")
        });
        if first {
            tracing::error!(error = %detail, "the database is damaged; refusing every further read and commit");
            self.log_check();
        }
        Error::StorageCorrupt {
            detail,
            actor_id: None,
            source,
        }
    }

    /// Runs the integrity check on a fresh connection and logs what it finds.
    fn log_check(&self) {
        let result = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(Error::Storage)
            .and_then(|conn| check_file(&conn, &self.path));
        match result {
            Ok(()) => tracing::error!("the integrity check after the damage found nothing more"),
            Err(err) => tracing::error!(error = %err, "the integrity check after the damage"),
        }
    }

    /// Increments the commit counter in `tx`, a write transaction, and returns the value to
    /// [`Integrity::record`] once it is durable; with relaxed durability nothing, since
    /// commits leave the counter alone there.
    pub(crate) fn count_commit(
        &self,
        tx: &rusqlite::Transaction<'_>,
    ) -> rusqlite::Result<Option<i64>> {
        if self.relaxed {
            return Ok(None);
        }
        next_commit_seq(tx).map(Some)
    }

    /// Records that the commit numbered `seq` is durable. A failure weakens the next open's
    /// check but loses no data, so it is logged and the commit stands. With relaxed
    /// durability nothing is recorded: a shortfall could only be a warning there, and the
    /// write would cost about a quarter of a relaxed commit.
    pub(crate) fn record(&self, seq: i64) {
        if self.relaxed {
            return;
        }
        let mark = Mark {
            seq,
            relaxed: false,
        };
        if let Err(err) = write_mark(&self.marks.lock(), &mark.encode()) {
            tracing::warn!(error = %err, "recording the commit count failed");
        }
    }
}

/// Overwrites the side file's record in place, in one system call where there is one.
#[cfg(unix)]
fn write_mark(file: &File, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, 0)
}

#[cfg(not(unix))]
fn write_mark(mut file: &File, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(0))?;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_torn_ones_are_refused() {
        let mark = Mark {
            seq: 1234,
            relaxed: false,
        };
        assert_eq!(Mark::decode(&mark.encode()), Some(mark));
        let mut torn = mark.encode();
        torn[12] ^= 0x40;
        assert_eq!(Mark::decode(&torn), None);
        assert_eq!(Mark::decode(&[0u8; MARK_LEN]), None);
        assert_eq!(Mark::decode(&mark.encode()[..16]), None);
    }

    #[test]
    fn values_must_be_whole_and_well_formed() {
        assert!(well_formed(Encoding::Cbor, &[0xa1, 0x61, b'a', 0x01]));
        assert!(
            !well_formed(Encoding::Cbor, &[0xa1, 0x61, b'a']),
            "truncated"
        );
        assert!(
            !well_formed(Encoding::Cbor, &[0x01, 0x02]),
            "trailing bytes"
        );
        assert!(well_formed(Encoding::Json, br#"{"count": 1}"#));
        assert!(!well_formed(Encoding::Json, br#"{"count": 1"#));
    }
}
