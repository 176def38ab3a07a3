//! The dispatch handle: how a request reaches an actor. It resolves targets through the
//! directory, gets the actor's live task from the activation, and delivers commands to its
//! mailbox. An ingress (the HTTP server today) is handed this handle, never the parts
//! behind it.
//!
//! What must stay true:
//! - A command is delivered at most once. If the actor is stopping, the command comes back
//!   undelivered; the dispatch waits until the task has left and delivers it to the next one.
//! - Once the drain has begun, nothing new is dispatched (`registry.shutting_down`).
//! - A read on behalf of a client first waits for the actor's own pending commits, so it sees
//!   its writes; reads go through the `Storage` seam, never to SQLite directly.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actor::conn::{ConnHandle, ReplySlot};
use crate::actor::hibernation::Hibernated;
use crate::actor::schedules::Alarms;
use crate::actor::{ActorEnv, ActorHandle, Command, OpenDbs, Reply};
use crate::actor_type::ActorTypes;
use crate::clock::Clock;
use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::host::{
    ActionCall, ActorInfo, Encoding, Host, Payload, RawRequest, RawResponse, RawSocketEvent,
    RequestHead,
};
use crate::metrics::{Gauges, Metrics};
use crate::runtime::activation::{Activation, Driven, Intents, OnDemand};
use crate::runtime::directory::Directory;
use crate::runtime::target::Target;
use crate::storage::seam::Storage;

/// The runtime's dispatch: what an ingress and the alarm timer reach actors through.
pub(crate) struct Dispatch {
    /// The configuration the runtime was built with.
    pub(crate) config: RuntimeConfig,
    /// The registered actor types.
    pub(crate) types: Arc<ActorTypes>,
    /// Runs user code; the inspector asks it for the state encoding.
    pub(crate) host: Arc<dyn Host>,
    /// Durable state, for reads on behalf of clients.
    pub(crate) storage: Arc<dyn Storage>,
    /// Cancelled when the graceful drain begins; actors and the accept loop watch it.
    pub(crate) stop: CancellationToken,
    /// Cancelled when the drain times out; everything still running gives up at once.
    pub(crate) force: CancellationToken,
    /// Every task the runtime spawns, so the drain can wait for all of them.
    pub(crate) tracker: TaskTracker,
    /// The clock schedules are measured on.
    pub(crate) clock: Clock,
    /// Pending schedules, for the alarm timer.
    pub(crate) schedules: Arc<Alarms>,
    /// Counters and histograms, shared with the registry.
    pub(crate) metrics: Arc<Metrics>,
    /// Open raw WebSockets by id, so the host can send on them.
    pub(crate) raw_sockets: Mutex<HashMap<Arc<str>, ConnHandle>>,
    /// The open connections of sleeping actors (shared with every actor task); closed when
    /// the drain begins.
    pub(crate) hibernated: Arc<Hibernated>,
    /// The SQL databases of live actors, shared with their tasks.
    pub(crate) databases: Arc<OpenDbs>,
    /// Which actor a key names.
    directory: Arc<Directory>,
    /// Which actors have a live task; starts them.
    activation: Arc<dyn Activation>,
    /// The same activation when a driver (an engine) starts and stops actors; `None` when
    /// actors start on demand.
    driven: Option<Arc<Driven>>,
}

impl Dispatch {
    /// Builds the dispatch over `storage`, starting actors on demand, or, with `intents`, only
    /// when a driver says so (see [`Driven`]). `stop` is the runtime's drain token.
    pub(crate) fn new(
        config: RuntimeConfig,
        types: Arc<ActorTypes>,
        host: Arc<dyn Host>,
        storage: Arc<dyn Storage>,
        stop: CancellationToken,
        metrics: Arc<Metrics>,
        intents: Option<Arc<dyn Intents>>,
    ) -> Dispatch {
        let force = CancellationToken::new();
        let tracker = TaskTracker::new();
        let clock = Clock::new();
        let schedules = Arc::new(Alarms::default());
        let hibernated = Arc::new(Hibernated::default());
        let env = Arc::new(ActorEnv::new(
            &config,
            storage.clone(),
            host.clone(),
            clock,
            stop.clone(),
            force.clone(),
            tracker.clone(),
            metrics.clone(),
            schedules.clone(),
            hibernated.clone(),
        ));
        let databases = env.databases.clone();
        let directory = Arc::new(Directory::new(
            storage.clone(),
            types.clone(),
            config.limits.clone(),
        ));
        let (activation, driven): (Arc<dyn Activation>, _) = match intents {
            None => (
                OnDemand::new(env, types.clone(), directory.clone(), tracker.clone()),
                None,
            ),
            Some(intents) => {
                let driven = Driven::new(
                    env,
                    types.clone(),
                    directory.clone(),
                    tracker.clone(),
                    intents,
                );
                (driven.clone(), Some(driven))
            }
        };
        Dispatch {
            config,
            types,
            host,
            storage,
            stop,
            force,
            tracker,
            clock,
            schedules,
            metrics,
            raw_sockets: Mutex::new(HashMap::new()),
            hibernated,
            databases,
            directory,
            activation,
            driven,
        }
    }

    /// The driven activation; `actor.stopped` when actors start on demand.
    pub(crate) fn driven(&self) -> Result<&Arc<Driven>> {
        self.driven.as_ref().ok_or(Error::ActorStopped)
    }

    /// Whether the drain has begun.
    pub(crate) fn is_draining(&self) -> bool {
        self.activation.is_closed() || self.stop.is_cancelled()
    }

    /// Starts no more actor tasks and closes the sockets of sleeping actors: the drain's
    /// first step.
    pub(crate) fn close(&self) {
        self.activation.close();
        self.hibernated.close();
    }

    /// Resolves a target to the actor's identity without calling it.
    pub(crate) async fn resolve(&self, target: Target) -> Result<Arc<ActorInfo>> {
        if self.is_draining() {
            return Err(Error::RegistryShuttingDown);
        }
        match target {
            Target::Key {
                name,
                key,
                mode,
                input,
            } => self.directory.resolve(&name, &key, mode, input).await,
            Target::Id(id) => self.resolve_id(&id).await,
        }
    }

    /// Finds an actor by id: a live one, else in storage.
    pub(crate) async fn resolve_id(&self, id: &str) -> Result<Arc<ActorInfo>> {
        if let Some(handle) = self.activation.live(id) {
            return Ok(handle.info.clone());
        }
        self.directory.resolve_stored_id(id).await
    }

    /// The live actor's handle, starting its task if it is not running.
    pub(crate) fn activate(&self, info: &Arc<ActorInfo>) -> Result<ActorHandle> {
        self.activation.activate(info)
    }

    /// The handle of a live actor, without waking one.
    pub(crate) fn live_handle(&self, id: &str) -> Option<ActorHandle> {
        self.activation.live(id)
    }

    /// Opens or closes a keep-awake hold on a live actor (see [`ActorHandle::keep_awake`]);
    /// an actor that is not awake is left asleep, and `actor.stopped` says so.
    pub(crate) fn keep_awake(&self, id: &str, held: bool) -> Result<()> {
        let handle = self.live_handle(id).ok_or(Error::ActorStopped)?;
        handle.keep_awake(held);
        Ok(())
    }

    /// The number of live actors.
    pub(crate) fn live_count(&self) -> usize {
        self.activation.live_count()
    }

    /// Whether the actor has a live task.
    pub(crate) fn is_awake(&self, id: &str) -> bool {
        self.activation.live(id).is_some()
    }

    /// Delivers a command to the actor, waking it if it sleeps. If the actor is stopping (to
    /// sleep, or destroyed), waits until it has left and delivers to its next task; the
    /// command was not taken, so it never runs twice.
    pub(crate) async fn deliver(&self, info: &Arc<ActorInfo>, command: Command) -> Result<()> {
        self.deliver_or_return(info, command)
            .await
            .map_err(|failed| failed.0)
    }

    /// [`Dispatch::deliver`], handing the command back with the error when it could not be
    /// delivered, so its reply can still be answered in order.
    pub(crate) async fn deliver_or_return(
        &self,
        info: &Arc<ActorInfo>,
        command: Command,
    ) -> Result<(), Box<(Error, Command)>> {
        let mut command = command;
        loop {
            let handle = match self.activate(info) {
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

    /// Calls an action and returns its output once the effects it produced are durable.
    /// `chain` holds the actors whose calls await this one (see [`ActionCall::chain`]): a
    /// target among them fails at once with `actor.call_cycle`, before it is sent.
    pub(crate) async fn call(
        &self,
        target: Target,
        action: &str,
        args: Payload,
        output: Encoding,
        request: Option<RequestHead>,
        chain: Vec<String>,
    ) -> Result<Payload> {
        if self.is_draining() {
            return Err(Error::RegistryShuttingDown);
        }
        if let Target::Key { name, .. } = &target {
            self.types.get(name)?.check_action(action)?;
        }
        let info = match &target {
            Target::Key {
                name,
                key,
                mode,
                input,
            } => {
                self.directory
                    .resolve(name, key, *mode, input.clone())
                    .await?
            }
            Target::Id(id) => {
                let info = self.resolve_id(id).await?;
                self.types.get(&info.name)?.check_action(action)?;
                info
            }
        };
        if chain.iter().any(|awaiting| *awaiting == *info.id) {
            return Err(Error::ActorCallCycle {
                actor_id: info.id.to_string(),
            });
        }
        let (reply, rx) = oneshot::channel();
        let command = Command::Action {
            call: ActionCall {
                action: action.to_string(),
                args,
                output,
                conn_id: None,
                request,
                chain,
            },
            reply: Reply::Caller(reply),
        };
        self.deliver(&info, command).await?;
        rx.await.map_err(|_| {
            if self.is_draining() {
                Error::RegistryShutDown
            } else {
                Error::ActorStopped
            }
        })?
    }

    /// Runs one action for a connection. The call enters the actor's mailbox before this
    /// returns, so one connection's calls run in the order it sent them; the actor answers
    /// `reply` when the call's commit is released.
    pub(crate) async fn call_on_conn(
        &self,
        info: &Arc<ActorInfo>,
        reply: ReplySlot,
        action: String,
        args: Payload,
    ) {
        if let Err(err) = self
            .types
            .get(&info.name)
            .and_then(|t| t.check_action(&action))
        {
            return reply.answer(Err(err));
        }
        let call = ActionCall {
            action,
            args,
            output: reply.encoding(),
            conn_id: Some(reply.conn_id().to_string()),
            request: None,
            chain: Vec::new(),
        };
        let command = Command::Action {
            call,
            reply: Reply::Conn(reply),
        };
        if let Err(failed) = self.deliver_for_conn(info, command).await {
            if let (err, Command::Action { reply, .. }) = *failed {
                reply.send(Err(err));
            }
        }
    }

    /// [`Dispatch::deliver_or_return`] for a connection's message (its admission, a call, a
    /// subscription). A hibernatable connection of a driven actor outlives the activation: a
    /// message that finds the activation gone to sleep (it arrived as the actor began to
    /// sleep) waits for the driver to start the next one and goes there, as it would wake
    /// the actor embedded. The driver is woken by
    /// the tunnel, which holds the message unacknowledged until then (`SocketPeer::taken`).
    /// The wait is bounded by the action timeout; past it the message fails `actor.stopped`.
    async fn deliver_for_conn(
        &self,
        info: &Arc<ActorInfo>,
        command: Command,
    ) -> Result<(), Box<(Error, Command)>> {
        let waits = self.driven.as_ref().filter(|_| {
            self.types
                .get(&info.name)
                .is_ok_and(|actor_type| actor_type.hibernatable_conns)
        });
        let Some(driven) = waits else {
            return self.deliver_or_return(info, command).await;
        };
        let deadline = tokio::time::Instant::now() + self.config.action_timeout;
        let mut command = command;
        loop {
            match self.deliver_or_return(info, command).await {
                Err(failed) if matches!(failed.0, Error::ActorStopped) && !self.is_draining() => {
                    let (err, returned) = *failed;
                    if !driven.wait_serving(&info.id, deadline).await {
                        return Err(Box::new((err, returned)));
                    }
                    tracing::debug!(actor_id = %info.id, "a connection's message goes to the actor's next activation");
                    command = returned;
                }
                other => return other,
            }
        }
    }

    /// Asks the actor (waking it if needed) to admit a connection; on success the actor has
    /// queued the connection's `ready` frame itself.
    pub(crate) async fn connect(
        &self,
        info: &Arc<ActorInfo>,
        conn: &ConnHandle,
        params: Payload,
        upgrade: RequestHead,
        resume: Option<String>,
    ) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        let command = Command::Connect {
            conn: conn.clone(),
            params,
            resume,
            request: Some(upgrade),
            reply,
        };
        self.deliver_for_conn(info, command)
            .await
            .map_err(|failed| failed.0)?;
        rx.await.map_err(|_| Error::ActorStopped)?
    }

    /// Hands a (un)subscription of a guarded event to the actor, behind the connection's
    /// earlier calls. If the actor cannot take it (overloaded, stopping), the subscription is
    /// refused with that error.
    pub(crate) async fn subscribe(
        &self,
        info: &Arc<ActorInfo>,
        conn: &ConnHandle,
        event: String,
        subscribe: bool,
    ) {
        let command = Command::Subscribe {
            conn: conn.clone(),
            event,
            subscribe,
        };
        if let Err(failed) = self.deliver_for_conn(info, command).await {
            if let (err, Command::Subscribe { event, .. }) = *failed {
                conn.refuse_subscription(&event, &err, self.config.dev);
            }
        }
    }

    /// Tells a live actor that a connection's socket ended. An actor that has left is not
    /// woken for it: a stopping actor forgets its connections itself.
    pub(crate) fn disconnect(&self, info: &ActorInfo, conn: &ConnHandle) {
        if let Some(handle) = self.live_handle(&info.id) {
            // The actor may be stopping; then it has forgotten the connection already.
            let _ = handle.send(Command::Disconnect { conn: conn.clone() });
        }
    }

    /// Tells the actor that a hibernatable connection's socket ended, waking it if it
    /// sleeps: the connection closed for good, so its `onDisconnect` runs and its durable
    /// record goes. Once the drain has begun nothing is delivered, and the record stays
    /// for the client to resume after the restart.
    pub(crate) async fn disconnect_waking(&self, info: &Arc<ActorInfo>, conn: &ConnHandle) {
        if self.is_draining() {
            return;
        }
        let command = Command::Disconnect { conn: conn.clone() };
        if let Err(err) = self.deliver(info, command).await {
            tracing::debug!(error = %err, "telling the actor of a closed connection failed");
        }
    }

    /// Hands a raw HTTP request to the actor's `onRequest` (waking it if needed).
    pub(crate) async fn request(
        &self,
        info: &Arc<ActorInfo>,
        request: RawRequest,
    ) -> Result<RawResponse> {
        let (reply, rx) = oneshot::channel();
        self.deliver(info, Command::Request { request, reply })
            .await?;
        rx.await.map_err(|_| Error::ActorStopped)?
    }

    /// Delivers a raw socket event through the actor's mailbox (waking it if needed), in
    /// order with its other work; `socket` is set on open.
    pub(crate) async fn raw_socket_event(
        &self,
        info: &Arc<ActorInfo>,
        socket: Option<ConnHandle>,
        event: RawSocketEvent,
    ) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        let command = Command::RawSocket {
            event,
            socket,
            reply,
        };
        self.deliver(info, command).await?;
        rx.await.map_err(|_| Error::ActorStopped)?
    }

    /// Delivers a raw socket's message or close to the actor's live task, never waking it:
    /// the socket is open only while its actor is awake, and a stopping actor closes its
    /// sockets and runs their close listeners itself, so an actor that went to sleep stays
    /// asleep.
    pub(crate) async fn raw_socket_event_live(
        &self,
        info: &Arc<ActorInfo>,
        event: RawSocketEvent,
    ) -> Result<()> {
        let handle = self.live_handle(&info.id).ok_or(Error::ActorStopped)?;
        let (reply, rx) = oneshot::channel();
        let command = Command::RawSocket {
            event,
            socket: None,
            reply,
        };
        handle.send(command)?;
        rx.await.map_err(|_| Error::ActorStopped)?
    }

    /// Waits until every commit of a live actor is durable, so a read sees its own writes.
    pub(crate) async fn settle_commits(&self, actor_id: &str) -> Result<()> {
        let pending = self
            .activation
            .live(actor_id)
            .is_some_and(|handle| handle.has_pending_commits());
        if pending {
            self.storage.flush().await?;
        }
        Ok(())
    }
}

impl Gauges for Dispatch {
    fn awake_actors(&self) -> usize {
        self.live_count()
    }

    fn hibernated_connections(&self) -> usize {
        self.hibernated.len()
    }

    fn pending_schedules(&self) -> usize {
        self.schedules.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_trait::async_trait;
    use axum::extract::ws::Message;

    use super::*;
    use crate::actor_type::ActorType;
    use crate::host::{ActionDone, ConnectRequest, Effects, Outbound, StartRequest, StopReason};
    use crate::runtime::target::Resolve;
    use crate::storage::embedded::EmbeddedStorage;

    /// Every action writes state; `shout` also broadcasts event `e`.
    struct Shouter;

    #[async_trait]
    impl Host for Shouter {
        async fn start(&self, _: &Arc<ActorInfo>, _: StartRequest) -> Result<Effects> {
            Ok(Effects {
                state: Some(b"0".to_vec()),
                ..Effects::default()
            })
        }

        async fn action(&self, _: &Arc<ActorInfo>, call: ActionCall) -> Result<ActionDone> {
            let mut effects = Effects {
                state: Some(b"1".to_vec()),
                ..Effects::default()
            };
            if call.action == "shout" {
                effects.messages.push(Outbound {
                    to: None,
                    event: "e".into(),
                    json: Some(b"1".to_vec()),
                    cbor: Some(vec![0x01]),
                });
            }
            Ok(ActionDone {
                output: Payload::json("null"),
                effects,
            })
        }

        async fn stop(&self, _: &Arc<ActorInfo>, _: StopReason) -> Result<Effects> {
            Ok(Effects::default())
        }

        async fn connect(&self, _: &Arc<ActorInfo>, _: ConnectRequest) -> Result<Effects> {
            Ok(Effects::default())
        }

        fn state_encoding(&self) -> Encoding {
            Encoding::Json
        }
    }

    fn target(key: &str) -> Target {
        Target::Key {
            name: "t".into(),
            key: vec![key.into()],
            mode: Resolve::GetOrCreate,
            input: None,
        }
    }

    fn text(frame: Option<Message>) -> String {
        match frame {
            Some(Message::Text(text)) => text.to_string(),
            other => panic!("a text frame, not {other:?}"),
        }
    }

    /// A dispatch over a fresh database in `dir`, and its embedded storage.
    fn open(dir: &std::path::Path) -> (Arc<Dispatch>, Arc<EmbeddedStorage>) {
        let config = RuntimeConfig {
            data_dir: dir.to_path_buf(),
            ..RuntimeConfig::default()
        };
        let (storage, _) = EmbeddedStorage::open(&config).unwrap();
        let storage = Arc::new(storage);
        let mut types = ActorTypes::default();
        types.add(ActorType::new("t", ["shout", "noop"])).unwrap();
        let dispatch = Arc::new(Dispatch::new(
            config,
            Arc::new(types),
            Arc::new(Shouter),
            storage.clone(),
            CancellationToken::new(),
            Arc::default(),
            None,
        ));
        (dispatch, storage)
    }

    async fn drain(dispatch: &Dispatch) {
        dispatch.close();
        dispatch.stop.cancel();
        dispatch.tracker.close();
        dispatch.tracker.wait().await;
        dispatch.storage.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_read_stuck_in_storage_does_not_stall_the_async_workers() {
        let dir = tempfile::tempdir().unwrap();
        let (dispatch, storage) = open(dir.path());
        // Every read of the store waits while the test holds its read pool; a new key is
        // looked up in storage before the actor is created.
        let held = storage.store().hold_readers();
        let resolve = tokio::spawn({
            let dispatch = dispatch.clone();
            async move { dispatch.resolve(target("new")).await }
        });
        // The runtime has one worker: if the read ran on it, nothing else would run now. The
        // test's own thread is not a worker, so it waits on a plain channel, with a bound on a
        // hang rather than a measure of speed.
        let (ran, probe) = std::sync::mpsc::channel();
        tokio::spawn(async move { ran.send(()) });
        let other = probe.recv_timeout(Duration::from_secs(10));
        drop(held);
        other.expect("a read stuck in storage stalled the async worker");
        let info = resolve.await.unwrap().unwrap();
        assert_eq!(info.key, ["new"]);
        drain(&dispatch).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_slow_to_take_an_event_does_not_hold_up_another_actors_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (dispatch, _) = open(dir.path());
        let loud = dispatch.resolve(target("loud")).await.unwrap();
        let conn = ConnHandle::new(Arc::from("c"), Encoding::Json);
        dispatch
            .connect(
                &loud,
                &conn,
                Payload::json("null"),
                RequestHead::default(),
                None,
            )
            .await
            .unwrap();
        conn.subscribe(["e".to_string()]);

        // While the connection cannot take a frame, `loud` broadcasts to it, and another
        // actor commits. Its reply must not wait behind the broadcast: with the fan-out on
        // storage's thread, the broadcast would stall every commit after it.
        let held = conn.hold_queue();
        let shout = tokio::spawn({
            let dispatch = dispatch.clone();
            async move {
                let args = Payload::json("[]");
                dispatch
                    .call(
                        target("loud"),
                        "shout",
                        args,
                        Encoding::Json,
                        None,
                        Vec::new(),
                    )
                    .await
            }
        });
        let quiet = dispatch.call(
            target("quiet"),
            "noop",
            Payload::json("[]"),
            Encoding::Json,
            None,
            Vec::new(),
        );
        // A bound on a hang, not a measure of speed: without the fix this never completes.
        let quiet = tokio::time::timeout(Duration::from_secs(10), quiet).await;
        drop(held);
        quiet
            .expect("another actor's commit waited for a connection's queue")
            .unwrap();

        // Once the connection takes frames again, the broadcast reaches it, after `ready`
        // and before the shouting call's reply is out.
        shout.await.unwrap().unwrap();
        assert!(text(conn.take_frame()).contains(r#""t":"ready""#));
        assert_eq!(
            text(conn.take_frame()),
            r#"{"t":"event","event":"e","data":1}"#
        );

        drain(&dispatch).await;
    }
}
