//! Each actor's SQL database (`c.db`) in engine mode: the engine's per-actor SQLite holds the
//! truth, and each activation runs the user's SQL on a local copy rebuilt when it starts.
//!
//! What the engine holds, next to the actor's state (`storage.rs`'s schema):
//! - `keel_db_log`: the SQLite changeset of each call that changed the database, under the
//!   actor's next change number, in parts of [`PART_BYTES`] (engine 2.3.19 refuses a bound
//!   value over 128 KiB: seen as `storage.io` for a 130 KiB changeset). It goes in the call's own commit (`Writes::db`), so it is in
//!   the same generation-fenced batch as the call's state, KV and schedules: a zombie owner's
//!   SQL is refused with its state, and a call's SQL lands with the rest of the call or not.
//! - `keel_db_image` and `keel_db_head`: an image of the whole database file (`VACUUM INTO`),
//!   in parts of [`PART_BYTES`], with the newest change it holds. Log rows up to it are
//!   dropped by the batch that makes it the head.
//!
//! What must stay true:
//! - Starting an activation reads the head, the image's parts and the log rows newer than
//!   it, in batches of at most [`READ_BATCH_BYTES`], writes the image to a fresh local file
//!   (per process and generation, so two processes or two activations never share one) and
//!   applies the rows with keel-core's own replay (`actor_db::open_copy`). From there, the
//!   call's transaction, the changeset, the limits and the authorizer are the embedded ones.
//! - A schema change cannot travel in a changeset, so a migration that committed anything
//!   (seen by a second connection's `PRAGMA data_version`) is followed, before the start goes
//!   on, by a new image: the log never holds a change the image's schema cannot take. A log
//!   that grew past [`COMPACT_LOG_BYTES`] or [`COMPACT_LOG_ROWS`] since the head makes a new
//!   image too: at a start (before the start goes on), and while the actor is awake (in the
//!   background, after the change that crossed the bound was committed; one at a time). So
//!   the log stays bounded, and a start reads a bounded log.
//! - An image is written in batches of [`PARTS_PER_WRITE`] parts, under a new image number, then made
//!   the head by one last batch; a start only ever reads the head's parts, so an image cut
//!   off half way is never read (and its parts are dropped by the next head).
//! - Images go through the actor's commit queue, so they are fenced like every write and
//!   ordered with its commits.
//! - An image holds only what the local file committed, which is only what the engine
//!   acknowledged (a call's change is committed to the file once its batch is), under the
//!   number of the newest change in it: the log rows it drops are in it.
//! - The local file is the activation's alone and is removed when the database closes, after
//!   an image being written from it is done.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::actor_db::{db_path, open_copy, remove_copy, DbWatch};
use keel_core::{ActorDb, DbChange, DbConfig, Error, MigrationStep, Result};
use parking_lot::Mutex;
use tracing::Instrument as _;

use crate::sql::{damage, Rows, Statement, Value};
use crate::storage::ActorStore;

/// The most bytes one stored part of a changeset or an image holds: under the engine's limit
/// on one bound value.
pub const PART_BYTES: usize = 96 * 1024;

/// How many image parts one batch writes.
const PARTS_PER_WRITE: usize = 8;

/// The most bytes of image parts or log rows one read batch asks for (the engine answers up
/// to 20 MiB).
const READ_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// A log grown by more bytes than this since the head makes a new image.
const COMPACT_LOG_BYTES: usize = 1024 * 1024;

/// A log grown by more changes than this since the head makes a new image.
const COMPACT_LOG_ROWS: usize = 256;

/// The image of an actor's database the engine holds.
struct Head {
    image: i64,
    seq: i64,
    parts: i64,
    bytes: i64,
}

/// Opens the database of the actor whose activation writes through `store`: see the module
/// doc. `dir` is the process's folder of local copies.
pub(crate) async fn open(
    store: Arc<ActorStore>,
    config: DbConfig,
    dir: &Path,
) -> Result<Arc<dyn ActorDb>> {
    let actor_id: Arc<str> = store.actor_id().into();
    let results = store
        .read(vec![
            Statement::plain("SELECT image, seq, parts, bytes FROM keel_db_head WHERE id = 1"),
            Statement::plain("SELECT seq, part, length(bytes) FROM keel_db_log ORDER BY seq, part"),
        ])
        .await?;
    let [head, log_index]: [_; 2] = results
        .try_into()
        .map_err(|_| damage(&actor_id, "a read returned the wrong number of results"))?;
    let log_index = Rows::new(&actor_id, log_index).values(3)?;
    let head = match Rows::new(&actor_id, head).values(4)?.pop() {
        Some(row) => {
            let [image, seq, parts, bytes]: [Value; 4] = row
                .try_into()
                .map_err(|_| damage(&actor_id, "the SQL image's head has the wrong width"))?;
            Some(Head {
                image: image.integer(&actor_id, "the SQL image's number")?,
                seq: seq.integer(&actor_id, "the SQL image's change number")?,
                parts: parts.integer(&actor_id, "the SQL image's part count")?,
                bytes: bytes.integer(&actor_id, "the SQL image's size")?,
            })
        }
        None => None,
    };
    let image = match &head {
        Some(head) => Some(read_image(&store, head).await?),
        None => None,
    };
    let since = head.as_ref().map_or(0, |head| head.seq);
    let mut wanted = Vec::new();
    for row in log_index {
        let [seq, part, len]: [Value; 3] = row
            .try_into()
            .map_err(|_| damage(&actor_id, "a SQL log row has the wrong width"))?;
        let seq = seq.integer(&actor_id, "a SQL change number")?;
        let part = part.integer(&actor_id, "a SQL change's part")?;
        let len = len.integer(&actor_id, "a SQL change's size")?;
        if seq > since {
            wanted.push((seq, part, usize::try_from(len).unwrap_or(usize::MAX)));
        }
    }
    let log = read_log(&store, &wanted).await?;
    let replayed_bytes: usize = log.iter().map(|(_, changeset)| changeset.len()).sum();
    let replayed_rows = log.len();

    let path = db_path(dir, &format!("{actor_id}.{}", store.generation()));
    let (inner, watch) = {
        let path = path.clone();
        let actor_id = actor_id.clone();
        blocking(move || {
            let inner = open_copy(&path, &actor_id, config, image.as_deref(), log)?;
            let watch = DbWatch::open(&path)?;
            Ok((inner, watch))
        })
        .await?
    };
    let db = Arc::new(EngineActorDb {
        inner,
        images: Arc::new(Images {
            watch: Arc::new(watch),
            store,
            next_image: AtomicI64::new(head.as_ref().map_or(1, |head| head.image + 1)),
            grown: Mutex::new(Grown {
                rows: replayed_rows,
                bytes: replayed_bytes,
                ..Grown::default()
            }),
            writing: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
        }),
        path,
    });
    if db.images.grown.lock().over_bound() {
        tracing::debug!(
            replayed_bytes,
            replayed_rows,
            "writing a new image of the actor's SQL database"
        );
        if let Err(err) = db.images.write().await {
            db.close().await;
            return Err(err);
        }
    }
    Ok(db)
}

/// The head's image, part by part, checked against its recorded size.
async fn read_image(store: &ActorStore, head: &Head) -> Result<Vec<u8>> {
    let actor_id = store.actor_id();
    let per_batch = (READ_BATCH_BYTES / PART_BYTES).max(1) as i64;
    let mut image = Vec::with_capacity(usize::try_from(head.bytes).unwrap_or(0));
    let mut part = 0;
    while part < head.parts {
        let last = (part + per_batch).min(head.parts);
        let statements = (part..last)
            .map(|part| {
                Statement::new(
                    "SELECT bytes FROM keel_db_image WHERE image = ? AND part = ?",
                    vec![head.image.into(), part.into()],
                )
            })
            .collect();
        for result in store.read(statements).await? {
            let mut row = Rows::new(actor_id, result)
                .values(1)?
                .pop()
                .ok_or_else(|| damage(actor_id, "a part of the SQL image is missing"))?;
            image.extend(row.remove(0).blob(actor_id, "a part of the SQL image")?);
        }
        part = last;
    }
    if i64::try_from(image.len()) != Ok(head.bytes) {
        return Err(damage(
            actor_id,
            format!(
                "the SQL image has {} bytes, its head says {}",
                image.len(),
                head.bytes
            ),
        ));
    }
    Ok(image)
}

/// The changesets of log parts `wanted` (number, part, size; in order), in bounded batches.
async fn read_log(store: &ActorStore, wanted: &[(i64, i64, usize)]) -> Result<Vec<(u64, Vec<u8>)>> {
    let actor_id = store.actor_id();
    let mut log: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut rest = wanted;
    while !rest.is_empty() {
        let mut bytes = 0;
        let mut take = 0;
        while take < rest.len() && (take == 0 || bytes + rest[take].2 <= READ_BATCH_BYTES) {
            bytes += rest[take].2;
            take += 1;
        }
        let (batch, later) = rest.split_at(take);
        rest = later;
        let statements = batch
            .iter()
            .map(|(seq, part, _)| {
                Statement::new(
                    "SELECT bytes FROM keel_db_log WHERE seq = ? AND part = ?",
                    vec![(*seq).into(), (*part).into()],
                )
            })
            .collect();
        for ((seq, part, _), result) in batch.iter().zip(store.read(statements).await?) {
            let mut row = Rows::new(actor_id, result)
                .values(1)?
                .pop()
                .ok_or_else(|| damage(actor_id, format!("SQL change {seq} is missing")))?;
            let bytes = row.remove(0).blob(actor_id, "a SQL changeset")?;
            let seq = u64::try_from(*seq).unwrap_or(0);
            match log.last_mut() {
                Some((last, changeset)) if *last == seq && *part > 0 => changeset.extend(bytes),
                _ if *part == 0 => log.push((seq, bytes)),
                _ => {
                    return Err(damage(
                        actor_id,
                        format!("SQL change {seq} misses parts before {part}"),
                    ))
                }
            }
        }
    }
    Ok(log)
}

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| Error::ActorInternal {
            message: format!("work on an actor's SQL database panicked: {err}"),
        })?
}

/// One activation's database: keel-core's, on the local copy, plus the images that keep the
/// engine's copy whole.
struct EngineActorDb {
    inner: Arc<dyn ActorDb>,
    images: Arc<Images>,
    path: PathBuf,
}

/// How much the log grew since the head, as this activation saw it.
#[derive(Default)]
struct Grown {
    rows: usize,
    bytes: usize,
    /// The change prepared and not finished yet, and its size.
    prepared: Option<(u64, usize)>,
    /// Whether an image is being written in the background.
    imaging: bool,
}

impl Grown {
    fn over_bound(&self) -> bool {
        self.rows > COMPACT_LOG_ROWS || self.bytes > COMPACT_LOG_BYTES
    }
}

/// What writes the images of one activation's database.
struct Images {
    watch: Arc<DbWatch>,
    store: Arc<ActorStore>,
    /// The number the next image is written under.
    next_image: AtomicI64,
    grown: Mutex<Grown>,
    /// Held while an image is written: the close waits for it before removing the file.
    writing: tokio::sync::Mutex<()>,
    /// Set by the close: no image starts after it.
    closed: AtomicBool,
}

impl Images {
    /// Takes an image of the local copy and makes it the engine's head (see the module doc).
    async fn write(&self) -> Result<()> {
        let watch = self.watch.clone();
        let (counted_rows, counted_bytes) = {
            let grown = self.grown.lock();
            (grown.rows, grown.bytes)
        };
        let (seq, bytes) = blocking(move || watch.image()).await?;
        let image = self.next_image.fetch_add(1, Ordering::Relaxed);
        let parts: Vec<Statement> = bytes
            .chunks(PART_BYTES)
            .enumerate()
            .map(|(part, chunk)| put_part(image, part as i64, chunk))
            .collect();
        if parts.is_empty() {
            return Err(damage(self.store.actor_id(), "the SQL image is empty"));
        }
        let count = parts.len() as i64;
        let mut batches: Vec<Vec<Statement>> = Vec::new();
        let mut parts = parts.into_iter().peekable();
        while parts.peek().is_some() {
            batches.push(parts.by_ref().take(PARTS_PER_WRITE).collect());
        }
        let mut last = batches.pop().unwrap_or_default();
        for batch in batches {
            self.store.write(batch).await?;
        }
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        last.extend([
            Statement::new(
                "DELETE FROM keel_db_image WHERE image <> ? OR part >= ?",
                vec![image.into(), count.into()],
            ),
            Statement::new(
                "INSERT INTO keel_db_head (id, image, seq, parts, bytes) VALUES (1, ?, ?, ?, ?) \
                     ON CONFLICT (id) DO UPDATE SET image = excluded.image, seq = excluded.seq, \
                     parts = excluded.parts, bytes = excluded.bytes",
                vec![
                    image.into(),
                    seq.into(),
                    count.into(),
                    (bytes.len() as i64).into(),
                ],
            ),
            Statement::new("DELETE FROM keel_db_log WHERE seq <= ?", vec![seq.into()]),
        ]);
        self.store.write(last).await?;
        {
            // What was counted before the image was taken is in it (and what was counted
            // since may be too: counted again, it only brings the next image sooner).
            let mut grown = self.grown.lock();
            grown.rows = grown.rows.saturating_sub(counted_rows);
            grown.bytes = grown.bytes.saturating_sub(counted_bytes);
        }
        tracing::debug!(
            image,
            seq,
            bytes = bytes.len(),
            parts = count,
            "wrote an image of the actor's SQL database"
        );
        Ok(())
    }

    /// Counts a change the engine acknowledged and, once the log is past its bound, starts
    /// writing an image in the background (unless one is being written).
    fn committed(self: &Arc<Self>, seq: u64) {
        {
            let mut grown = self.grown.lock();
            match grown.prepared.take() {
                Some((prepared, bytes)) if prepared == seq => {
                    grown.rows += 1;
                    grown.bytes += bytes;
                }
                other => grown.prepared = other,
            }
            if !grown.over_bound() || grown.imaging || self.closed.load(Ordering::Acquire) {
                return;
            }
            grown.imaging = true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Commits are released on keel's runtime; without one the next start compacts.
            self.grown.lock().imaging = false;
            return;
        };
        let images = self.clone();
        let span = tracing::debug_span!("sql_image", actor_id = %self.store.actor_id());
        runtime.spawn(
            async move {
                {
                    let _writing = images.writing.lock().await;
                    if !images.closed.load(Ordering::Acquire) {
                        tracing::debug!("writing a new image of the actor's SQL database");
                        match images.write().await {
                            Ok(()) => {}
                            // A successor owns the actor: its start compacts the log.
                            Err(Error::ActorStopped) => {
                                tracing::debug!("an image of a stopped activation was refused")
                            }
                            Err(err) => tracing::warn!(
                                error = %err,
                                "writing an image of the actor's SQL database failed"
                            ),
                        }
                    }
                }
                images.grown.lock().imaging = false;
            }
            .instrument(span),
        );
    }
}

fn put_part(image: i64, part: i64, bytes: &[u8]) -> Statement {
    Statement::new(
        "INSERT OR REPLACE INTO keel_db_image (image, part, bytes) VALUES (?, ?, ?)",
        vec![image.into(), part.into(), bytes.to_vec().into()],
    )
}

#[async_trait]
impl ActorDb for EngineActorDb {
    fn token(&self) -> u64 {
        self.inner.token()
    }

    fn enter(&self) {
        self.inner.enter();
    }

    async fn execute(&self, sql: String, params: Vec<u8>) -> Result<Vec<u8>> {
        self.inner.execute(sql, params).await
    }

    async fn migration(&self, step: MigrationStep) -> Result<()> {
        match step {
            MigrationStep::Begin => {
                // What committed before (the replay) is in the engine already.
                let watch = self.images.watch.clone();
                blocking(move || watch.changed()).await?;
                self.inner.migration(step).await
            }
            MigrationStep::Commit => {
                self.inner.migration(step).await?;
                let watch = self.images.watch.clone();
                if blocking(move || watch.changed()).await? {
                    self.images.write().await?;
                }
                Ok(())
            }
            MigrationStep::Rollback => self.inner.migration(step).await,
        }
    }

    async fn prepare(&self) -> Result<Option<DbChange>> {
        let change = self.inner.prepare().await?;
        if let Some(change) = &change {
            self.images.grown.lock().prepared = Some((change.seq, change.changeset.len()));
        }
        Ok(change)
    }

    async fn rollback(&self) {
        self.inner.rollback().await;
    }

    fn finish(&self, seq: u64, durable: bool) {
        self.inner.finish(seq, durable);
        if durable {
            self.images.committed(seq);
        } else {
            self.images.grown.lock().prepared = None;
        }
    }

    async fn settled(&self) {
        self.inner.settled().await;
    }

    async fn close(&self) {
        self.images.closed.store(true, Ordering::Release);
        // An image being taken reads the file: it ends before the file is removed.
        drop(self.images.writing.lock().await);
        self.inner.close().await;
        let path = self.path.clone();
        if let Err(err) = blocking(move || remove_copy(&path)).await {
            tracing::warn!(error = %err, "removing the local copy of an actor's SQL database failed");
        }
    }
}
