//! Each actor's own SQL database (`c.db`): one SQLite file per actor, whose changes commit
//! atomically with the rest of the call through keel.db's log.
//!
//! Layout: `<data dir>/keel.db.actors/<actor id>.db` (with its `-wal` and `-shm` while it is
//! open), opened when the actor starts and closed when it stops; one thread per open
//! database runs its statements, off the async workers.
//!
//! How a call's SQL commits, and what must stay true:
//! - A call's statements run in one transaction on the actor's file (begun at its first
//!   statement), with SQLite's session extension recording what they change. At the end of
//!   the call, [`ActorDb::prepare`] takes the changes as a changeset; it travels in the call's
//!   commit to keel.db as one `db_log` row with the actor's next sequence number, in the same
//!   batch as the call's state, KV and schedules. Only once that commit is released `Ok` does
//!   [`ActorDb::finish`] commit the file's transaction, storing the sequence number in the
//!   file (`_keel_applied`) in that same transaction; a failed commit rolls it back. So a
//!   change is in the file only if its log row is durable, and keel.db is the truth.
//! - On open, log rows newer than the file's sequence number are applied to it (a crash
//!   between the two commits). Changesets are deterministic: replaying them gives the rows
//!   the call produced, whatever `random()` or `datetime('now')` returned then.
//! - The file's own commits are not flushed one by one (`synchronous = NORMAL` in WAL mode):
//!   the call's durability is its log row's, flushed with keel.db's commit, so a SQL-writing
//!   call costs one flush, not two. The file is flushed by a checkpoint when it opens and
//!   every [`SYNC_EVERY`] changes after that; only then is what it holds durable.
//! - The log keeps, per actor, the newest change the file holds durably (as of its last
//!   checkpoint) plus every newer one, so a power loss that takes the file back to its last
//!   checkpoint loses nothing; older rows are dropped by the commit that adds the next one. The file is
//!   not rebuilt from the log: a file that is missing while the log has rows, that is ahead of
//!   the log, or that misses rows the log dropped, is `storage.corrupt`, never reset.
//! - Another storage that keeps the truth elsewhere (the engine's, in `keel-envoy`) opens a
//!   local copy with [`open_copy`] instead: a fresh file per opening, made from an image the
//!   other storage kept ([`DbWatch::image`]) with the changes it logged after it applied; the
//!   call's transaction, limits and authorizer are the same.
//! - Schema changes (DDL) run only in `onMigrate`, in a transaction of their own committed to
//!   the file directly: a changeset cannot carry them, and they are idempotent by contract
//!   (`IF NOT EXISTS`, `PRAGMA user_version`), since they run on every start.
//! - User SQL goes through an authorizer: no `ATTACH`, no pragma other than read-only ones
//!   (and `user_version` in a migration), no transaction statements (keel owns the
//!   transaction), no access to keel's own `_keel` tables, no temporary objects, no schema
//!   change outside a migration. A statement running past the time limit is interrupted;
//!   the file cannot grow past its size limit (`max_page_count`).
//!
//! Why hand-written declarations of the session functions: rusqlite's `session` feature
//! builds SQLite's bindings with bindgen, which needs libclang at build time; the bundled
//! SQLite is compiled with the session extension by `.cargo/config.toml`'s flags instead, and
//! the handful of functions used here are declared below.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{oneshot, watch};

use crate::actor_type::DbConfig;
use crate::cbor;
use crate::error::{DbError, Error, Result};
use crate::storage::seam::{ActorDb, DbChange, MigrationStep};

/// The folder of actors' databases, next to keel.db.
pub const DB_DIR: &str = "keel.db.actors";

/// How many SQLite VM steps run between two checks of the statement deadline.
const PROGRESS_STEPS: i32 = 1000;

/// Each opening of a database gets the next token.
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

mod ffi {
    //! The session extension's functions, as `sqlite3.h` declares them.
    use std::ffi::{c_char, c_int, c_void};

    use rusqlite::ffi::sqlite3;

    /// `sqlite3_session`.
    #[repr(C)]
    pub struct Session {
        _opaque: [u8; 0],
    }
    /// `sqlite3_changeset_iter`.
    #[repr(C)]
    pub struct ChangesetIter {
        _opaque: [u8; 0],
    }

    /// `SQLITE_SESSION_OBJCONFIG_ROWID`: record tables without a primary key by rowid.
    pub const OBJCONFIG_ROWID: c_int = 2;
    /// `SQLITE_CHANGESET_ABORT`: a conflict handler's "stop and roll back".
    pub const CHANGESET_ABORT: c_int = 2;

    extern "C" {
        pub fn sqlite3session_create(
            db: *mut sqlite3,
            db_name: *const c_char,
            session: *mut *mut Session,
        ) -> c_int;
        pub fn sqlite3session_delete(session: *mut Session);
        pub fn sqlite3session_object_config(
            session: *mut Session,
            op: c_int,
            arg: *mut c_void,
        ) -> c_int;
        pub fn sqlite3session_attach(session: *mut Session, table: *const c_char) -> c_int;
        pub fn sqlite3session_changeset(
            session: *mut Session,
            len: *mut c_int,
            changeset: *mut *mut c_void,
        ) -> c_int;
        pub fn sqlite3changeset_apply(
            db: *mut sqlite3,
            len: c_int,
            changeset: *mut c_void,
            filter: Option<unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int>,
            conflict: Option<unsafe extern "C" fn(*mut c_void, c_int, *mut ChangesetIter) -> c_int>,
            context: *mut c_void,
        ) -> c_int;
    }
}

/// A session recording every table of `main`, deleted when dropped (before its connection).
struct Session(*mut ffi::Session);

impl Session {
    fn start(conn: &Connection) -> Result<Session> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: the handle is the live connection's; the session is deleted (on drop) before
        // the connection closes, since the worker drops its transaction first.
        let rc = unsafe { ffi::sqlite3session_create(conn.handle(), c"main".as_ptr(), &mut raw) };
        check_rc(conn, rc)?;
        let session = Session(raw);
        let mut on: std::ffi::c_int = 1;
        // SAFETY: `session.0` is a live session with no table attached yet.
        let rc = unsafe {
            ffi::sqlite3session_object_config(
                session.0,
                ffi::OBJCONFIG_ROWID,
                (&mut on as *mut std::ffi::c_int).cast(),
            )
        };
        check_rc(conn, rc)?;
        // SAFETY: a null table name attaches every table.
        let rc = unsafe { ffi::sqlite3session_attach(session.0, std::ptr::null()) };
        check_rc(conn, rc)?;
        Ok(session)
    }

    /// The changes recorded so far, as a changeset (empty if none).
    fn changeset(&self, conn: &Connection) -> Result<Vec<u8>> {
        let mut len = 0;
        let mut data = std::ptr::null_mut();
        // SAFETY: `self.0` is live; SQLite hands back a buffer that we copy and free.
        let rc = unsafe { ffi::sqlite3session_changeset(self.0, &mut len, &mut data) };
        check_rc(conn, rc)?;
        if data.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: SQLite wrote `len` bytes at `data`, which it allocated with sqlite3_malloc.
        let bytes = unsafe { std::slice::from_raw_parts(data as *const u8, len as usize) }.to_vec();
        // SAFETY: freed once, with SQLite's allocator.
        unsafe { rusqlite::ffi::sqlite3_free(data) };
        Ok(bytes)
    }
}

// SAFETY: a session is used only by the worker that owns its connection, and moves to the
// database's thread with it (before either is used there); it is never shared.
unsafe impl Send for Session {}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: created by sqlite3session_create and deleted once.
        unsafe { ffi::sqlite3session_delete(self.0) }
    }
}

fn check_rc(conn: &Connection, rc: std::ffi::c_int) -> Result<()> {
    if rc == rusqlite::ffi::SQLITE_OK {
        return Ok(());
    }
    // SAFETY: reads the connection's last error message.
    let message = unsafe {
        let text = rusqlite::ffi::sqlite3_errmsg(conn.handle());
        std::ffi::CStr::from_ptr(text)
            .to_string_lossy()
            .into_owned()
    };
    Err(Error::Storage(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rc),
        Some(message),
    )))
}

unsafe extern "C" fn abort_on_conflict(
    _context: *mut std::ffi::c_void,
    _kind: std::ffi::c_int,
    _iter: *mut ffi::ChangesetIter,
) -> std::ffi::c_int {
    ffi::CHANGESET_ABORT
}

/// Applies one logged changeset; any conflict aborts it (the file then is not the state the
/// change was recorded on).
fn apply_changeset(conn: &Connection, changeset: &[u8]) -> Result<()> {
    let len = std::ffi::c_int::try_from(changeset.len())
        .map_err(|_| Error::corrupt("a logged SQL change is too large to apply"))?;
    // SAFETY: SQLite only reads the buffer, for the duration of the call.
    let rc = unsafe {
        ffi::sqlite3changeset_apply(
            conn.handle(),
            len,
            changeset.as_ptr() as *mut std::ffi::c_void,
            None,
            Some(abort_on_conflict),
            std::ptr::null_mut(),
        )
    };
    check_rc(conn, rc)
}

/// Who is running SQL on the connection right now, for the authorizer.
const MODE_KEEL: u8 = 0;
const MODE_CALL: u8 = 1;
const MODE_MIGRATION: u8 = 2;

/// Pragmas user SQL may run with an argument: they read the schema.
const INSPECTING_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
];
/// Pragmas user SQL may read (never set).
const READ_PRAGMAS: &[&str] = &[
    "page_count",
    "page_size",
    "freelist_count",
    "data_version",
    "max_page_count",
];

fn authorize(mode: u8, ctx: &AuthContext<'_>) -> Authorization {
    if mode == MODE_KEEL {
        return Authorization::Allow;
    }
    if let Some(db) = ctx.database_name {
        if db != "main" {
            return Authorization::Deny;
        }
    }
    let migrating = mode == MODE_MIGRATION;
    let table = match ctx.action {
        AuthAction::Select | AuthAction::Recursive => return Authorization::Allow,
        AuthAction::Function { function_name } => {
            return if function_name.eq_ignore_ascii_case("load_extension") {
                Authorization::Deny
            } else {
                Authorization::Allow
            };
        }
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => {
            let name = pragma_name.to_ascii_lowercase();
            let allowed = INSPECTING_PRAGMAS.contains(&name.as_str())
                || (READ_PRAGMAS.contains(&name.as_str()) && pragma_value.is_none())
                || (name == "user_version" && (pragma_value.is_none() || migrating));
            return if allowed {
                Authorization::Allow
            } else {
                Authorization::Deny
            };
        }
        AuthAction::Read { table_name, .. }
        | AuthAction::Insert { table_name }
        | AuthAction::Update { table_name, .. }
        | AuthAction::Delete { table_name } => table_name,
        AuthAction::CreateTable { table_name }
        | AuthAction::CreateIndex { table_name, .. }
        | AuthAction::CreateTrigger { table_name, .. }
        | AuthAction::DropTable { table_name }
        | AuthAction::DropIndex { table_name, .. }
        | AuthAction::DropTrigger { table_name, .. }
        | AuthAction::AlterTable { table_name, .. }
        | AuthAction::Analyze { table_name } => {
            if !migrating {
                return Authorization::Deny;
            }
            table_name
        }
        AuthAction::CreateView { view_name } | AuthAction::DropView { view_name } => {
            if !migrating {
                return Authorization::Deny;
            }
            view_name
        }
        AuthAction::Reindex { index_name } => {
            if !migrating {
                return Authorization::Deny;
            }
            index_name
        }
        // ATTACH and DETACH, transactions and savepoints (keel owns the transaction), virtual
        // tables, temporary objects, and whatever this list does not know.
        _ => return Authorization::Deny,
    };
    if is_keel_table(table) {
        Authorization::Deny
    } else {
        Authorization::Allow
    }
}

fn is_keel_table(name: &str) -> bool {
    name.len() >= 5 && name[..5].eq_ignore_ascii_case("_keel")
}

/// The file of an actor's database in `dir`. Ids are keel's own (letters, digits, `-`,
/// `_`); any other byte is written as hex, so the name stays inside the folder.
pub fn db_path(dir: &Path, actor_id: &str) -> PathBuf {
    let mut name = String::with_capacity(actor_id.len() + 3);
    for byte in actor_id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            name.push(byte as char);
        } else {
            name.push_str(&format!("%{byte:02x}"));
        }
    }
    name.push_str(".db");
    dir.join(name)
}

/// Removes an actor's database and its side files; a missing file is no error.
pub(crate) fn remove_db(dir: &Path, actor_id: &str) -> Result<()> {
    remove_files(&db_path(dir, actor_id))
}

/// Removes the file at `path` and its side files; a missing file is no error.
fn remove_files(path: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut file = path.to_path_buf().into_os_string();
        file.push(suffix);
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(Error::io(format!("removing {}", path.display()), err)),
        }
    }
    Ok(())
}

/// Opens an actor's database as a local copy of one whose truth is kept elsewhere (the
/// engine's per-actor storage, `keel-envoy`): the file at `path` is made afresh from `image`
/// (a file [`DbWatch::image`] took; none: empty), then `log`'s changes newer than the image
/// are applied, exactly as [`SqliteActorDb::open`] applies keel.db's. Statements, limits, the
/// authorizer and the call's transaction are the embedded database's. The copy is not
/// synced to disk (it is rebuilt on every start); [`remove_copy`] removes it. Blocking.
pub fn open_copy(
    path: &Path,
    actor_id: &str,
    config: DbConfig,
    image: Option<&[u8]>,
    log: Vec<(u64, Vec<u8>)>,
) -> Result<Arc<dyn ActorDb>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    remove_files(path)?;
    if let Some(image) = image {
        std::fs::write(path, image)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    let db = SqliteActorDb::open_at(path, actor_id, config, false, log)?;
    Ok(Arc::new(db))
}

/// Removes a copy [`open_copy`] made (after its database closed). Blocking.
pub fn remove_copy(path: &Path) -> Result<()> {
    remove_files(path)
}

/// A second connection to an actor's database file, keel's own: it tells whether the file
/// changed since it last looked, and takes an image of the file, while the actor's own
/// connection holds no transaction. Blocking.
pub struct DbWatch {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// `PRAGMA data_version` at the last look: it changes when another connection commits.
    seen: Mutex<i64>,
}

impl DbWatch {
    /// Watches the database file at `path` (opened already).
    pub fn open(path: &Path) -> Result<DbWatch> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let seen = data_version(&conn)?;
        Ok(DbWatch {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            seen: Mutex::new(seen),
        })
    }

    /// Whether another connection committed to the file since the last call (or the opening).
    pub fn changed(&self) -> Result<bool> {
        let now = data_version(&self.conn.lock())?;
        let mut seen = self.seen.lock();
        let changed = now != *seen;
        *seen = now;
        Ok(changed)
    }

    /// The file's contents as one compact database (`VACUUM INTO`), with the number of the
    /// newest logged change it holds.
    pub fn image(&self) -> Result<(u64, Vec<u8>)> {
        let conn = self.conn.lock();
        let seq = applied_seq(&conn)?;
        let mut out = self.path.clone().into_os_string();
        out.push(".image");
        let out = PathBuf::from(out);
        remove_files(&out)?;
        let taken = conn
            .execute("VACUUM INTO ?1", [out.to_string_lossy().as_ref()])
            .map_err(Error::from)
            .and_then(|_| {
                std::fs::read(&out).map_err(|e| Error::io(format!("reading {}", out.display()), e))
            });
        remove_files(&out)?;
        *self.seen.lock() = data_version(&conn)?;
        Ok((seq, taken?))
    }
}

fn data_version(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("PRAGMA data_version", [], |row| row.get(0))?)
}

/// An open actor database: the handle the actor's task and the runtime hold. Statements
/// go to its thread in order.
pub(crate) struct SqliteActorDb {
    token: u64,
    /// To the database's thread, which ends when this is dropped or [`ActorDb::close`] runs.
    commands: std_mpsc::Sender<Command>,
    /// `true` while a prepared change waits for its commit; the thread holds the sender.
    busy: watch::Receiver<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

enum Command {
    Enter,
    Execute {
        sql: String,
        params: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>>>,
    },
    Migration {
        step: MigrationStep,
        reply: oneshot::Sender<Result<()>>,
    },
    Prepare {
        reply: oneshot::Sender<Result<Option<DbChange>>>,
    },
    Rollback {
        reply: oneshot::Sender<()>,
    },
    Finish {
        seq: u64,
        durable: bool,
    },
    Close,
}

impl SqliteActorDb {
    /// Opens (or creates) the actor's database in `dir`, applies the log rows it lacks, and
    /// starts its thread. Blocking: run it on the blocking pool.
    pub(crate) fn open(
        dir: &Path,
        actor_id: &str,
        config: DbConfig,
        log: Vec<(u64, Vec<u8>)>,
    ) -> Result<SqliteActorDb> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        SqliteActorDb::open_at(&db_path(dir, actor_id), actor_id, config, true, log)
    }

    /// [`SqliteActorDb::open`] of the file at `path`, whose folder exists. `checkpoints`: the
    /// file is flushed by checkpoints (see the module's notes), so the log may drop what it
    /// holds; a copy that is rebuilt on every opening is not.
    fn open_at(
        path: &Path,
        actor_id: &str,
        config: DbConfig,
        checkpoints: bool,
        log: Vec<(u64, Vec<u8>)>,
    ) -> Result<SqliteActorDb> {
        let path = path.to_path_buf();
        let existed = path.exists();
        let corrupt = |detail: String| Error::StorageCorrupt {
            detail,
            actor_id: Some(actor_id.to_string()),
            source: None,
        };
        if !existed && !log.is_empty() {
            return Err(corrupt(format!(
                "the actor's SQL database {} is missing, but keel.db holds changes made to it",
                path.display()
            )));
        }
        let conn = open_connection(&path).map_err(|err| match err {
            Error::Storage(source) if crate::error::sqlite_reports_damage(&source) => {
                Error::StorageCorrupt {
                    detail: format!("the actor's SQL database {} is damaged", path.display()),
                    actor_id: Some(actor_id.to_string()),
                    source: Some(source),
                }
            }
            other => other,
        })?;
        let mut applied = applied_seq(&conn)?;
        let newest = log.last().map(|(seq, _)| *seq);
        if let Some(newest) = newest {
            if applied > newest {
                return Err(corrupt(format!(
                    "the actor's SQL database {} holds change {applied}, newer than keel.db's last ({newest})",
                    path.display()
                )));
            }
        }
        let pending: Vec<_> = log.into_iter().filter(|(seq, _)| *seq > applied).collect();
        if let Some((first, _)) = pending.first() {
            if *first != applied + 1 {
                return Err(corrupt(format!(
                    "the actor's SQL database {} holds change {applied}, but keel.db's log resumes at {first}",
                    path.display()
                )));
            }
            conn.execute_batch("BEGIN IMMEDIATE")?;
            for (seq, changeset) in &pending {
                if *seq != applied + 1 {
                    return Err(corrupt(format!(
                        "keel.db's log of actor SQL changes skips from {applied} to {seq}"
                    )));
                }
                apply_changeset(&conn, changeset).map_err(|err| {
                    corrupt(format!(
                        "applying logged change {seq} to the actor's SQL database {} failed: {err}",
                        path.display()
                    ))
                })?;
                applied = *seq;
            }
            conn.execute("UPDATE _keel_applied SET seq = ?1", [applied as i64])?;
            conn.execute_batch("COMMIT")?;
            tracing::debug!(
                changes = pending.len(),
                "applied logged SQL changes to the actor's database"
            );
        }
        // What the file holds is durable from here on, so the log may drop it; if the
        // checkpoint did not get everything, the log keeps all it has until one does.
        let synced = if checkpoints && checkpoint(&conn)? {
            applied
        } else {
            0
        };
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
        let max_pages = (config.max_size_bytes / page_size.max(512) as u64).max(1);
        conn.query_row(&format!("PRAGMA max_page_count = {max_pages}"), [], |_| {
            Ok(())
        })?;

        let mode = Arc::new(AtomicU8::new(MODE_KEEL));
        let authorizer_mode = mode.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            authorize(authorizer_mode.load(Ordering::Relaxed), &ctx)
        }));
        let deadline = Arc::new(Mutex::new(None::<Instant>));
        let timed_out = Arc::new(AtomicBool::new(false));
        let (progress_deadline, progress_timed_out) = (deadline.clone(), timed_out.clone());
        conn.progress_handler(
            PROGRESS_STEPS,
            Some(move || match *progress_deadline.lock() {
                Some(at) if Instant::now() >= at => {
                    progress_timed_out.store(true, Ordering::Relaxed);
                    true
                }
                _ => false,
            }),
        );

        let (commands, rx) = std_mpsc::channel();
        let (busy_tx, busy) = watch::channel(false);
        let worker = Worker {
            conn,
            mode,
            deadline,
            timed_out,
            statement_timeout: config.statement_timeout,
            max_size_bytes: config.max_size_bytes,
            applied,
            checkpoints,
            synced,
            unsynced: 0,
            busy: busy_tx,
            state: State::Idle,
        };
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("keel-actor-db".into())
            .spawn(move || {
                let _entered = span.enter();
                worker.run(rx)
            })
            .map_err(|e| Error::io("starting an actor database's thread", e))?;
        Ok(SqliteActorDb {
            token: NEXT_TOKEN.fetch_add(1, Ordering::Relaxed),
            commands,
            busy,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .map_err(|_| DbError::Unavailable.with("the actor's database is closed"))
    }
}

fn closed() -> Error {
    DbError::Unavailable.with("the actor's database is closed")
}

#[async_trait]
impl ActorDb for SqliteActorDb {
    fn token(&self) -> u64 {
        self.token
    }

    fn enter(&self) {
        // A closed database refuses every later statement itself.
        let _ = self.send(Command::Enter);
    }

    async fn execute(&self, sql: String, params: Vec<u8>) -> Result<Vec<u8>> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Execute { sql, params, reply })?;
        rx.await.map_err(|_| closed())?
    }

    async fn migration(&self, step: MigrationStep) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Migration { step, reply })?;
        rx.await.map_err(|_| closed())?
    }

    async fn prepare(&self) -> Result<Option<DbChange>> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Prepare { reply })?;
        rx.await.map_err(|_| closed())?
    }

    async fn rollback(&self) {
        let (reply, rx) = oneshot::channel();
        if self.send(Command::Rollback { reply }).is_ok() {
            // A thread that ended dropped its transaction with its connection.
            let _ = rx.await;
        }
    }

    fn finish(&self, seq: u64, durable: bool) {
        // A closed database has rolled back what it held; the log row, if durable, is applied
        // at its next open.
        let _ = self.send(Command::Finish { seq, durable });
    }

    async fn settled(&self) {
        let mut busy = self.busy.clone();
        // An ended thread holds nothing back.
        let _ = busy.wait_for(|busy| !*busy).await;
    }

    async fn close(&self) {
        // A thread that ended already is closed.
        let _ = self.commands.send(Command::Close);
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("an actor database's thread panicked");
            }
        }
    }
}

impl Drop for SqliteActorDb {
    fn drop(&mut self) {
        // The thread may be gone; dropping `commands` ends it otherwise.
        let _ = self.commands.send(Command::Close);
    }
}

/// How many changes the file takes between its checkpoints (flushes), which bounds the log.
pub const SYNC_EVERY: u32 = 64;

fn open_connection(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::corrupt(format!(
            "the actor database at {} cannot be switched to WAL mode",
            path.display()
        )));
    }
    // Not flushed per commit: see the module's notes.
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA trusted_schema = OFF;
         CREATE TABLE IF NOT EXISTS _keel_applied (seq INTEGER NOT NULL);
         INSERT INTO _keel_applied (seq) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM _keel_applied);",
    )?;
    Ok(conn)
}

/// Copies the whole WAL into the file, flushing both (`synchronous = NORMAL` flushes at a
/// checkpoint); whether it got all of it (a reader can hold part of it back).
fn checkpoint(conn: &Connection) -> Result<bool> {
    let (busy, log, done): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?;
    Ok(busy == 0 && log == done)
}

fn applied_seq(conn: &Connection) -> Result<u64> {
    let seq: i64 = conn.query_row("SELECT seq FROM _keel_applied", [], |row| row.get(0))?;
    Ok(seq.max(0) as u64)
}

/// Where the thread is in the current call.
enum State {
    /// Between calls: statements are refused (work outside a call has no commit to join).
    Idle,
    /// In a call that has run no statement yet.
    Entered,
    /// In a call with its transaction open, recording into `session`; `failed` once SQLite
    /// rolled the transaction back itself (an interrupt, a full database).
    Call {
        session: Session,
        failed: Option<Error>,
    },
    /// In the migration transaction.
    Migrating,
    /// A call's change was prepared: its transaction stays open until the commit's release.
    Prepared { seq: u64 },
}

/// Owns the connection, on the database's thread.
struct Worker {
    conn: Connection,
    mode: Arc<AtomicU8>,
    deadline: Arc<Mutex<Option<Instant>>>,
    timed_out: Arc<AtomicBool>,
    statement_timeout: Duration,
    max_size_bytes: u64,
    /// The newest change the file holds.
    applied: u64,
    /// Whether the file is checkpointed to let the log drop what it holds (not for a copy
    /// that is rebuilt on every opening, whose log is kept elsewhere).
    checkpoints: bool,
    /// The newest change the file holds durably (flushed by a checkpoint; 0 before the
    /// first complete one): the log keeps it and everything newer.
    synced: u64,
    /// Changes committed since the last checkpoint.
    unsynced: u32,
    busy: watch::Sender<bool>,
    state: State,
}

impl Worker {
    fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        while let Ok(command) = rx.recv() {
            match command {
                Command::Enter => self.enter(),
                Command::Execute { sql, params, reply } => {
                    // The caller may have given up (a timed-out call).
                    let _ = reply.send(self.execute(&sql, &params));
                }
                Command::Migration { step, reply } => {
                    // As above.
                    let _ = reply.send(self.migration(step));
                }
                Command::Prepare { reply } => {
                    let prepared = self.prepare();
                    // As above; a prepared change then waits for a `Finish` that never comes
                    // only until the database closes, which rolls it back.
                    let _ = reply.send(prepared);
                }
                Command::Rollback { reply } => {
                    self.rollback();
                    // As above.
                    let _ = reply.send(());
                }
                Command::Finish { seq, durable } => self.finish(seq, durable),
                Command::Close => break,
            }
        }
        self.rollback();
        self.busy.send_replace(false);
    }

    fn keel(&self, sql: &str) -> Result<()> {
        self.mode.store(MODE_KEEL, Ordering::Relaxed);
        self.conn.execute_batch(sql)?;
        Ok(())
    }

    fn enter(&mut self) {
        match self.state {
            State::Idle => self.state = State::Entered,
            // A call's statements before this `Enter` were work outside any call; drop them.
            State::Call { .. } | State::Migrating => {
                self.rollback();
                self.state = State::Entered;
            }
            State::Entered | State::Prepared { .. } => {}
        }
    }

    fn execute(&mut self, sql: &str, params: &[u8]) -> Result<Vec<u8>> {
        let mode = match &self.state {
            State::Idle => {
                return Err(DbError::Unavailable.with(
                    "c.db can only be used during a call of the actor (background work has no commit to join)",
                ))
            }
            State::Prepared { .. } => {
                return Err(DbError::Unavailable
                    .with("the actor's previous call is still committing its SQL"))
            }
            State::Call {
                failed: Some(err), ..
            } => {
                return Err(match err {
                    Error::Db { kind, message } => kind.with(format!(
                        "an earlier statement of this call failed and rolled its SQL back: {message}"
                    )),
                    other => other.duplicate(),
                })
            }
            State::Migrating => MODE_MIGRATION,
            State::Entered | State::Call { .. } => MODE_CALL,
        };
        if matches!(self.state, State::Entered) {
            self.keel("BEGIN IMMEDIATE")?;
            let session = match Session::start(&self.conn) {
                Ok(session) => session,
                Err(err) => {
                    let _ = self.keel("ROLLBACK");
                    return Err(err);
                }
            };
            self.state = State::Call {
                session,
                failed: None,
            };
        }
        let params = decode_params(params)?;
        self.timed_out.store(false, Ordering::Relaxed);
        *self.deadline.lock() = Some(Instant::now() + self.statement_timeout);
        self.mode.store(mode, Ordering::Relaxed);
        let result = run_statement(&self.conn, sql, params);
        self.mode.store(MODE_KEEL, Ordering::Relaxed);
        *self.deadline.lock() = None;
        result.map_err(|err| {
            let err = self.classify(err);
            // SQLite rolls the whole transaction back on some errors (an interrupt, a full
            // database); the call's earlier statements are gone, so the call cannot commit.
            if self.conn.is_autocommit() {
                match &mut self.state {
                    State::Call { failed, .. } => *failed = Some(err.duplicate()),
                    State::Migrating => self.state = State::Entered,
                    _ => {}
                }
            }
            err
        })
    }

    fn classify(&self, err: rusqlite::Error) -> Error {
        use rusqlite::ErrorCode;
        match &err {
            rusqlite::Error::SqliteFailure(code, message) => {
                let text = message.clone().unwrap_or_else(|| code.to_string());
                match code.code {
                    ErrorCode::ConstraintViolation => DbError::Constraint.with(text),
                    ErrorCode::OperationInterrupted if self.timed_out.load(Ordering::Relaxed) => {
                        DbError::StatementTimedOut.with(format!(
                            "the statement ran longer than {} ms and was interrupted",
                            self.statement_timeout.as_millis()
                        ))
                    }
                    ErrorCode::DiskFull => DbError::TooLarge.with(format!(
                        "the actor's database would grow past its limit of {} bytes (or the disk is full)",
                        self.max_size_bytes
                    )),
                    ErrorCode::AuthorizationForStatementDenied => DbError::NotAllowed.with(format!(
                        "{text}: an actor's database allows no ATTACH, no pragma that changes settings, no transaction statements, no temporary objects, no access to keel's _keel tables, and schema changes only in onMigrate"
                    )),
                    ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => Error::StorageCorrupt {
                        detail: format!("the actor's SQL database is damaged: {text}"),
                        actor_id: None,
                        source: None,
                    },
                    _ if text.contains("cannot VACUUM") => DbError::NotAllowed
                        .with(format!("{text}: VACUUM is not available on an actor's database")),
                    _ => DbError::Sql.with(text),
                }
            }
            rusqlite::Error::MultipleStatement => {
                DbError::Sql.with("execute runs one statement; call it once per statement")
            }
            rusqlite::Error::InvalidParameterCount(given, wanted) => DbError::BadParameter.with(
                format!("the statement takes {wanted} parameters, {given} were given"),
            ),
            rusqlite::Error::InvalidParameterName(name) => {
                DbError::BadParameter.with(format!("the statement has no parameter named {name}"))
            }
            _ => DbError::Sql.with(err.to_string()),
        }
    }

    fn migration(&mut self, step: MigrationStep) -> Result<()> {
        match (step, &self.state) {
            (MigrationStep::Begin, State::Entered | State::Idle) => {
                self.keel("BEGIN IMMEDIATE")?;
                self.state = State::Migrating;
                Ok(())
            }
            (MigrationStep::Begin, _) => {
                Err(DbError::Unavailable
                    .with("onMigrate runs before any other statement of the start"))
            }
            (MigrationStep::Commit, State::Migrating) => {
                let committed = self.keel("COMMIT");
                if committed.is_err() {
                    let _ = self.keel("ROLLBACK");
                }
                self.state = State::Entered;
                // Statements prepared while schema changes were allowed are not kept.
                self.conn.flush_prepared_statement_cache();
                committed
            }
            (MigrationStep::Rollback, State::Migrating) => {
                self.state = State::Entered;
                self.conn.flush_prepared_statement_cache();
                self.keel("ROLLBACK")
            }
            // The migration's transaction was rolled back by SQLite already (see `execute`).
            (MigrationStep::Rollback, _) => Ok(()),
            (MigrationStep::Commit, _) => Err(DbError::MigrationFailed
                .with("the migration's transaction was rolled back by a failed statement")),
        }
    }

    fn prepare(&mut self) -> Result<Option<DbChange>> {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle | State::Entered => Ok(None),
            State::Migrating => {
                self.rollback_open();
                Err(DbError::MigrationFailed.with("onMigrate's transaction was left open"))
            }
            State::Prepared { seq } => {
                self.state = State::Prepared { seq };
                Err(DbError::Unavailable
                    .with("the actor's previous call is still committing its SQL"))
            }
            State::Call { session, failed } => {
                if let Some(err) = failed {
                    drop(session);
                    self.rollback_open();
                    return Err(err);
                }
                let changeset = session.changeset(&self.conn);
                drop(session);
                match changeset {
                    Ok(changeset) if changeset.is_empty() => {
                        self.rollback_open();
                        Ok(None)
                    }
                    Ok(changeset) => {
                        let seq = self.applied + 1;
                        self.state = State::Prepared { seq };
                        self.busy.send_replace(true);
                        Ok(Some(DbChange {
                            seq,
                            changeset,
                            trim_below: self.synced,
                        }))
                    }
                    Err(err) => {
                        self.rollback_open();
                        Err(err)
                    }
                }
            }
        }
    }

    fn finish(&mut self, seq: u64, durable: bool) {
        if !matches!(self.state, State::Prepared { seq: prepared } if prepared == seq) {
            tracing::error!(
                seq,
                "a commit finished an SQL change the actor's database did not prepare"
            );
            return;
        }
        self.state = State::Idle;
        if durable {
            self.mode.store(MODE_KEEL, Ordering::Relaxed);
            let committed = self
                .conn
                .execute("UPDATE _keel_applied SET seq = ?1", [seq as i64])
                .map_err(Error::from)
                .and_then(|_| self.keel("COMMIT"));
            match committed {
                Ok(()) => {
                    self.applied = seq;
                    self.sync_now_and_then();
                }
                Err(err) => {
                    // keel.db holds the change; the file gets it at its next open.
                    tracing::error!(error = %err, seq, "committing a logged SQL change to the actor's database failed");
                    self.rollback_open();
                }
            }
        } else {
            self.rollback_open();
        }
        self.busy.send_replace(false);
    }

    /// Every [`SYNC_EVERY`] changes, a checkpoint, after which the log may drop what the
    /// file holds. Runs after the call's reply left; the next call's statements wait for it.
    fn sync_now_and_then(&mut self) {
        if !self.checkpoints {
            return;
        }
        self.unsynced += 1;
        if self.unsynced < SYNC_EVERY {
            return;
        }
        match checkpoint(&self.conn) {
            Ok(true) => {
                self.synced = self.applied;
                self.unsynced = 0;
            }
            // The log keeps everything since the last checkpoint; the next change tries again.
            Ok(false) => {}
            Err(err) => tracing::warn!(error = %err, "checkpointing the actor's database failed"),
        }
    }

    fn rollback(&mut self) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Call { session, .. } => {
                drop(session);
                self.rollback_open();
            }
            State::Migrating | State::Prepared { .. } => self.rollback_open(),
            State::Idle | State::Entered => {}
        }
        self.busy.send_replace(false);
    }

    fn rollback_open(&self) {
        if !self.conn.is_autocommit() {
            if let Err(err) = self.keel("ROLLBACK") {
                tracing::error!(error = %err, "rolling back the actor database's transaction failed");
            }
        }
    }
}

/// A SQL value as it crosses the seam.
#[derive(Debug, Clone, PartialEq)]
enum SqlValue {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl rusqlite::ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            SqlValue::Null => ValueRef::Null,
            SqlValue::Integer(v) => ValueRef::Integer(*v),
            SqlValue::Real(v) => ValueRef::Real(*v),
            SqlValue::Text(v) => ValueRef::Text(v.as_bytes()),
            SqlValue::Blob(v) => ValueRef::Blob(v),
        }))
    }
}

/// A statement's parameters: by position (`?`) or by name (`:name`, `$name`, `@name`).
enum Params {
    Positional(Vec<SqlValue>),
    Named(Vec<(String, SqlValue)>),
}

fn run_statement(conn: &Connection, sql: &str, params: Params) -> rusqlite::Result<Vec<u8>> {
    let mut statement = conn.prepare_cached(sql)?;
    let count = statement.parameter_count();
    match params {
        Params::Positional(values) => {
            if values.len() != count {
                return Err(rusqlite::Error::InvalidParameterCount(values.len(), count));
            }
            for (index, value) in values.iter().enumerate() {
                statement.raw_bind_parameter(index + 1, value)?;
            }
        }
        Params::Named(values) => {
            let mut bound = HashSet::new();
            for (name, value) in &values {
                let index = if name.starts_with([':', '$', '@']) {
                    statement.parameter_index(name)?
                } else {
                    [':', '$', '@'].iter().find_map(|sigil| {
                        statement
                            .parameter_index(&format!("{sigil}{name}"))
                            .ok()
                            .flatten()
                    })
                };
                let Some(index) = index else {
                    return Err(rusqlite::Error::InvalidParameterName(name.clone()));
                };
                statement.raw_bind_parameter(index, value)?;
                bound.insert(index);
            }
            if bound.len() != count {
                let missing = (1..=count)
                    .find(|index| !bound.contains(index))
                    .and_then(|index| statement.parameter_name(index).map(str::to_string))
                    .unwrap_or_else(|| "?".to_string());
                return Err(rusqlite::Error::InvalidParameterName(format!(
                    "{missing} (no value was given for it)"
                )));
            }
        }
    }
    let columns: Vec<String> = statement
        .column_names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut out = Vec::with_capacity(64);
    cbor::write_head(&mut out, 4, 4);
    cbor::write_head(&mut out, 4, columns.len() as u64);
    for column in &columns {
        cbor::write_text(&mut out, column);
    }
    let mut rows_out = Vec::new();
    let mut row_count = 0u64;
    {
        let mut rows = statement.raw_query();
        while let Some(row) = rows.next()? {
            row_count += 1;
            for index in 0..columns.len() {
                write_value(&mut rows_out, row.get_ref(index)?);
            }
        }
    }
    // Rows as one flat array of `rows × columns` values: the reader splits them.
    cbor::write_head(&mut out, 4, row_count * columns.len() as u64);
    out.extend_from_slice(&rows_out);
    cbor::write_head(&mut out, 0, conn.changes());
    write_value(&mut out, ValueRef::Integer(conn.last_insert_rowid()));
    Ok(out)
}

/// The largest integer that JS reads as a number (2^53 − 1); larger ones travel as bignums
/// and arrive as a `BigInt`.
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

fn write_value(out: &mut Vec<u8>, value: ValueRef<'_>) {
    match value {
        ValueRef::Null => out.push(0xf6),
        ValueRef::Integer(v) if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&v) => {
            if v >= 0 {
                cbor::write_head(out, 0, v as u64);
            } else {
                cbor::write_head(out, 1, (-1 - v) as u64);
            }
        }
        ValueRef::Integer(v) => {
            let (tag, magnitude) = if v >= 0 {
                (2, v as u64)
            } else {
                (3, (-1 - v) as u64)
            };
            cbor::write_head(out, 6, tag);
            let bytes = magnitude.to_be_bytes();
            let start = bytes.iter().position(|b| *b != 0).unwrap_or(7);
            cbor::write_head(out, 2, (8 - start) as u64);
            out.extend_from_slice(&bytes[start..]);
        }
        ValueRef::Real(v) => {
            out.push(0xfb);
            out.extend_from_slice(&v.to_be_bytes());
        }
        ValueRef::Text(v) => {
            cbor::write_head(out, 3, v.len() as u64);
            out.extend_from_slice(v);
        }
        ValueRef::Blob(v) => {
            cbor::write_head(out, 2, v.len() as u64);
            out.extend_from_slice(v);
        }
    }
}

fn bad_parameter(message: &str) -> Error {
    DbError::BadParameter.with(format!("invalid SQL parameters: {message}"))
}

/// Reads the parameters: a CBOR array of values, or a map of names to values, where a
/// value is null (or undefined), a boolean (stored as 0 or 1), an integer, a float, a text or
/// byte string, or a bignum that fits 64 bits.
fn decode_params(bytes: &[u8]) -> Result<Params> {
    let mut reader = Reader { bytes, pos: 0 };
    let (major, argument) = reader.head()?;
    let params = match major {
        4 => {
            let mut values = Vec::with_capacity(argument.min(1024) as usize);
            for _ in 0..argument {
                values.push(reader.value()?);
            }
            Params::Positional(values)
        }
        5 => {
            let mut values = Vec::with_capacity(argument.min(1024) as usize);
            for _ in 0..argument {
                let (major, len) = reader.head()?;
                if major != 3 {
                    return Err(bad_parameter("a parameter name must be a string"));
                }
                let name = reader.text(len)?;
                values.push((name, reader.value()?));
            }
            Params::Named(values)
        }
        _ => return Err(bad_parameter("expected a list or an object of parameters")),
    };
    if reader.pos != bytes.len() {
        return Err(bad_parameter("trailing bytes"));
    }
    Ok(params)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| bad_parameter("truncated"))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    /// Reads a head: (major type, argument).
    fn head(&mut self) -> Result<(u8, u64)> {
        let (major, _, argument) = self.head_with_info()?;
        Ok((major, argument))
    }

    /// Reads a head: (major type, additional info, argument); for major 7 the argument is the
    /// simple value's number or the float's bits.
    fn head_with_info(&mut self) -> Result<(u8, u8, u64)> {
        let first = self.take(1)?[0];
        let (major, info) = (first >> 5, first & 0x1f);
        let argument = match info {
            0..=23 => u64::from(info),
            24..=27 => {
                let width = 1usize << (info - 24);
                self.take(width)?
                    .iter()
                    .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
            }
            _ => return Err(bad_parameter("unsupported length")),
        };
        Ok((major, info, argument))
    }

    fn text(&mut self, len: u64) -> Result<String> {
        let bytes = self.take(usize::try_from(len).map_err(|_| bad_parameter("too long"))?)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| bad_parameter("a string is not UTF-8"))
    }

    fn value(&mut self) -> Result<SqlValue> {
        let (major, info, argument) = self.head_with_info()?;
        Ok(match major {
            0 => SqlValue::Integer(
                i64::try_from(argument).map_err(|_| bad_parameter("an integer exceeds 64 bits"))?,
            ),
            1 => SqlValue::Integer(
                i64::try_from(argument)
                    .map(|n| -1 - n)
                    .map_err(|_| bad_parameter("an integer exceeds 64 bits"))?,
            ),
            2 => SqlValue::Blob(
                self.take(usize::try_from(argument).map_err(|_| bad_parameter("too long"))?)?
                    .to_vec(),
            ),
            3 => SqlValue::Text(self.text(argument)?),
            6 if argument == 2 || argument == 3 => {
                let (major, len) = self.head()?;
                if major != 2 || len > 8 {
                    return Err(bad_parameter("a BigInt parameter must fit in 64 bits"));
                }
                let magnitude = self
                    .take(len as usize)?
                    .iter()
                    .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                let magnitude = i64::try_from(magnitude)
                    .map_err(|_| bad_parameter("a BigInt parameter must fit in 64 bits"))?;
                SqlValue::Integer(if argument == 2 {
                    magnitude
                } else {
                    -1 - magnitude
                })
            }
            7 => {
                let bits = argument;
                match info {
                    20 => SqlValue::Integer(0),
                    21 => SqlValue::Integer(1),
                    22 | 23 => SqlValue::Null,
                    25 => SqlValue::Real(f16_to_f64(bits as u16)),
                    26 => SqlValue::Real(f64::from(f32::from_bits(bits as u32))),
                    27 => SqlValue::Real(f64::from_bits(bits)),
                    _ => return Err(bad_parameter("unsupported simple value")),
                }
            }
            _ => return Err(bad_parameter(
                "a parameter must be null, a boolean, a number, a BigInt, a string or a Uint8Array",
            )),
        })
    }
}

fn f16_to_f64(half: u16) -> f64 {
    let exponent = (half >> 10) & 0x1f;
    let mantissa = f64::from(half & 0x3ff);
    let magnitude = match exponent {
        0 => mantissa * 2f64.powi(-24),
        31 if mantissa == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (1.0 + mantissa / 1024.0) * 2f64.powi(i32::from(exponent) - 15),
    };
    if half & 0x8000 != 0 {
        -magnitude
    } else {
        magnitude
    }
}
