//! The embedded [`Storage`]: the SQLite file in the data directory ([`Store`]) and the
//! group-commit writer ([`Writer`]), which is also the output gate.
//!
//! What must stay true:
//! - Every read from async code runs here, on tokio's blocking pool ([`EmbeddedStorage::blocking`]),
//!   never on an async worker: a read may wait on SQLite's busy timeout or a slow disk. At most
//!   as many run at once as the store has read connections; the rest wait without a thread.
//! - Every write goes through the one writer thread, in the order it was sent.
//! - Faults (for tests) are registered before the store opens, so that its first connection
//!   already goes through their VFS, and stay registered until this storage is dropped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::actor_type::DbConfig;
use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::faults::{FaultState, Registration};
use crate::host::Payload;
use crate::metrics::WriterStats;
use crate::storage::actor_db::SqliteActorDb;
use crate::storage::seam::ActorDb;
use crate::storage::seam::Storage;
use crate::storage::seam::{ActorListing, ActorRecord, ActorSnapshot, StoredSchedule};
use crate::storage::seam::{CreateMode, Poison, Release, Writes};
use crate::storage::store::Store;
use crate::storage::writer::{Writer, WriterHandle};

/// A pending schedule as the alarm index needs it: id, actor id, due time in epoch ms.
pub(crate) type PendingSchedule = (String, String, i64);

/// The SQLite store and its writer, behind the [`Storage`] seam.
pub(crate) struct EmbeddedStorage {
    /// The database file and its read connections.
    store: Arc<Store>,
    /// Sends to the writer thread.
    writer: WriterHandle,
    /// Owns the writer thread; taken by [`Storage::close`], which waits for it to finish.
    thread: Mutex<Option<Writer>>,
    /// The writer's counters, kept after it closes.
    stats: Arc<WriterStats>,
    /// Keeps the configured faults registered for this database.
    _faults: Option<Registration>,
    /// Where actors' SQL databases live (see `actor_db.rs`).
    db_dir: PathBuf,
    /// Actors this storage created and has not loaded, committed to or deleted since, with
    /// their creation input: all that [`Storage::load`] would read back for them (no state,
    /// no connections), so a new actor's first start skips that read. Every write goes
    /// through this storage, and a commit or a delete forgets the actor's entry, so an entry
    /// always says what the row holds. At most [`FRESH_CAP`] entries: an actor created but
    /// never started (a `create` without a call) holds one until then.
    fresh: Mutex<HashMap<Arc<str>, Option<Payload>>>,
    /// One permit per read connection of the store: a read takes one before it takes a
    /// blocking-pool thread, so reads beyond the connections wait here, asynchronously,
    /// instead of each holding a thread blocked on the pool (64 new actors at once had
    /// tokio start about 36 threads for them).
    reads: Arc<tokio::sync::Semaphore>,
}

/// How many created, not yet loaded actors [`EmbeddedStorage`] remembers; beyond it a new
/// actor's first start reads its row like any other start.
const FRESH_CAP: usize = 4096;

impl EmbeddedStorage {
    /// Opens the data directory of `config` (locking it, checking and migrating the file) and
    /// starts the writer. Also returns every pending schedule, for the alarm index. Blocking
    /// I/O: call it off the async workers, or where blocking is acceptable (start-up).
    /// Must be called within a tokio runtime.
    pub(crate) fn open(config: &RuntimeConfig) -> Result<(EmbeddedStorage, Vec<PendingSchedule>)> {
        let faults = match &config.faults {
            Some(injector) => {
                std::fs::create_dir_all(&config.data_dir)
                    .map_err(|e| Error::io(format!("creating {}", config.data_dir.display()), e))?;
                let db_file = config.data_dir.join(crate::storage::store::DB_FILE);
                Some(FaultState::register(injector, &db_file)?)
            }
            None => None,
        };
        let (faults, registration) = faults.unzip();
        let store = Store::open(&config.data_dir, config.durability)?;
        let writer = Writer::start(&store, faults)?;
        let pending = store.all_schedules()?;
        let storage = EmbeddedStorage {
            writer: writer.handle(),
            stats: writer.stats().clone(),
            thread: Mutex::new(Some(writer)),
            store,
            _faults: registration,
            db_dir: config.data_dir.join(crate::storage::actor_db::DB_DIR),
            fresh: Mutex::new(HashMap::new()),
            reads: Arc::new(tokio::sync::Semaphore::new(
                crate::storage::store::MAX_READERS,
            )),
        };
        Ok((storage, pending))
    }

    /// The writer's counters.
    pub(crate) fn stats(&self) -> &Arc<WriterStats> {
        &self.stats
    }

    /// The store itself, for tests that hold its locks.
    #[cfg(test)]
    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The one path by which async code reads the database: `read` runs on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        // Never closed, so this only waits. The read holds its permit until it ends, even if
        // its caller stops waiting for it.
        let permit = self.reads.clone().acquire_owned().await;
        let permit = permit.map_err(|_| Error::RegistryShutDown)?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            read(&store)
        })
        .await
        .map_err(|err| Error::ActorInternal {
            message: format!("a storage read panicked: {err}"),
        })?
    }
}

#[async_trait]
impl Storage for EmbeddedStorage {
    async fn load(&self, actor_id: &str) -> Result<Option<ActorSnapshot>> {
        if let Some(input) = self.fresh.lock().remove(actor_id) {
            return Ok(Some(ActorSnapshot {
                state: None,
                input,
                conns: Vec::new(),
            }));
        }
        let id = actor_id.to_string();
        self.blocking(move |store| store.load(&id)).await
    }

    async fn find_by_key(&self, name: &str, key: &str) -> Result<Option<ActorRecord>> {
        let (name, key) = (name.to_string(), key.to_string());
        self.blocking(move |store| store.find_by_key(&name, &key))
            .await
    }

    async fn find_by_id(&self, id: &str) -> Result<Option<ActorRecord>> {
        let id = id.to_string();
        self.blocking(move |store| store.find_by_id(&id)).await
    }

    async fn create(
        &self,
        record: ActorRecord,
        input: Option<Payload>,
        mode: CreateMode,
    ) -> Result<(ActorRecord, bool)> {
        let kept = input.clone();
        let (record, created) = self.writer.create_actor(record, input, mode).await?;
        if created {
            let mut fresh = self.fresh.lock();
            if fresh.len() < FRESH_CAP {
                fresh.insert(Arc::from(record.id.as_str()), kept);
            }
        }
        Ok((record, created))
    }

    fn commit(
        &self,
        actor_id: Arc<str>,
        writes: Option<Box<Writes>>,
        poison: Option<Arc<Poison>>,
        release: Release,
        alone: bool,
    ) {
        {
            let mut fresh = self.fresh.lock();
            if !fresh.is_empty() {
                fresh.remove(&actor_id);
            }
        }
        self.writer.commit(actor_id, writes, poison, release, alone);
    }

    async fn delete(&self, actor_id: Arc<str>) -> Result<()> {
        self.fresh.lock().remove(&actor_id);
        self.writer.delete_actor(actor_id.clone()).await?;
        // Only once the actor's rows (its SQL log among them) are gone: a crash in between
        // leaves a file no actor names, never an actor whose file is missing.
        let dir = self.db_dir.clone();
        tokio::task::spawn_blocking(move || crate::storage::actor_db::remove_db(&dir, &actor_id))
            .await
            .map_err(|err| Error::ActorInternal {
                message: format!("removing an actor's database panicked: {err}"),
            })?
    }

    async fn open_db(&self, actor_id: Arc<str>, config: DbConfig) -> Result<Arc<dyn ActorDb>> {
        let dir = self.db_dir.clone();
        let span = tracing::Span::current();
        self.blocking(move |store| {
            let _entered = span.enter();
            let log = store.db_log(&actor_id)?;
            let db = SqliteActorDb::open(&dir, &actor_id, config, log)?;
            Ok(Arc::new(db) as Arc<dyn ActorDb>)
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.writer.flush().await
    }

    async fn kv_get(&self, actor_id: &str, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>> {
        let id = actor_id.to_string();
        self.blocking(move |store| store.kv_get(&id, &keys)).await
    }

    async fn kv_list(
        &self,
        actor_id: &str,
        prefix: Vec<u8>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let id = actor_id.to_string();
        self.blocking(move |store| store.kv_list(&id, &prefix, limit, reverse))
            .await
    }

    async fn kv_page(
        &self,
        actor_id: &str,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let id = actor_id.to_string();
        self.blocking(move |store| store.kv_page(&id, &prefix, after.as_deref(), limit))
            .await
    }

    async fn schedules_of(&self, actor_id: &str) -> Result<Vec<StoredSchedule>> {
        let id = actor_id.to_string();
        self.blocking(move |store| store.schedules_of(&id)).await
    }

    async fn schedule(&self, id: &str) -> Result<Option<StoredSchedule>> {
        let id = id.to_string();
        self.blocking(move |store| store.schedule(&id)).await
    }

    async fn list_actors(
        &self,
        name: Option<String>,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<ActorListing>> {
        self.blocking(move |store| {
            let after = after.as_ref().map(|(n, k)| (n.as_str(), k.as_str()));
            store.list_actors(name.as_deref(), after, limit)
        })
        .await
    }

    async fn actor_listing(&self, id: &str) -> Result<Option<ActorListing>> {
        let id = id.to_string();
        self.blocking(move |store| store.actor_listing(&id)).await
    }

    fn health(&self) -> Result<()> {
        self.store.integrity().check()
    }

    async fn close(&self) {
        let writer = self.thread.lock().take();
        if let Some(writer) = writer {
            writer.close().await;
        }
        self.store.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Encoding;
    use crate::storage::seam::{ConnWrite, StoredConn};

    /// Commits `conns` for `actor_id` and waits until they are durable.
    async fn commit(storage: &EmbeddedStorage, actor_id: &str, conns: Vec<ConnWrite>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let writes = Writes {
            conns,
            ..Writes::default()
        };
        storage.commit(
            Arc::from(actor_id),
            Some(Box::new(writes)),
            None,
            Box::new(move |result| drop(tx.send(result))),
            false,
        );
        rx.await.unwrap().unwrap();
    }

    fn record(id: &str) -> ActorRecord {
        ActorRecord {
            id: id.into(),
            name: "room".into(),
            key: format!("key-{id}"),
        }
    }

    /// A new actor's first load comes from what its creation wrote, not a read: it must say
    /// the same as the row, and nothing once the actor is deleted or committed to.
    #[tokio::test]
    async fn a_new_actor_loads_its_input_and_a_deleted_one_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = RuntimeConfig {
            data_dir: dir.path().to_path_buf(),
            // Thousands of creations below: no sync for each.
            durability: crate::config::Durability::Relaxed,
            ..RuntimeConfig::default()
        };
        let (storage, _) = EmbeddedStorage::open(&config).unwrap();
        let input = Payload::json("[1,2]");
        let (_, created) = storage
            .create(record("a1"), Some(input.clone()), CreateMode::Create)
            .await
            .unwrap();
        assert!(created);
        let loaded = storage.load("a1").await.unwrap().unwrap();
        assert_eq!(loaded.state, None);
        assert_eq!(loaded.input, Some(input.clone()));
        // The second load reads the row, and finds the same.
        let again = storage.load("a1").await.unwrap().unwrap();
        assert_eq!((again.state, again.input), (None, Some(input)));

        // Created, then deleted before its first start: nothing to load.
        storage
            .create(record("a2"), None, CreateMode::Create)
            .await
            .unwrap();
        storage.delete(Arc::from("a2")).await.unwrap();
        assert!(storage.load("a2").await.unwrap().is_none());

        // Created, then given state before its first load: the load sees the state.
        storage
            .create(record("a3"), None, CreateMode::Create)
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let writes = Writes {
            state: Some(b"\xa0".to_vec()),
            ..Writes::default()
        };
        storage.commit(
            Arc::from("a3"),
            Some(Box::new(writes)),
            None,
            Box::new(move |result| drop(tx.send(result))),
            false,
        );
        rx.await.unwrap().unwrap();
        assert_eq!(
            storage.load("a3").await.unwrap().unwrap().state,
            Some(b"\xa0".to_vec())
        );

        // Beyond the cap, new actors load by a read, and load the same.
        for i in 0..FRESH_CAP + 2 {
            storage
                .create(record(&format!("m{i}")), None, CreateMode::Create)
                .await
                .unwrap();
        }
        for i in [0, FRESH_CAP - 1, FRESH_CAP, FRESH_CAP + 1] {
            let loaded = storage.load(&format!("m{i}")).await.unwrap().unwrap();
            assert_eq!((loaded.state, loaded.input), (None, None));
        }
        storage.close().await;
    }

    /// Reads beyond the store's connections wait for a permit, not each on a blocking
    /// thread of its own: 32 reads stuck behind a held read pool start at most
    /// `MAX_READERS` threads (without the permits, one each).
    #[test]
    fn reads_beyond_the_connections_wait_without_a_thread_each() {
        const NAME: &str = "keel-reads-test";
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(NAME)
            .enable_all()
            .build()
            .unwrap();
        let threads = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == NAME)
                .count()
        };
        let dir = tempfile::tempdir().unwrap();
        let config = RuntimeConfig {
            data_dir: dir.path().to_path_buf(),
            ..RuntimeConfig::default()
        };
        let storage = {
            let _entered = runtime.enter();
            Arc::new(EmbeddedStorage::open(&config).unwrap().0)
        };
        // A new thread names itself once it runs: wait until the threads the open started
        // (the worker, the writer) all carry the runtime's name, so none of them is counted
        // as started for the reads.
        let mut before = threads();
        let mut stable = 0;
        for _ in 0..250 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let now = threads();
            stable = if now == before { stable + 1 } else { 0 };
            before = now;
            if stable == 5 {
                break;
            }
        }
        let held = storage.store().hold_readers();
        let reads: Vec<_> = (0..32)
            .map(|i| {
                let storage = storage.clone();
                runtime.spawn(async move { storage.load(&format!("x{i}")).await })
            })
            .collect();
        // Time for the runtime to start whatever threads it would start for them.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let during = threads();
        drop(held);
        for read in reads {
            assert!(runtime.block_on(read).unwrap().unwrap().is_none());
        }
        assert!(
            during - before <= crate::storage::store::MAX_READERS,
            "{} threads started for 32 waiting reads",
            during - before
        );
        runtime.block_on(storage.close());
    }

    #[tokio::test]
    async fn durable_connections_are_written_loaded_and_deleted_with_their_actor() {
        let dir = tempfile::tempdir().unwrap();
        let config = RuntimeConfig {
            data_dir: dir.path().to_path_buf(),
            ..RuntimeConfig::default()
        };
        let (storage, _) = EmbeddedStorage::open(&config).unwrap();
        let record = ActorRecord {
            id: "a1".into(),
            name: "room".into(),
            key: "k".into(),
        };
        storage
            .create(record, None, CreateMode::Create)
            .await
            .unwrap();
        let stored = |id: &str, state: Option<&[u8]>| StoredConn {
            id: id.into(),
            token: format!("token-{id}"),
            encoding: Encoding::Json,
            params: b"null".to_vec(),
            state: state.map(<[u8]>::to_vec),
        };
        commit(
            &storage,
            "a1",
            vec![
                ConnWrite::Open(stored("c1", None)),
                ConnWrite::Open(stored("c2", Some(&[0x01]))),
                ConnWrite::State {
                    id: "c1".into(),
                    state: vec![0x02],
                },
            ],
        )
        .await;
        let conns = storage.load("a1").await.unwrap().unwrap().conns;
        assert_eq!(
            conns,
            [stored("c1", Some(&[0x02])), stored("c2", Some(&[0x01]))]
        );
        commit(&storage, "a1", vec![ConnWrite::Close { id: "c2".into() }]).await;
        let conns = storage.load("a1").await.unwrap().unwrap().conns;
        assert_eq!(conns, [stored("c1", Some(&[0x02]))]);
        storage.delete(Arc::from("a1")).await.unwrap();
        let left: i64 = storage
            .store()
            .connect(false)
            .unwrap()
            .query_row("SELECT count(*) FROM conns", [], |row| row.get(0))
            .unwrap();
        assert_eq!(left, 0, "destroying an actor deletes its connections");
        storage.close().await;
    }
}
