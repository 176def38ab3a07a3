//! A built runtime: the front door of one runtime, and its graceful drain.
//!
//! [`Runtime`] is what the registry builds when it starts serving (or on the first serverless
//! request); `assemble.rs` picks its parts (the embedded storage, on-demand activation and
//! keel's HTTP server). It owns one cancellation tree: `stop` (a child of the registry's root
//! token) begins the graceful drain, and `force` abandons what is left when the drain runs
//! out of time. Every task it spawns (actors, the accept loop, connections) is tracked, so the
//! drain can wait for all of them before it closes storage and releases the data directory.

use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::Instrument;

use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::host::{ActorInfo, Encoding, Payload, StopReason};
use crate::metrics::{Metrics, ShutdownPhase, WriterStats};
use crate::runtime::dispatch::Dispatch;
use crate::runtime::ingress::{Ingress, Request, Response, TunneledSocket};
use crate::runtime::target::Target;
use crate::storage::seam::{MigrationStep, StoredSchedule};

/// A built runtime. Dropping it without draining abandons in-flight work; call
/// [`Runtime::drain`] for a clean stop. Opened with [`Runtime::open`].
pub struct Runtime {
    dispatch: Arc<Dispatch>,
    /// The front door: keel's HTTP routes, shared by the listener and serverless requests.
    ingress: Arc<dyn Ingress>,
    /// The writer's counters, kept after the writer closes.
    writer_stats: Arc<WriterStats>,
}

impl Runtime {
    /// A runtime over `dispatch`, reached through `ingress`; starts the alarm timer.
    pub(crate) fn new(
        dispatch: Arc<Dispatch>,
        ingress: Arc<dyn Ingress>,
        writer_stats: Arc<WriterStats>,
    ) -> Runtime {
        dispatch
            .tracker
            .spawn(crate::runtime::alarms::run(dispatch.clone()).in_current_span());
        Runtime {
            dispatch,
            ingress,
            writer_stats,
        }
    }

    /// The configuration the runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.dispatch.config
    }

    /// Resolves a target to the actor's identity without calling it.
    pub async fn resolve(&self, target: Target) -> Result<Arc<ActorInfo>> {
        self.dispatch.resolve(target).await
    }

    /// Calls an action and returns its output once the effects it produced are durable.
    pub async fn call(
        &self,
        target: Target,
        action: &str,
        args: Payload,
        output: Encoding,
    ) -> Result<Payload> {
        self.dispatch
            .call(target, action, args, output, None, Vec::new())
            .await
    }

    /// Calls an action on behalf of other actors' calls: `chain` holds the ids of the actors
    /// whose calls await this one, nearest caller last. A target in the chain fails at once
    /// with `actor.call_cycle` (it would wait on its own mailbox); otherwise this is
    /// [`Runtime::call`], and the target's invocation carries the chain for its own calls.
    pub async fn call_from(
        &self,
        target: Target,
        action: &str,
        args: Payload,
        output: Encoding,
        chain: Vec<String>,
    ) -> Result<Payload> {
        self.dispatch
            .call(target, action, args, output, None, chain)
            .await
    }

    /// Runs one statement on an actor's SQL database for the instance holding `db_token`
    /// (the token its start carried): `params` is a CBOR array (`?` placeholders) or map
    /// (named ones) of SQL values, and the result a CBOR array `[columns, values, changes,
    /// lastInsertRowid]`, the values of every row one after another (see `actor_db.rs`).
    pub async fn db_execute(
        &self,
        actor_id: &str,
        db_token: u64,
        sql: String,
        params: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let db = self.dispatch.databases.get(actor_id, db_token)?;
        db.execute(sql, params).await
    }

    /// Begins, commits or rolls back the migration transaction of an actor's SQL database
    /// (around `onMigrate`, during the instance's start).
    pub async fn db_migration(
        &self,
        actor_id: &str,
        db_token: u64,
        step: MigrationStep,
    ) -> Result<()> {
        let db = self.dispatch.databases.get(actor_id, db_token)?;
        db.migration(step).await
    }

    /// Reads an actor's KV values (after its own pending commits land).
    pub async fn kv_get(&self, actor_id: &str, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>> {
        self.dispatch.settle_commits(actor_id).await?;
        self.dispatch.storage.kv_get(actor_id, keys).await
    }

    /// Lists an actor's KV entries by prefix (after its own pending commits land).
    pub async fn kv_list(
        &self,
        actor_id: &str,
        prefix: Vec<u8>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.dispatch.settle_commits(actor_id).await?;
        self.dispatch
            .storage
            .kv_list(actor_id, prefix, limit, reverse)
            .await
    }

    /// An actor's pending schedules (after its own pending commits land).
    pub async fn schedules(&self, actor_id: &str) -> Result<Vec<StoredSchedule>> {
        self.dispatch.settle_commits(actor_id).await?;
        self.dispatch.storage.schedules_of(actor_id).await
    }

    /// Opens (`held`) or closes a keep-awake hold on a live actor: while one is open the
    /// actor does not sleep for being idle (`c.keepAwake` in JS). `actor.stopped` if the
    /// actor is not awake.
    pub fn keep_awake(&self, actor_id: &str, held: bool) -> Result<()> {
        self.dispatch.keep_awake(actor_id, held)
    }

    /// The clock schedules are measured on, in epoch milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.dispatch.clock.now_ms()
    }

    /// How many connections of sleeping actors are kept open (hibernatable connections).
    pub fn hibernated_connections(&self) -> usize {
        self.dispatch.hibernated.len()
    }

    /// How many schedules are pending.
    pub fn pending_schedules(&self) -> usize {
        self.dispatch.schedules.len()
    }

    /// Serves HTTP on `listener` until the drain begins. The accept loop and every connection
    /// are tracked tasks, so [`Runtime::drain`] waits for them.
    pub fn serve(&self, listener: TcpListener) {
        self.ingress.serve(listener);
    }

    /// Handles one request without a listener (serverless mode).
    pub async fn handle(&self, request: Request) -> Response {
        self.ingress.handle(request).await
    }

    /// A driven runtime's start of the actor `id` of type `name` under canonical key `key`,
    /// at the driver's `generation`: its task starts and loads it from storage (which the
    /// driver opened for this generation). `actor.stopped` on a runtime that is not driven,
    /// `registry.shutting_down` once the drain has begun.
    pub fn start_actor(&self, id: &str, name: &str, key: &str, generation: u64) -> Result<()> {
        let driven = self.dispatch.driven()?;
        let actor_type = self.dispatch.types.get(name)?;
        let info = Arc::new(ActorInfo {
            id: Arc::from(id),
            name: Arc::from(actor_type.name.as_str()),
            key: crate::key::decode(key)?,
            key_string: key.to_string(),
        });
        driven.start(info, generation).map(drop)
    }

    /// Indexes an actor's stored schedules, `(id, at_ms)`, for the alarm timer: a driven
    /// runtime does so when it starts the actor, so the ones that fell due while it slept fire
    /// at once and the others while it is awake.
    pub fn index_schedules(&self, actor_id: &str, schedules: Vec<(String, i64)>) {
        let actor_id: Arc<str> = Arc::from(actor_id);
        for (id, at_ms) in schedules {
            self.dispatch.schedules.add(id, actor_id.clone(), at_ms);
        }
    }

    /// A driven runtime's stop of the actor's activation at `generation`, through keel's own
    /// stop path for `reason` (hooks, last commit, flush); resolves once it is done. Nothing
    /// of that activation is committed afterwards.
    pub async fn stop_actor(&self, id: &str, generation: u64, reason: StopReason) -> Result<()> {
        self.dispatch.driven()?.stop(id, generation, reason).await;
        Ok(())
    }

    /// Whether a driven runtime runs the actor `id`'s activation and takes its requests: the
    /// driver started it and it has not begun to sleep or destroy itself. A request this
    /// runtime refused for an actor it no longer serves belongs to the actor's next
    /// activation, which only the driver can start (it may retry the request there).
    /// `false` on a runtime that is not driven.
    pub fn serves_actor(&self, id: &str) -> bool {
        self.dispatch.driven().is_ok_and(|driven| driven.serves(id))
    }

    /// Whether the connections of the running actor `actor_id` may outlive its sleep (its
    /// type has hibernatable connections): a tunnel then keeps their sockets open while the
    /// actor sleeps and hands them back on its next start. `false` for an actor with no task.
    pub fn hibernates_connections(&self, actor_id: &str) -> bool {
        self.dispatch.live_handle(actor_id).is_some_and(|handle| {
            self.dispatch
                .types
                .get(&handle.info.name)
                .is_ok_and(|actor_type| actor_type.hibernatable_conns)
        })
    }

    /// Handles one request tunneled to the actor `actor_id`, which the driver has already
    /// resolved: keel's own routes, and `POST /action/{name}` with `{"args": [...]}` answered
    /// `{"output": ...}` (the shape RivetKit's gateway clients use).
    pub async fn handle_tunneled(&self, actor_id: &str, request: Request) -> Response {
        self.ingress.handle_tunneled(actor_id, request).await
    }

    /// Serves one WebSocket tunneled to the actor `actor_id`, which the driver has already
    /// resolved, with the socket code keel's own listener uses: `/connect` speaks keel's
    /// connection protocol (its `init` names no actor: the tunnel did), `/websocket[/...]` is
    /// the actor's `onWebSocket` (seeing the path after `/websocket`). Any other path, a
    /// draining runtime or a refused origin closes the socket with 1008 and the error's
    /// `group.code` as the reason. Returns at once; the socket is served on a tracked task.
    pub fn serve_tunneled_socket(&self, actor_id: &str, socket: TunneledSocket) {
        self.ingress.serve_tunneled_socket(actor_id, socket);
    }

    /// The runtime's counters and histograms.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.dispatch.metrics
    }

    /// Group-commit counters.
    pub fn writer_stats(&self) -> &Arc<WriterStats> {
        &self.writer_stats
    }

    /// The number of live actors.
    pub fn live_actors(&self) -> usize {
        self.dispatch.live_count()
    }

    /// Sends a message on a raw WebSocket (from `onWebSocket` code).
    pub fn raw_send(&self, socket_id: &str, data: Vec<u8>, binary: bool) -> Result<()> {
        let socket = self.dispatch.raw_sockets.lock().get(socket_id).cloned();
        socket.ok_or(Error::ActorStopped)?.send_raw(data, binary)
    }

    /// Closes a raw WebSocket.
    pub fn raw_close(&self, socket_id: &str, code: u16, reason: &str) {
        if let Some(socket) = self.dispatch.raw_sockets.lock().get(socket_id).cloned() {
            socket.close(code, reason);
        }
    }

    /// The graceful drain: stop accepting, let queued and in-flight actions finish, stop and
    /// flush every actor, close the connections and storage, release the data directory.
    /// Bounded by the configured drain timeout; past it, what is left fails with
    /// `registry.shut_down`, and only work that was never acknowledged is lost.
    pub async fn drain(&self) {
        let dispatch = &self.dispatch;
        dispatch.close();
        dispatch.metrics.enter_phase(ShutdownPhase::Draining);
        dispatch.stop.cancel();
        dispatch.tracker.close();
        let timeout = dispatch.config.drain_timeout;
        let live = dispatch.live_count();
        tracing::debug!(live_actors = live, "drain begun");
        if tokio::time::timeout(timeout, dispatch.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                drain_timeout_ms = timeout.as_millis() as u64,
                remaining_tasks = dispatch.tracker.len(),
                "drain timed out; abandoning the work that is left"
            );
            dispatch.metrics.enter_phase(ShutdownPhase::Forced);
            dispatch.force.cancel();
            dispatch.tracker.wait().await;
        }
        dispatch.metrics.enter_phase(ShutdownPhase::Closing);
        dispatch.storage.close().await;
        dispatch.metrics.enter_phase(ShutdownPhase::Stopped);
    }
}
