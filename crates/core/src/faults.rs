//! Fault injection: failpoints on the commit path, for tests that break storage on purpose.
//!
//! A [`Faults`] implementation is asked at each [`Failpoint`] what to do: carry on, fail the
//! commit as SQLite would when it refuses one, or crash. It is set in
//! [`RuntimeConfig::faults`](crate::config::RuntimeConfig::faults), which the binding never
//! sets, so it is off for every JS user and costs nothing then: no failpoint is checked and
//! connections use SQLite's own VFS.
//!
//! A crash, in process, means the writer stops where it is: nothing after the failpoint
//! reaches disk, no op of the batch is released (its callers are never acknowledged), and
//! every later write through this runtime's connections is refused, so the files stay as a
//! killed process would have left them. The test then drains the abandoned runtime, which
//! releases the directory lock and closes the connections, and opens a new one on the same
//! data directory.
//!
//! The point between the WAL write and its sync lies inside SQLite's commit, so with faults
//! configured every connection opens through a VFS shim ([`VFS_NAME`]) that wraps the default
//! unix VFS and asks the faults before syncing the `-wal` file. The shim finds the faults of
//! a file by its database path, registered by [`FaultState::register`] for the life of the
//! runtime. Every shim method forwards to the wrapped file of the real VFS; the `unsafe`
//! code below relies only on SQLite's VFS contract (a file struct of `szOsFile` bytes that
//! SQLite allocates, `xClose` called once for every file whose `pMethods` is set).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use rusqlite::ffi;

use crate::error::{Error, Result};

/// A place on the commit path where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failpoint {
    /// In the writer, after a batch's statements ran inside its transaction and before
    /// `COMMIT` writes it to the WAL. A batch that fits SQLite's page cache (every batch keel
    /// writes in practice) has written nothing to the WAL yet. `Fail` makes the commit fail
    /// as a full disk does (`SQLITE_FULL`).
    BeforeWalWrite,
    /// Inside SQLite's commit, when it syncs the WAL file: the transaction's frames are
    /// written, not yet synced. Checked at every sync of the WAL: at each commit with
    /// `durability: full` (relaxed durability does not sync at commit), and before a
    /// checkpoint copies the WAL into the database. `Fail` makes the sync fail
    /// (`SQLITE_IOERR_FSYNC`): the commit fails with the transaction's frames already in the
    /// WAL file, which the writer then overwrites (see `writer.rs`).
    AfterWriteBeforeSync,
    /// In the writer, after `COMMIT` returned and before any op of the batch is released.
    /// Only `Crash` applies: the batch is already durable.
    AfterCommitBeforeReply,
}

/// What to do at a failpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Carry on as if nothing happened.
    Continue,
    /// Fail the commit, as SQLite does when it refuses one.
    Fail,
    /// Stop the writer here, as if the process died.
    Crash,
}

/// Decides the fault at each failpoint. Called on the writer's thread (and SQLite's, which
/// is the same one), so it must be quick and must not block.
pub trait Faults: Send + Sync + 'static {
    /// What to do at `point`.
    fn check(&self, point: Failpoint) -> Fault;
}

/// The faults configured for a runtime. A newtype so that the configuration stays `Debug`.
#[derive(Clone)]
pub struct FaultInjector(pub Arc<dyn Faults>);

impl std::fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultInjector")
    }
}

/// One runtime's faults and whether they have crashed it. Shared by the writer and every
/// file the VFS shim opens for the runtime's database.
pub(crate) struct FaultState {
    faults: Arc<dyn Faults>,
    /// Set at the first `Crash`; from then on the shim refuses every write, sync, truncate
    /// and delete of this runtime's files, and the writer releases nothing.
    crashed: AtomicBool,
    /// The registered database path.
    path: PathBuf,
}

/// The database paths with faults configured, for the VFS shim to find their state.
static REGISTERED: Mutex<Option<HashMap<PathBuf, Arc<FaultState>>>> = Mutex::new(None);
/// How many paths are registered; zero keeps [`FaultState::for_path`] to one atomic load.
static REGISTERED_COUNT: AtomicUsize = AtomicUsize::new(0);

impl FaultState {
    /// Registers `injector` for the database `db_file` (whose directory must exist) and
    /// registers the VFS shim with SQLite once. The registration lasts until the returned
    /// guard drops; a later registration of the same path replaces it.
    pub(crate) fn register(
        injector: &FaultInjector,
        db_file: &Path,
    ) -> Result<(Arc<FaultState>, Registration)> {
        register_vfs()?;
        let path = canonical(db_file)?;
        let state = Arc::new(FaultState {
            faults: injector.0.clone(),
            crashed: AtomicBool::new(false),
            path: path.clone(),
        });
        let mut registered = REGISTERED.lock();
        let map = registered.get_or_insert_with(HashMap::new);
        if map.insert(path, state.clone()).is_none() {
            REGISTERED_COUNT.fetch_add(1, Ordering::AcqRel);
        }
        Ok((state.clone(), Registration(state)))
    }

    /// The state registered for the database `db_file`, if any.
    pub(crate) fn for_path(db_file: &Path) -> Option<Arc<FaultState>> {
        if REGISTERED_COUNT.load(Ordering::Acquire) == 0 {
            return None;
        }
        let path = canonical(db_file).ok()?;
        REGISTERED.lock().as_ref()?.get(&path).cloned()
    }

    /// Asks the faults what to do at `point`; a crash is remembered.
    pub(crate) fn check(&self, point: Failpoint) -> Fault {
        if self.has_crashed() {
            return Fault::Crash;
        }
        let fault = self.faults.check(point);
        if fault == Fault::Crash {
            tracing::debug!(?point, "injected crash");
            self.crashed.store(true, Ordering::Release);
        }
        fault
    }

    /// Whether a crash was injected.
    pub(crate) fn has_crashed(&self) -> bool {
        self.crashed.load(Ordering::Acquire)
    }
}

/// Keeps a path registered; dropping it unregisters the path unless a newer runtime has
/// registered it since.
pub(crate) struct Registration(Arc<FaultState>);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registered = REGISTERED.lock();
        if let Some(map) = registered.as_mut() {
            if map
                .get(&self.0.path)
                .is_some_and(|state| Arc::ptr_eq(state, &self.0))
            {
                map.remove(&self.0.path);
                REGISTERED_COUNT.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// The error a failed commit reports when a fault is injected before the WAL write: the one
/// SQLite gives for a full disk.
pub(crate) fn injected_full() -> Error {
    Error::Storage(rusqlite::Error::SqliteFailure(
        ffi::Error::new(ffi::SQLITE_FULL),
        Some("database or disk is full (injected fault)".into()),
    ))
}

/// The absolute, symlink-free form of a database path whose directory exists, as SQLite
/// hands it to the VFS.
fn canonical(db_file: &Path) -> Result<PathBuf> {
    let dir = db_file.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
    Ok(match db_file.file_name() {
        Some(name) => dir.join(name),
        None => dir,
    })
}

/// The name of the VFS shim that connections use when faults are configured.
pub const VFS_NAME: &str = "keel-faults";

/// `VFS_NAME` as SQLite reads it.
const VFS_NAME_C: &CStr = c"keel-faults";

/// A file the shim opened: SQLite's base struct first, then the wrapped file of the real VFS.
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    /// The real VFS's file, allocated with its `szOsFile`.
    real: *mut ffi::sqlite3_file,
    /// Set for the `-wal` file, whose sync is the failpoint.
    wal: bool,
    /// The faults of the database this file belongs to, leaked into the file as a raw `Arc`
    /// and reclaimed on close; null when none is registered.
    state: *const FaultState,
}

/// The real VFS, set once at registration; the shim forwards to it.
static REAL_VFS: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(std::ptr::null_mut());

fn register_vfs() -> Result<()> {
    static RESULT: OnceLock<c_int> = OnceLock::new();
    // SAFETY: runs once, before any connection uses the shim; the VFS struct is leaked so
    // that it outlives every connection, as SQLite requires.
    let rc = *RESULT.get_or_init(|| unsafe {
        let rc = ffi::sqlite3_initialize();
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let real = ffi::sqlite3_vfs_find(std::ptr::null());
        if real.is_null() {
            return ffi::SQLITE_ERROR;
        }
        REAL_VFS.store(real, Ordering::Release);
        let mut shim: ffi::sqlite3_vfs = *real;
        shim.szOsFile = std::mem::size_of::<ShimFile>() as c_int;
        shim.zName = VFS_NAME_C.as_ptr();
        shim.pNext = std::ptr::null_mut();
        shim.pAppData = std::ptr::null_mut();
        shim.xOpen = Some(shim_open);
        shim.xDelete = Some(shim_delete);
        ffi::sqlite3_vfs_register(Box::into_raw(Box::new(shim)), 0)
    });
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(Error::Storage(rusqlite::Error::SqliteFailure(
            ffi::Error::new(rc),
            Some("registering the fault-injection VFS failed".into()),
        )))
    }
}

/// The faults registered for the database that the file `name` belongs to: the database
/// itself, its `-wal` or its `-journal` file.
fn lookup(name: *const c_char) -> Option<Arc<FaultState>> {
    if name.is_null() {
        return None;
    }
    // SAFETY: SQLite passes a NUL-terminated file name.
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
    let db = name
        .strip_suffix("-wal")
        .or_else(|| name.strip_suffix("-journal"))
        .unwrap_or(&name);
    REGISTERED.lock().as_ref()?.get(Path::new(db)).cloned()
}

unsafe extern "C" fn shim_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let shim = file as *mut ShimFile;
    (*shim).base.pMethods = std::ptr::null();
    let real_vfs = REAL_VFS.load(Ordering::Acquire);
    let real = ffi::sqlite3_malloc((*real_vfs).szOsFile) as *mut ffi::sqlite3_file;
    if real.is_null() {
        return ffi::SQLITE_NOMEM;
    }
    std::ptr::write_bytes(real as *mut u8, 0, (*real_vfs).szOsFile as usize);
    let open = (*real_vfs).xOpen.expect("the default VFS opens files");
    let rc = open(real_vfs, name, real, flags, out_flags);
    if rc != ffi::SQLITE_OK || (*real).pMethods.is_null() {
        // A file that has methods must be closed even when its open failed.
        if let Some(close) = (*real).pMethods.as_ref().and_then(|methods| methods.xClose) {
            close(real);
        }
        ffi::sqlite3_free(real as *mut c_void);
        return if rc == ffi::SQLITE_OK {
            ffi::SQLITE_CANTOPEN
        } else {
            rc
        };
    }
    (*shim).real = real;
    (*shim).wal = flags & ffi::SQLITE_OPEN_WAL != 0;
    let state = lookup(name);
    (*shim).state = state.map_or(std::ptr::null(), Arc::into_raw);
    (*shim).base.pMethods = &SHIM_METHODS;
    ffi::SQLITE_OK
}

unsafe extern "C" fn shim_delete(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    if let Some(state) = lookup(name) {
        if state.has_crashed() {
            return ffi::SQLITE_IOERR_DELETE;
        }
    }
    let real_vfs = REAL_VFS.load(Ordering::Acquire);
    let delete = (*real_vfs).xDelete.expect("the default VFS deletes files");
    delete(real_vfs, name, sync_dir)
}

/// The wrapped file and the state of a shim file.
unsafe fn parts<'a>(
    file: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, Option<&'a FaultState>) {
    let shim = file as *mut ShimFile;
    ((*shim).real, (*shim).state.as_ref())
}

/// Whether writes to this file are refused because its runtime crashed.
unsafe fn frozen(file: *mut ffi::sqlite3_file) -> bool {
    parts(file).1.is_some_and(FaultState::has_crashed)
}

unsafe fn real_methods(real: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    &*(*real).pMethods
}

unsafe extern "C" fn shim_close(file: *mut ffi::sqlite3_file) -> c_int {
    let shim = file as *mut ShimFile;
    let real = (*shim).real;
    let rc = (real_methods(real).xClose.expect("files close"))(real);
    ffi::sqlite3_free(real as *mut c_void);
    if !(*shim).state.is_null() {
        drop(Arc::from_raw((*shim).state));
    }
    (*shim).real = std::ptr::null_mut();
    (*shim).state = std::ptr::null();
    rc
}

unsafe extern "C" fn shim_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    let real = parts(file).0;
    (real_methods(real).xRead.expect("files read"))(real, buf, amount, offset)
}

unsafe extern "C" fn shim_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    if frozen(file) {
        return ffi::SQLITE_IOERR_WRITE;
    }
    let real = parts(file).0;
    (real_methods(real).xWrite.expect("files write"))(real, buf, amount, offset)
}

unsafe extern "C" fn shim_truncate(
    file: *mut ffi::sqlite3_file,
    size: ffi::sqlite3_int64,
) -> c_int {
    if frozen(file) {
        return ffi::SQLITE_IOERR_TRUNCATE;
    }
    let real = parts(file).0;
    (real_methods(real).xTruncate.expect("files truncate"))(real, size)
}

unsafe extern "C" fn shim_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let (real, state) = parts(file);
    if let Some(state) = state {
        if state.has_crashed() {
            return ffi::SQLITE_IOERR_FSYNC;
        }
        if (*(file as *mut ShimFile)).wal {
            match state.check(Failpoint::AfterWriteBeforeSync) {
                Fault::Continue => {}
                Fault::Fail | Fault::Crash => return ffi::SQLITE_IOERR_FSYNC,
            }
        }
    }
    (real_methods(real).xSync.expect("files sync"))(real, flags)
}

unsafe extern "C" fn shim_file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    let real = parts(file).0;
    (real_methods(real).xFileSize.expect("files have a size"))(real, size)
}

unsafe extern "C" fn shim_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let real = parts(file).0;
    (real_methods(real).xLock.expect("files lock"))(real, level)
}

unsafe extern "C" fn shim_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let real = parts(file).0;
    (real_methods(real).xUnlock.expect("files unlock"))(real, level)
}

unsafe extern "C" fn shim_check_reserved_lock(
    file: *mut ffi::sqlite3_file,
    out: *mut c_int,
) -> c_int {
    let real = parts(file).0;
    (real_methods(real)
        .xCheckReservedLock
        .expect("files check locks"))(real, out)
}

unsafe extern "C" fn shim_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    let real = parts(file).0;
    (real_methods(real)
        .xFileControl
        .expect("files take controls"))(real, op, arg)
}

unsafe extern "C" fn shim_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    let real = parts(file).0;
    (real_methods(real).xSectorSize.expect("files have sectors"))(real)
}

unsafe extern "C" fn shim_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    let real = parts(file).0;
    (real_methods(real)
        .xDeviceCharacteristics
        .expect("files have device characteristics"))(real)
}

unsafe extern "C" fn shim_shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    page_size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let real = parts(file).0;
    match real_methods(real).xShmMap {
        Some(map) => map(real, page, page_size, extend, out),
        None => ffi::SQLITE_IOERR_SHMMAP,
    }
}

unsafe extern "C" fn shim_shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    let real = parts(file).0;
    match real_methods(real).xShmLock {
        Some(lock) => lock(real, offset, n, flags),
        None => ffi::SQLITE_IOERR_SHMLOCK,
    }
}

unsafe extern "C" fn shim_shm_barrier(file: *mut ffi::sqlite3_file) {
    let real = parts(file).0;
    if let Some(barrier) = real_methods(real).xShmBarrier {
        barrier(real);
    }
}

unsafe extern "C" fn shim_shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    let real = parts(file).0;
    // A crashed runtime leaves its `-shm` file behind, as a killed process does.
    let delete = if frozen(file) { 0 } else { delete };
    match real_methods(real).xShmUnmap {
        Some(unmap) => unmap(real, delete),
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn shim_fetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let real = parts(file).0;
    match real_methods(real).xFetch {
        Some(fetch) => fetch(real, offset, amount, out),
        None => {
            *out = std::ptr::null_mut();
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn shim_unfetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    page: *mut c_void,
) -> c_int {
    let real = parts(file).0;
    match real_methods(real).xUnfetch {
        Some(unfetch) => unfetch(real, offset, page),
        None => ffi::SQLITE_OK,
    }
}

/// The shim's file methods: every one forwards to the real file; writes, syncs and
/// truncates are refused once the runtime crashed, and the WAL's sync is a failpoint.
static SHIM_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(shim_close),
    xRead: Some(shim_read),
    xWrite: Some(shim_write),
    xTruncate: Some(shim_truncate),
    xSync: Some(shim_sync),
    xFileSize: Some(shim_file_size),
    xLock: Some(shim_lock),
    xUnlock: Some(shim_unlock),
    xCheckReservedLock: Some(shim_check_reserved_lock),
    xFileControl: Some(shim_file_control),
    xSectorSize: Some(shim_sector_size),
    xDeviceCharacteristics: Some(shim_device_characteristics),
    xShmMap: Some(shim_shm_map),
    xShmLock: Some(shim_shm_lock),
    xShmBarrier: Some(shim_shm_barrier),
    xShmUnmap: Some(shim_shm_unmap),
    xFetch: Some(shim_fetch),
    xUnfetch: Some(shim_unfetch),
};
