//! keel-core's `Storage` seam over the engine: each actor this envoy runs has its own
//! [`ActorStore`], opened for the activation's generation when the engine starts the actor
//! and dropped when it stops it.
//!
//! What must stay true:
//! - Every write goes through the actor's store, so it is fenced by the activation's
//!   generation and released only once its batch was acknowledged (the output gate).
//! - An actor this envoy does not run has no storage here: its commits are refused with
//!   `actor.stopped` and its reads find nothing, so a stopped activation writes nothing.
//! - A failed commit marks the instance's poison, as the embedded writer does, so the actor's
//!   task replaces its instance before it runs on top of writes that did not land. The new
//!   instance's load renews the actor's store (the failed one refuses everything after its
//!   failure), so the actor writes again once it runs on what is committed.
//! - An actor's SQL database (`c.db`) is a local copy per activation, rebuilt from what the
//!   engine holds when it opens (`db.rs`); its changes travel in the call's commit.
//! - Creating actors by key is the engine's job (its gateway resolves `rvt-*` queries):
//!   `create` is refused with `actor.not_found`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::store::{ActorListing, ActorRecord, ActorSnapshot, StoredSchedule};
use keel_core::writer::{CreateMode, Poison, Release, Writes};
use keel_core::{ActorDb, DbConfig, Error, Payload, Result, Storage};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::storage::{ActorStore, Snapshot};

/// One actor this envoy runs.
struct Open {
    store: Arc<ActorStore>,
    record: ActorRecord,
    created_at_ms: i64,
    /// The snapshot the store loaded when it opened, handed to the task's first load so a
    /// start costs one round trip; later loads (a restarted instance) read again.
    first: Option<Snapshot>,
}

/// The engine-backed storage of one envoy's runtime.
pub struct EngineStorage {
    open: Mutex<HashMap<Arc<str>, Open>>,
    /// The folder of this process's local copies of actors' SQL databases.
    db_dir: PathBuf,
}

impl Default for EngineStorage {
    /// Local copies go under the system's temporary folder, in a folder of this process; the
    /// folders of processes that are gone (killed before they closed their copies) are
    /// removed, where `/proc` tells which are.
    fn default() -> Self {
        let root = std::env::temp_dir().join("keel-engine-db");
        remove_copies_of_gone_processes(&root);
        EngineStorage::with_db_dir(root.join(std::process::id().to_string()))
    }
}

/// Removes the folders under `root` named by the id of a process that no longer runs. Best
/// effort, and only where `/proc` lists processes (elsewhere nothing is removed).
fn remove_copies_of_gone_processes(root: &std::path::Path) {
    let proc = std::path::Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !proc.join(pid.to_string()).exists() {
            if let Err(err) = std::fs::remove_dir_all(entry.path()) {
                tracing::debug!(error = %err, "removing a gone process's SQL copies failed");
            }
        }
    }
}

impl EngineStorage {
    /// Storage whose local copies of actors' SQL databases go in `db_dir`.
    pub fn with_db_dir(db_dir: PathBuf) -> Self {
        EngineStorage {
            open: Mutex::default(),
            db_dir,
        }
    }

    /// Adds the store of an actor the engine started, with what it loaded on opening.
    pub fn insert(
        &self,
        store: ActorStore,
        record: ActorRecord,
        created_at_ms: i64,
        first: Snapshot,
    ) {
        let id: Arc<str> = record.id.as_str().into();
        self.open.lock().insert(
            id,
            Open {
                store: Arc::new(store),
                record,
                created_at_ms,
                first: Some(first),
            },
        );
    }

    /// Drops the actor's store once its activation at `generation` stopped; a newer
    /// activation's store stays.
    pub fn remove(&self, actor_id: &str, generation: u32) {
        let mut open = self.open.lock();
        if open
            .get(actor_id)
            .is_some_and(|entry| entry.store.generation() == generation)
        {
            open.remove(actor_id);
        }
    }

    /// Replaces `failed`, the actor's store, with a fresh one of the same activation.
    fn renew(&self, actor_id: &str, failed: &Arc<ActorStore>, snapshot: &Snapshot) {
        let mut open = self.open.lock();
        if let Some(entry) = open.get_mut(actor_id) {
            if Arc::ptr_eq(&entry.store, failed) {
                tracing::debug!(%actor_id, "renewing the actor's store after a failed batch");
                entry.store = Arc::new(failed.renewed(snapshot));
            }
        }
    }

    /// The store of an actor this envoy runs.
    pub(crate) fn store_of(&self, actor_id: &str) -> Option<Arc<ActorStore>> {
        self.store(actor_id)
    }

    fn store(&self, actor_id: &str) -> Option<Arc<ActorStore>> {
        self.open
            .lock()
            .get(actor_id)
            .map(|entry| entry.store.clone())
    }

    fn stores(&self) -> Vec<Arc<ActorStore>> {
        self.open
            .lock()
            .values()
            .map(|entry| entry.store.clone())
            .collect()
    }

    fn listing(entry: &Open) -> ActorListing {
        ActorListing {
            id: entry.record.id.clone(),
            name: entry.record.name.clone(),
            key: entry.record.key.clone(),
            created_at_ms: entry.created_at_ms,
        }
    }
}

/// Commits nothing through `store` and resolves once every earlier commit of it is released.
async fn settle(store: &ActorStore) -> Result<()> {
    let (tx, rx) = oneshot::channel();
    store.commit(
        Writes::default(),
        Box::new(move |result| {
            // The waiter may be gone; nothing to tell then.
            let _ = tx.send(result);
        }),
    );
    rx.await.map_err(|_| Error::WriterClosed)?
}

#[async_trait]
impl Storage for EngineStorage {
    async fn load(&self, actor_id: &str) -> Result<Option<ActorSnapshot>> {
        let (first, store) = {
            let mut open = self.open.lock();
            let Some(entry) = open.get_mut(actor_id) else {
                return Ok(None);
            };
            (entry.first.take(), entry.store.clone())
        };
        let snapshot = match first {
            Some(snapshot) => Some(snapshot),
            None => {
                let snapshot = store.load().await?;
                if let (Some(snapshot), true) = (&snapshot, store.has_failed()) {
                    // A restarted instance after a failed batch (say, the engine's connection
                    // dropped with it in flight): it runs on what is committed again, so its
                    // commits go through a fresh store instead of the latched one.
                    self.renew(actor_id, &store, snapshot);
                }
                snapshot
            }
        };
        Ok(snapshot.map(|snapshot| snapshot.core()))
    }

    async fn find_by_key(&self, name: &str, key: &str) -> Result<Option<ActorRecord>> {
        let open = self.open.lock();
        Ok(open
            .values()
            .find(|entry| entry.record.name == name && entry.record.key == key)
            .map(|entry| entry.record.clone()))
    }

    async fn find_by_id(&self, id: &str) -> Result<Option<ActorRecord>> {
        Ok(self.open.lock().get(id).map(|entry| entry.record.clone()))
    }

    /// The engine creates actors; this finds an actor that is open here by its key.
    async fn create(
        &self,
        record: ActorRecord,
        _input: Option<Payload>,
        mode: CreateMode,
    ) -> Result<(ActorRecord, bool)> {
        match self.find_by_key(&record.name, &record.key).await? {
            Some(found) => mode.answer_existing(found),
            None => Err(Error::ActorNotFound),
        }
    }

    fn commit(
        &self,
        actor_id: Arc<str>,
        writes: Option<Box<Writes>>,
        poison: Option<Arc<Poison>>,
        release: Release,
        // Every batch goes to the engine from the actor's commit task; nothing runs inline.
        _alone: bool,
    ) {
        if let Some(err) = poison.as_ref().and_then(|poison| poison.refusal()) {
            release(Err(err));
            return;
        }
        let Some(store) = self.store(&actor_id) else {
            release(Err(Error::ActorStopped));
            return;
        };
        let writes = writes.map(|writes| *writes).unwrap_or_default();
        store.commit(
            writes,
            Box::new(move |result| {
                if let (Err(err), Some(poison)) = (&result, &poison) {
                    poison.set(err);
                }
                release(result);
            }),
        );
    }

    async fn delete(&self, actor_id: Arc<str>) -> Result<()> {
        let store = self.store(&actor_id).ok_or(Error::ActorStopped)?;
        let (tx, rx) = oneshot::channel();
        store.delete(Box::new(move |result| {
            // The waiter may be gone; nothing to tell then.
            let _ = tx.send(result);
        }));
        rx.await.map_err(|_| Error::WriterClosed)?
    }

    async fn flush(&self) -> Result<()> {
        for store in self.stores() {
            match settle(&store).await {
                // A destroyed actor's store refuses everything after its delete with
                // `actor.not_found` (nothing else answers that): it has nothing left to flush.
                Err(Error::ActorNotFound) => {}
                other => other?,
            }
        }
        Ok(())
    }

    async fn kv_get(&self, actor_id: &str, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>> {
        let store = self.store(actor_id).ok_or(Error::ActorStopped)?;
        store.kv_get(&keys).await
    }

    async fn kv_list(
        &self,
        actor_id: &str,
        prefix: Vec<u8>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let store = self.store(actor_id).ok_or(Error::ActorStopped)?;
        store.kv_list(&prefix, limit, reverse).await
    }

    async fn kv_page(
        &self,
        actor_id: &str,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let store = self.store(actor_id).ok_or(Error::ActorStopped)?;
        let entries = store.kv_list(&prefix, usize::MAX, false).await?;
        Ok(entries
            .into_iter()
            .filter(|(key, _)| after.as_ref().is_none_or(|after| key > after))
            .take(limit)
            .collect())
    }

    async fn schedules_of(&self, actor_id: &str) -> Result<Vec<StoredSchedule>> {
        let Some(store) = self.store(actor_id) else {
            return Ok(Vec::new());
        };
        Ok(store
            .load()
            .await?
            .map(|snapshot| snapshot.schedules)
            .unwrap_or_default())
    }

    async fn schedule(&self, id: &str) -> Result<Option<StoredSchedule>> {
        for store in self.stores() {
            if let Some(snapshot) = store.load().await? {
                if let Some(found) = snapshot.schedules.into_iter().find(|s| s.schedule.id == id) {
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }

    async fn list_actors(
        &self,
        name: Option<String>,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<ActorListing>> {
        let open = self.open.lock();
        let mut listings: Vec<ActorListing> = open
            .values()
            .filter(|entry| name.as_ref().is_none_or(|name| &entry.record.name == name))
            .map(EngineStorage::listing)
            .filter(|listing| {
                after.as_ref().is_none_or(|(name, key)| {
                    (listing.name.as_str(), listing.key.as_str()) > (name.as_str(), key.as_str())
                })
            })
            .collect();
        listings.sort_by(|a, b| (&a.name, &a.key).cmp(&(&b.name, &b.key)));
        listings.truncate(limit);
        Ok(listings)
    }

    async fn actor_listing(&self, id: &str) -> Result<Option<ActorListing>> {
        Ok(self.open.lock().get(id).map(EngineStorage::listing))
    }

    fn health(&self) -> Result<()> {
        Ok(())
    }

    async fn open_db(&self, actor_id: Arc<str>, config: DbConfig) -> Result<Arc<dyn ActorDb>> {
        let store = self.store(&actor_id).ok_or(Error::ActorStopped)?;
        crate::db::open(store, config, &self.db_dir).await
    }

    async fn close(&self) {
        if let Err(err) = self.flush().await {
            tracing::warn!(error = %err, "flushing engine storage on close failed");
        }
    }
}
