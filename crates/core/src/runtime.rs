//! A built runtime: storage, the writer, the actor directory, and the drain.
//!
//! [`Runtime`] is what the registry builds when it starts serving (or on the first serverless
//! request). It owns one cancellation tree: `stop` (a child of the registry's root token)
//! begins the graceful drain, and `force` abandons what is left when the drain runs out of
//! time. Every task it spawns (actors, the accept loop, connections) is tracked, so the drain
//! can wait for all of them before it closes the writer and releases the data directory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::actor::{ActorHandle, ActorTask, Command, Reply};
use crate::actor_type::ActorTypes;
use crate::alarms::Alarms;
use crate::clock::Clock;
use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::faults::{FaultState, Registration};
use crate::host::{ActionCall, ActorInfo, Encoding, Host, Payload, RequestHead};
use crate::inspector::Connections;
use crate::key;
use crate::metrics::{Metrics, ShutdownPhase};
use crate::store::{ActorRecord, Store, StoredSchedule};
use crate::writer::{CreateMode, Writer, WriterHandle, WriterStats};

/// How a request by key finds its actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resolve {
    /// The actor must exist (`actor.not_found` otherwise).
    Get,
    /// The actor must not exist (`actor.already_exists` otherwise).
    Create,
    /// Use the existing actor or create it.
    #[default]
    GetOrCreate,
}

/// Which actor a request is for.
#[derive(Debug, Clone)]
pub enum Target {
    /// By type name and key.
    Key {
        /// The actor type's name.
        name: String,
        /// The actor's key segments.
        key: Vec<String>,
        /// Whether the actor may, must or must not exist already.
        mode: Resolve,
        /// Creation input, used only if this request creates the actor.
        input: Option<Payload>,
    },
    /// By the actor's id.
    Id(String),
}

/// Resolved actors of one type, by canonical key.
type KnownByKey = HashMap<String, Known>;

/// A resolved key in the directory.
#[derive(Clone)]
struct Known {
    info: Arc<ActorInfo>,
    /// Set once the actor is being destroyed: becomes `true` when its task has left, after
    /// its row was deleted. A request by key that meets it waits for that, then resolves
    /// afresh, so the key is free as soon as the destroying call's reply is out.
    dying: Option<watch::Receiver<bool>>,
}

/// The shared insides of a runtime, reached by every actor task and request handler.
pub(crate) struct Core {
    pub(crate) config: RuntimeConfig,
    pub(crate) types: Arc<ActorTypes>,
    pub(crate) host: Arc<dyn Host>,
    pub(crate) store: Arc<Store>,
    pub(crate) writer: WriterHandle,
    /// Cancelled when the graceful drain begins; actors and the accept loop watch it.
    pub(crate) stop: CancellationToken,
    /// Cancelled when the drain times out; everything still running gives up at once.
    pub(crate) force: CancellationToken,
    /// Every task the runtime spawns, so the drain can wait for all of them.
    pub(crate) tracker: TaskTracker,
    /// The clock schedules are measured on.
    pub(crate) clock: Clock,
    /// Pending schedules, for the alarm timer.
    pub(crate) alarms: Alarms,
    /// Counters and histograms, shared with the registry.
    pub(crate) metrics: Arc<Metrics>,
    /// Open actor connections, for the inspector and the connections gauge.
    pub(crate) connections: Arc<Connections>,
    /// Set when the drain begins: new requests get `registry.shutting_down`.
    draining: AtomicBool,
    /// Open raw WebSockets by id, so the host can send on them.
    pub(crate) raw_sockets: Mutex<HashMap<Arc<str>, crate::conn::ConnHandle>>,
    /// Live actors by id.
    live: Mutex<HashMap<Arc<str>, (u64, ActorHandle)>>,
    /// Resolved keys of live (or just-resolved) actors, by type name then canonical key.
    known: Mutex<HashMap<Arc<str>, KnownByKey>>,
    /// Tags each spawned actor task so a stopping task only forgets itself.
    next_generation: AtomicU64,
}

impl Core {
    /// Whether the drain has begun.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.stop.is_cancelled()
    }

    /// Finds the actor for a request by key, creating it when the mode allows. A key whose
    /// actor is being destroyed is resolved again once that actor has left.
    async fn resolve(
        &self,
        name: &str,
        key: &[String],
        mode: Resolve,
        input: Option<Payload>,
    ) -> Result<Arc<ActorInfo>> {
        let actor_type = self.types.get(name)?;
        key::validate(key, &self.config.limits)?;
        let key_string = key::encode(key);
        loop {
            let known = self
                .known
                .lock()
                .get(name)
                .and_then(|by_key| by_key.get(&key_string))
                .cloned();
            if let Some(known) = known {
                if let Some(dying) = known.dying {
                    self.wait_gone(&known.info, dying).await;
                    continue;
                }
                return match mode {
                    Resolve::Create => Err(Error::ActorAlreadyExists),
                    _ => Ok(known.info),
                };
            }
            let record = match (self.store.find_by_key(name, &key_string)?, mode) {
                (Some(_), Resolve::Create) => return Err(Error::ActorAlreadyExists),
                (Some(record), _) => record,
                (None, Resolve::Get) => return Err(Error::ActorNotFound),
                (None, mode) => {
                    let record = ActorRecord {
                        id: new_actor_id(),
                        name: actor_type.name.clone(),
                        key: key_string.clone(),
                    };
                    let create_mode = match mode {
                        Resolve::Create => CreateMode::Create,
                        _ => CreateMode::GetOrCreate,
                    };
                    let (record, created) = self
                        .writer
                        .create_actor(record, input.clone(), create_mode)
                        .await?;
                    if created {
                        tracing::debug!(actor_id = %record.id, name, key = %key_string, "actor created");
                    }
                    record
                }
            };
            let info = Arc::new(ActorInfo {
                id: Arc::from(record.id),
                name: Arc::from(actor_type.name.as_str()),
                key: key.to_vec(),
                key_string: key_string.clone(),
            });
            // The row read above may belong to an actor whose destroy began meanwhile.
            let dying = {
                let mut known = self.known.lock();
                let by_key = known.entry(info.name.clone()).or_default();
                match by_key.get(&key_string) {
                    Some(Known {
                        info: dying_info,
                        dying: Some(dying),
                    }) if dying_info.id == info.id => Some(dying.clone()),
                    _ => {
                        let entry = Known {
                            info: info.clone(),
                            dying: None,
                        };
                        by_key.insert(key_string.clone(), entry);
                        None
                    }
                }
            };
            match dying {
                Some(dying) => self.wait_gone(&info, dying).await,
                None => return Ok(info),
            }
        }
    }

    /// Waits until a dying actor's task has left, and forgets its key (it has normally done
    /// so itself; not if its task died in a panic).
    async fn wait_gone(&self, info: &ActorInfo, mut dying: watch::Receiver<bool>) {
        // An error means the task is gone, which is what we wait for.
        let _ = dying.wait_for(|gone| *gone).await;
        self.forget_key(info);
    }

    /// Marks a key whose actor is being destroyed, before the destroying call's reply is
    /// released: requests by key wait until `stopped` says the task has left.
    pub(crate) fn mark_dying(&self, info: &Arc<ActorInfo>, stopped: watch::Receiver<bool>) {
        let entry = Known {
            info: info.clone(),
            dying: Some(stopped),
        };
        self.known
            .lock()
            .entry(info.name.clone())
            .or_default()
            .insert(info.key_string.clone(), entry);
    }

    /// Forgets a resolved key (after its actor stopped or was deleted).
    pub(crate) fn forget_key(&self, info: &ActorInfo) {
        let mut known = self.known.lock();
        if let Some(by_key) = known.get_mut(&*info.name) {
            if by_key
                .get(&info.key_string)
                .is_some_and(|k| k.info.id == info.id)
            {
                by_key.remove(&info.key_string);
            }
        }
    }

    /// Finds an actor by id.
    pub(crate) fn resolve_id(&self, id: &str) -> Result<Arc<ActorInfo>> {
        if let Some((_, handle)) = self.live.lock().get(id) {
            return Ok(handle.info.clone());
        }
        let record = self.store.find_by_id(id)?.ok_or(Error::ActorNotFound)?;
        let actor_type = self.types.get(&record.name)?;
        Ok(Arc::new(ActorInfo {
            id: Arc::from(record.id),
            name: Arc::from(actor_type.name.as_str()),
            key: key::decode(&record.key)?,
            key_string: record.key,
        }))
    }

    /// The live actor's handle, spawning its task if it is not running.
    pub(crate) fn handle_for(self: &Arc<Self>, info: &Arc<ActorInfo>) -> Result<ActorHandle> {
        let mut live = self.live.lock();
        if self.is_draining() {
            return Err(Error::RegistryShuttingDown);
        }
        // A stopping task keeps its entry until it has flushed and left: its closed handle
        // makes callers wait for that, so a new task never loads state the old one has yet
        // to write.
        // A task that died without leaving (it panicked) is replaced, or callers would wait
        // on it forever.
        if let Some((_, handle)) = live.get(&info.id) {
            if !handle.has_exited() {
                return Ok(handle.clone());
            }
            tracing::warn!(actor_id = %info.id, "replacing an actor task that ended without stopping");
        }
        let actor_type = self.types.get(&info.name)?.clone();
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let (task, handle) = ActorTask::new(info.clone(), actor_type, self.clone(), generation);
        live.insert(info.id.clone(), (generation, handle.clone()));
        let span = ActorTask::span(info);
        self.tracker.spawn(task.run().instrument(span));
        Ok(handle)
    }

    /// The handle of a live actor, without waking one.
    pub(crate) fn live_handle(&self, id: &str) -> Option<ActorHandle> {
        self.live.lock().get(id).map(|(_, handle)| handle.clone())
    }

    /// Delivers a command to the actor, waking it if it sleeps. If the actor is stopping (to
    /// sleep, or destroyed), waits until it has left and delivers to its next task; the
    /// command was not taken, so it never runs twice.
    pub(crate) async fn deliver(
        self: &Arc<Self>,
        info: &Arc<ActorInfo>,
        command: Command,
    ) -> Result<()> {
        self.deliver_or_return(info, command)
            .await
            .map_err(|failed| failed.0)
    }

    /// [`Core::deliver`], handing the command back with the error when it could not be
    /// delivered, so its reply can still be answered in order.
    pub(crate) async fn deliver_or_return(
        self: &Arc<Self>,
        info: &Arc<ActorInfo>,
        command: Command,
    ) -> Result<(), Box<(Error, Command)>> {
        let mut command = command;
        loop {
            let handle = match self.handle_for(info) {
                Ok(handle) => handle,
                Err(err) => return Err(Box::new((err, command))),
            };
            let failed = match handle.try_deliver(command) {
                Ok(()) => return Ok(()),
                Err(failed) => *failed,
            };
            match failed {
                (Error::ActorStopped, returned) if !self.is_draining() => {
                    handle.wait_stopped().await;
                    command = returned;
                }
                (Error::ActorStopped, returned) => {
                    return Err(Box::new((Error::RegistryShuttingDown, returned)))
                }
                failed => return Err(Box::new(failed)),
            }
        }
    }

    /// Removes a stopping actor task from the live set, unless a newer task replaced it.
    /// Its resolved key goes too, so the directory's memory follows the live actors, not
    /// every actor ever touched; the next request by key looks it up again.
    pub(crate) fn forget(&self, id: &str, generation: u64) {
        let mut live = self.live.lock();
        if live.get(id).is_some_and(|(g, _)| *g == generation) {
            if let Some((_, handle)) = live.remove(id) {
                self.forget_key(&handle.info);
            }
        }
    }

    /// The number of live actors.
    pub(crate) fn live_count(&self) -> usize {
        self.live.lock().len()
    }

    /// Whether the actor has a live task.
    pub(crate) fn is_awake(&self, id: &str) -> bool {
        self.live.lock().contains_key(id)
    }

    /// Waits until every commit of a live actor is durable, so a read sees its own writes.
    async fn settle_commits(&self, actor_id: &str) -> Result<()> {
        let pending = self
            .live
            .lock()
            .get(actor_id)
            .is_some_and(|(_, handle)| handle.has_pending_commits());
        if pending {
            self.writer.flush().await?;
        }
        Ok(())
    }

    /// Runs a read on the blocking pool once the actor's own commits are durable.
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        actor_id: &str,
        read: impl FnOnce(&Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.settle_commits(actor_id).await?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(&store))
            .await
            .map_err(|err| Error::ActorInternal {
                message: format!("a storage read panicked: {err}"),
            })?
    }
}

/// Resolves a target to the actor's identity.
pub(crate) async fn resolve_on(core: &Arc<Core>, target: Target) -> Result<Arc<ActorInfo>> {
    if core.is_draining() {
        return Err(Error::RegistryShuttingDown);
    }
    match target {
        Target::Key {
            name,
            key,
            mode,
            input,
        } => core.resolve(&name, &key, mode, input).await,
        Target::Id(id) => core.resolve_id(&id),
    }
}

/// Calls an action and returns its output once the effects it produced are durable.
pub(crate) async fn call_on(
    core: &Arc<Core>,
    target: Target,
    action: &str,
    args: Payload,
    output: Encoding,
    request: Option<RequestHead>,
) -> Result<Payload> {
    if core.is_draining() {
        return Err(Error::RegistryShuttingDown);
    }
    if let Target::Key { name, .. } = &target {
        core.types.get(name)?.check_action(action)?;
    }
    let (reply, rx) = tokio::sync::oneshot::channel();
    let command = Command::Action {
        call: ActionCall {
            action: action.to_string(),
            args,
            output,
            conn_id: None,
            request,
        },
        reply: Reply::Caller(reply),
    };
    let info = match &target {
        Target::Key {
            name,
            key,
            mode,
            input,
        } => core.resolve(name, key, *mode, input.clone()).await?,
        Target::Id(id) => {
            let info = core.resolve_id(id)?;
            core.types.get(&info.name)?.check_action(action)?;
            info
        }
    };
    core.deliver(&info, command).await?;
    rx.await.map_err(|_| {
        if core.is_draining() {
            Error::RegistryShutDown
        } else {
            Error::ActorStopped
        }
    })?
}

/// A generated actor id: 128 random bits in hex.
fn new_actor_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A built runtime. Dropping it without draining abandons in-flight work; call
/// [`Runtime::drain`] for a clean stop.
pub struct Runtime {
    core: Arc<Core>,
    /// Taken by the drain, which closes the writer once every actor has flushed.
    writer: Mutex<Option<Writer>>,
    /// The writer's counters, kept after the writer closes.
    writer_stats: Arc<WriterStats>,
    /// The HTTP routes over this runtime, shared by the listener and serverless requests.
    router: axum::Router,
    /// Keeps the configured faults registered for this runtime's database.
    _faults: Option<Registration>,
}

impl Runtime {
    /// Opens storage and starts the writer. `root` is the registry's root token; the runtime's
    /// drain token is its child, so tripping the root begins the drain's first phase at once.
    pub fn open(
        config: RuntimeConfig,
        types: Arc<ActorTypes>,
        host: Arc<dyn Host>,
        root: &CancellationToken,
    ) -> Result<Runtime> {
        Runtime::open_with(config, types, host, root, Arc::default())
    }

    /// [`Runtime::open`], counting into `metrics` (a registry's, which outlive its runtime).
    pub fn open_with(
        config: RuntimeConfig,
        types: Arc<ActorTypes>,
        host: Arc<dyn Host>,
        root: &CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Result<Runtime> {
        config.validate()?;
        // Faults are registered before the store opens, so that its first connection
        // already goes through their VFS.
        let faults = match &config.faults {
            Some(injector) => {
                std::fs::create_dir_all(&config.data_dir)
                    .map_err(|e| Error::io(format!("creating {}", config.data_dir.display()), e))?;
                let db_file = config.data_dir.join(crate::store::DB_FILE);
                Some(FaultState::register(injector, &db_file)?)
            }
            None => None,
        };
        let (faults, fault_registration) = faults.unzip();
        let store = Store::open(&config.data_dir, config.durability)?;
        let writer = Writer::start(&store, faults)?;
        let writer_stats = writer.stats().clone();
        let core = Arc::new(Core {
            writer: writer.handle(),
            store,
            types,
            host,
            stop: root.child_token(),
            force: CancellationToken::new(),
            tracker: TaskTracker::new(),
            clock: Clock::new(),
            alarms: Alarms::default(),
            connections: Arc::new(Connections::new(metrics.clone())),
            metrics,
            draining: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            raw_sockets: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(0),
            config,
        });
        core.metrics.attach(&core, writer_stats.clone());
        for (id, actor_id, at_ms) in core.store.all_schedules()? {
            core.alarms.add(id, Arc::from(actor_id), at_ms);
        }
        core.tracker
            .spawn(crate::alarms::run(core.clone()).in_current_span());
        Ok(Runtime {
            router: crate::http::router(core.clone()),
            core,
            writer: Mutex::new(Some(writer)),
            writer_stats,
            _faults: fault_registration,
        })
    }

    /// The configuration the runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.core.config
    }

    /// Resolves a target to the actor's identity without calling it.
    pub async fn resolve(&self, target: Target) -> Result<Arc<ActorInfo>> {
        resolve_on(&self.core, target).await
    }

    /// Calls an action and returns its output once the effects it produced are durable.
    pub async fn call(
        &self,
        target: Target,
        action: &str,
        args: Payload,
        output: Encoding,
    ) -> Result<Payload> {
        call_on(&self.core, target, action, args, output, None).await
    }

    /// Reads an actor's KV values (after its own pending commits land).
    pub async fn kv_get(&self, actor_id: &str, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>> {
        let id = actor_id.to_string();
        self.core
            .read(actor_id, move |store| store.kv_get(&id, &keys))
            .await
    }

    /// Lists an actor's KV entries by prefix (after its own pending commits land).
    pub async fn kv_list(
        &self,
        actor_id: &str,
        prefix: Vec<u8>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let id = actor_id.to_string();
        self.core
            .read(actor_id, move |store| {
                store.kv_list(&id, &prefix, limit, reverse)
            })
            .await
    }

    /// An actor's pending schedules (after its own pending commits land).
    pub async fn schedules(&self, actor_id: &str) -> Result<Vec<StoredSchedule>> {
        let id = actor_id.to_string();
        self.core
            .read(actor_id, move |store| store.schedules_of(&id))
            .await
    }

    /// The clock schedules are measured on, in epoch milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.core.clock.now_ms()
    }

    /// How many schedules are pending.
    pub fn pending_schedules(&self) -> usize {
        self.core.alarms.len()
    }

    /// Serves HTTP on `listener` until the drain begins. The accept loop and every connection
    /// are tracked tasks, so [`Runtime::drain`] waits for them.
    pub fn serve(&self, listener: TcpListener) {
        let core = self.core.clone();
        let router = self.router.clone();
        self.core
            .tracker
            .spawn(crate::http::accept_loop(core, listener, router).in_current_span());
    }

    /// Handles one request without a listener (serverless mode).
    pub async fn handle(&self, request: crate::http::Request) -> crate::http::Response {
        crate::http::handle(self.router.clone(), request).await
    }

    /// The runtime's counters and histograms.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.core.metrics
    }

    /// Group-commit counters.
    pub fn writer_stats(&self) -> &Arc<WriterStats> {
        &self.writer_stats
    }

    /// The number of live actors.
    pub fn live_actors(&self) -> usize {
        self.core.live_count()
    }

    /// Sends a message on a raw WebSocket (from `onWebSocket` code).
    pub fn raw_send(&self, socket_id: &str, data: Vec<u8>, binary: bool) -> Result<()> {
        let socket = self.core.raw_sockets.lock().get(socket_id).cloned();
        socket.ok_or(Error::ActorStopped)?.send_raw(data, binary)
    }

    /// Closes a raw WebSocket.
    pub fn raw_close(&self, socket_id: &str, code: u16, reason: &str) {
        if let Some(socket) = self.core.raw_sockets.lock().get(socket_id).cloned() {
            socket.close(code, reason);
        }
    }

    /// The graceful drain: stop accepting, let queued and in-flight actions finish, stop and
    /// flush every actor, close the connections and the writer, release the data directory.
    /// Bounded by the configured drain timeout; past it, what is left fails with
    /// `registry.shut_down`, and only work that was never acknowledged is lost.
    pub async fn drain(&self) {
        let core = &self.core;
        core.draining.store(true, Ordering::Release);
        core.metrics.enter_phase(ShutdownPhase::Draining);
        core.stop.cancel();
        core.tracker.close();
        let timeout = core.config.drain_timeout;
        let live = core.live_count();
        tracing::debug!(live_actors = live, "drain begun");
        if tokio::time::timeout(timeout, core.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                drain_timeout_ms = timeout.as_millis() as u64,
                remaining_tasks = core.tracker.len(),
                "drain timed out; abandoning the work that is left"
            );
            core.metrics.enter_phase(ShutdownPhase::Forced);
            core.force.cancel();
            core.tracker.wait().await;
        }
        core.metrics.enter_phase(ShutdownPhase::Closing);
        let writer = self.writer.lock().take();
        if let Some(writer) = writer {
            writer.close().await;
        }
        core.store.close();
        core.metrics.enter_phase(ShutdownPhase::Stopped);
    }
}
