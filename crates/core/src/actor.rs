//! One live actor: a task that owns the actor's instance, and the handles that reach it.
//!
//! Every message to an actor goes through its bounded mailbox and is handled in arrival
//! order, one at a time, by [`ActorTask::run`]. The task never waits for durability itself:
//! it hands each call's effects to the writer, whose commit releases the reply (the output
//! gate), and moves on to the next message, so one actor's pipelined calls share commits too.
//!
//! Life cycle: start (load, create or wake) → serve messages → stop, for one of three reasons:
//! idle for the sleep timeout (or `c.sleep()`), the registry's drain, or `c.destroy()`. To
//! stop, the task closes its mailbox, handles what was already queued, runs the stop hook,
//! flushes, and only then leaves the live set and signals `stopped`. A caller whose message
//! found the mailbox closed waits for that signal and tries again with a fresh task, so two
//! instances of one actor never overlap and a woken actor always loads flushed state.
//!
//! A failed commit changes nothing, not even in memory. The calls after it ran on the same
//! instance, on top of the refused change, so the writer marks the instance ([`Poison`]) and
//! refuses its later commits; before its next message (and before it stops) the task waits
//! for its pending commits and replaces the instance with one started from committed state,
//! as after an action timeout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use std::collections::HashMap;

use crate::actor_type::ActorType;
use crate::alarms::{retry_delay, SCHEDULE_MAX_ATTEMPTS};
use crate::conn::{self, close, ConnHandle};
use crate::error::{Error, Result};
use crate::host::{
    ActionCall, ActorInfo, ConnectRequest, Effects, Encoding, Payload, RawRequest, RawResponse,
    RawSocketEvent, RequestHead, StartRequest, StopReason,
};
use crate::runtime::Core;
use crate::store::StoredSchedule;
use crate::writer::{Poison, Release, Settle, Writes};

/// The span every line about `actor` is logged in: an `error`-level `actor` span with its
/// `actor_id`, `name` and `key`, as the actor's own task uses. A host logging for user code
/// outside the task (a late callback, say) enters one of these.
pub fn span(info: &ActorInfo) -> tracing::Span {
    ActorTask::span(info)
}

/// A message to an actor.
pub(crate) enum Command {
    /// Runs an action; the reply carries its output once the effects it produced are durable.
    Action { call: ActionCall, reply: Reply },
    /// Runs a schedule that fell due.
    Alarm { stored: StoredSchedule },
    /// Admits a connection; on success the actor queues its `ready` frame itself.
    Connect {
        conn: ConnHandle,
        params: Payload,
        /// The WebSocket upgrade request.
        request: Option<RequestHead>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// A connection's socket ended.
    Disconnect { conn_id: Arc<str> },
    /// A connection subscribes to (or unsubscribes from) an event the type guards with
    /// `canSubscribe`. Through the mailbox, so it keeps its place among the connection's calls.
    Subscribe {
        conn: ConnHandle,
        event: String,
        /// `false` for an unsubscribe, which needs no check but must not overtake a pending one.
        subscribe: bool,
    },
    /// A raw HTTP request for `onRequest`.
    Request {
        request: RawRequest,
        reply: oneshot::Sender<Result<RawResponse>>,
    },
    /// A raw WebSocket event for `onWebSocket`; `socket` is set on open.
    RawSocket {
        event: RawSocketEvent,
        socket: Option<ConnHandle>,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Where an action's outcome goes.
pub(crate) enum Reply {
    /// To a task that awaits it (an HTTP request, an in-process call).
    Caller(oneshot::Sender<Result<Payload>>),
    /// Onto the connection the call came over, as its `reply` frame in the connection's
    /// order of frames.
    Conn(conn::ReplySlot),
}

/// The answering side of a message that wants one.
trait Answer<T>: Send + 'static {
    fn answer(self, result: Result<T>);
}

impl<T: Send + 'static> Answer<T> for oneshot::Sender<Result<T>> {
    fn answer(self, result: Result<T>) {
        // The caller may have stopped waiting.
        let _ = self.send(result);
    }
}

impl Reply {
    /// Answers the call.
    pub(crate) fn send(self, result: Result<Payload>) {
        match self {
            Reply::Caller(reply) => reply.answer(result),
            Reply::Conn(slot) => slot.answer(result),
        }
    }
}

impl Answer<Payload> for Reply {
    fn answer(self, result: Result<Payload>) {
        self.send(result);
    }
}

impl Command {
    fn fail(self, err: Error) {
        // In every arm the caller may have stopped waiting.
        match self {
            Command::Action { reply, .. } => reply.answer(Err(err)),
            // The schedule stays in the database and fires again after a restart or a wake.
            Command::Alarm { .. } => {}
            Command::Connect { reply, .. } => drop(reply.send(Err(err))),
            Command::Disconnect { .. } => {}
            // The connection goes with its actor; nothing waits for this.
            Command::Subscribe { .. } => {}
            Command::Request { reply, .. } => drop(reply.send(Err(err))),
            Command::RawSocket { reply, .. } => drop(reply.send(Err(err))),
        }
    }
}

/// The cloneable sending side of a live actor.
#[derive(Clone)]
pub(crate) struct ActorHandle {
    /// Who the actor is.
    pub(crate) info: Arc<ActorInfo>,
    /// The actor's mailbox; the task closes it when it begins to stop and drops it on exit.
    tx: mpsc::Sender<Command>,
    /// Becomes `true` once the task has stopped and left the live set.
    stopped: watch::Receiver<bool>,
    /// Commits sent to the writer and not yet durable.
    pending_commits: Arc<AtomicUsize>,
}

impl ActorHandle {
    /// Queues a message without waiting: `actor.overloaded` if the mailbox is full,
    /// `actor.stopped` if the actor is stopping. On failure the message comes back, so a
    /// caller can deliver it to the actor's next task.
    pub(crate) fn try_deliver(&self, command: Command) -> Result<(), Box<(Error, Command)>> {
        self.tx.try_send(command).map_err(|err| {
            Box::new(match err {
                mpsc::error::TrySendError::Full(command) => (
                    Error::ActorOverloaded {
                        capacity: self.tx.max_capacity(),
                    },
                    command,
                ),
                mpsc::error::TrySendError::Closed(command) => (Error::ActorStopped, command),
            })
        })
    }

    /// Like [`ActorHandle::try_deliver`], dropping the message on failure.
    pub(crate) fn send(&self, command: Command) -> Result<()> {
        self.try_deliver(command).map_err(|failed| failed.0)
    }

    /// Resolves once the task has stopped and left the live set.
    pub(crate) async fn wait_stopped(&self) {
        let mut stopped = self.stopped.clone();
        // An error means the task is gone, which is what we wait for.
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }

    /// Whether the task has ended: it signalled `stopped`, or it is gone without signalling
    /// (a panic in user-facing code unwinds the task).
    pub(crate) fn has_exited(&self) -> bool {
        *self.stopped.borrow() || self.stopped.has_changed().is_err()
    }

    /// Whether commits of this actor are still on their way to disk.
    pub(crate) fn has_pending_commits(&self) -> bool {
        self.pending_commits.load(Ordering::Acquire) > 0
    }
}

/// Owns one live actor's instance (through the host) and its mailbox.
pub(crate) struct ActorTask {
    info: Arc<ActorInfo>,
    actor_type: Arc<ActorType>,
    core: Arc<Core>,
    /// The mailbox; every [`ActorHandle`] holds a sender.
    rx: mpsc::Receiver<Command>,
    /// A child of the runtime's stop token: cancelled when the graceful drain begins.
    stop: CancellationToken,
    /// Cancelled when the drain runs out of time: abandon work at once.
    force: CancellationToken,
    /// Tells this task's entry in the live set apart from a later task for the same actor.
    generation: u64,
    /// Set to `true` when the task has stopped; handles wait on it before retrying.
    stopped: watch::Sender<bool>,
    /// Shared with the handles; counts commits not yet durable.
    pending_commits: Arc<AtomicUsize>,
    /// Travels with every commit; the writer sets it when one of the instance's commits
    /// failed, and the task clears it once it has replaced the instance.
    poison: Arc<Poison>,
    /// Set when core refused a call's effects itself (they broke the KV limits): the
    /// instance holds the refused change in memory, so it is replaced before the next
    /// message, as after a failed commit.
    refused: bool,
    /// Why the task is stopping, once it has decided to.
    stopping: Option<StopReason>,
    /// Open connections, by id.
    conns: HashMap<Arc<str>, ConnHandle>,
    /// The same connections as a list, shared with commits that fan events out after they
    /// are durable; rebuilt when a connection comes or goes.
    conn_list: Arc<Vec<ConnHandle>>,
    /// Open raw sockets, by id; like connections, they keep the actor awake.
    raw_sockets: HashMap<String, ConnHandle>,
}

impl ActorTask {
    /// Creates the task and its first handle; the caller spawns [`ActorTask::run`].
    pub(crate) fn new(
        info: Arc<ActorInfo>,
        actor_type: Arc<ActorType>,
        core: Arc<Core>,
        generation: u64,
    ) -> (ActorTask, ActorHandle) {
        let (tx, rx) = mpsc::channel(core.config.limits.max_mailbox_len);
        let (stopped, stopped_rx) = watch::channel(false);
        let pending_commits = Arc::new(AtomicUsize::new(0));
        let task = ActorTask {
            stop: core.stop.child_token(),
            force: core.force.clone(),
            info: info.clone(),
            generation,
            actor_type,
            core,
            rx,
            stopped,
            pending_commits: pending_commits.clone(),
            poison: Arc::default(),
            refused: false,
            stopping: None,
            conns: HashMap::new(),
            conn_list: Arc::new(Vec::new()),
            raw_sockets: HashMap::new(),
        };
        let handle = ActorHandle {
            info,
            tx,
            stopped: stopped_rx,
            pending_commits,
        };
        (task, handle)
    }

    /// The actor's span: every line the actor or its children log carries its identity.
    /// It is an `error`-level span so that it stays enabled under any filter that lets a
    /// single line through: a `warn` logged with `KEEL_LOG=warn` still names its actor.
    pub(crate) fn span(info: &ActorInfo) -> tracing::Span {
        tracing::error_span!(
            "actor",
            actor_id = %info.id,
            name = %info.name,
            key = %info.key_string,
        )
    }

    /// Starts the instance, handles messages until the actor stops, then stops the instance
    /// and flushes its state.
    pub(crate) async fn run(mut self) {
        if let Err(err) = self.start().await {
            tracing::warn!(error = %err, "actor failed to start");
            self.close_and_fail(|| err.duplicate());
            self.close_sockets(close::GOING_AWAY, "actor failed to start");
            self.exit();
            return;
        }
        tracing::debug!("actor started");
        match self.serve().await {
            Some(reason) => self.finish(reason).await,
            None => {
                self.close_and_fail(|| Error::RegistryShutDown);
                self.close_sockets(close::GOING_AWAY, "server shutting down");
                tracing::debug!("actor abandoned by a forced drain");
                self.exit();
            }
        }
    }

    /// Loads the actor and starts its instance. A new actor whose creation fails is deleted,
    /// so a failed create hook leaves no actor behind.
    async fn start(&mut self) -> Result<()> {
        let snapshot = self
            .core
            .store
            .load(&self.info.id)?
            .ok_or(Error::ActorNotFound)?;
        snapshot.verify(&self.info.id, self.core.host.state_encoding())?;
        let is_new = snapshot.state.is_none();
        let request = StartRequest {
            state: snapshot.state,
            input: snapshot.input,
        };
        let timeout = self.core.config.hook_timeout;
        let started = self.guarded(
            timeout,
            Call::Hook("start"),
            self.core.host.start(&self.info, request),
        );
        match started.await {
            Ok(effects) => {
                self.commit(effects, None, Box::new(log_commit_failure));
                Ok(())
            }
            Err(err) => {
                if is_new {
                    self.core.forget_key(&self.info);
                    if let Err(delete) = self.core.writer.delete_actor(self.info.id.clone()).await {
                        tracing::error!(error = %delete, "deleting the actor whose creation failed failed");
                    }
                }
                Err(err)
            }
        }
    }

    /// Handles messages until the actor stops. Returns why it stopped, or `None` if the drain
    /// was forced.
    async fn serve(&mut self) -> Option<StopReason> {
        let idle = self
            .actor_type
            .sleep_timeout
            .unwrap_or(self.core.config.sleep_timeout);
        let mut idle_deadline = Instant::now() + idle;
        loop {
            tokio::select! {
                // Lifecycle first: once the drain begins, take no new messages but finish the
                // queued ones, which were already accepted.
                biased;
                _ = self.stop.cancelled(), if self.stopping.is_none() => {
                    self.begin_stopping(StopReason::Shutdown);
                }
                // The next message; `None` once the mailbox is closed and empty.
                command = self.rx.recv() => match command {
                    Some(command) => {
                        self.recover_from_failed_commit().await;
                        self.handle(command).await;
                        idle_deadline = Instant::now() + idle;
                    }
                    None => return self.stopping.or(Some(StopReason::Shutdown)),
                },
                // Idle for the whole sleep timeout, with nobody connected: sleep.
                _ = tokio::time::sleep_until(idle_deadline), if self.stopping.is_none() && self.is_unattended() => {
                    self.begin_stopping(StopReason::Sleep);
                }
            }
            if self.force.is_cancelled() {
                return None;
            }
        }
    }

    /// Closes the mailbox so the queue drains, remembering why. Destroying fails what is
    /// queued (the actor is gone); sleeping and shutting down handle it first.
    fn begin_stopping(&mut self, reason: StopReason) {
        if reason == StopReason::Destroy {
            // Requests by key wait for this task to leave from now on, before the destroying
            // call's reply is released, so the key is free once that reply is out.
            self.core.mark_dying(&self.info, self.stopped.subscribe());
            self.stopping = Some(reason);
            self.close_and_fail(|| Error::ActorNotFound);
            return;
        }
        if self.stopping.is_none() {
            self.stopping = Some(reason);
            self.rx.close();
        }
    }

    /// Whether no client holds the actor awake.
    fn is_unattended(&self) -> bool {
        self.conns.is_empty() && self.raw_sockets.is_empty()
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Action { call, reply } => self.handle_action(call, reply).await,
            Command::Alarm { stored } => self.handle_alarm(stored).await,
            Command::Connect {
                conn,
                params,
                request,
                reply,
            } => self.handle_connect(conn, params, request, reply).await,
            Command::Disconnect { conn_id } => self.handle_disconnect(conn_id).await,
            Command::Subscribe {
                conn,
                event,
                subscribe,
            } => self.handle_subscribe(conn, event, subscribe).await,
            Command::Request { request, reply } => self.handle_request(request, reply).await,
            Command::RawSocket {
                event,
                socket,
                reply,
            } => self.handle_raw_socket(event, socket, reply).await,
        }
    }

    async fn handle_connect(
        &mut self,
        conn: ConnHandle,
        params: Payload,
        upgrade: Option<RequestHead>,
        reply: oneshot::Sender<Result<()>>,
    ) {
        let request = ConnectRequest {
            conn_id: conn.id.to_string(),
            params,
            request: upgrade,
        };
        let result = if self.actor_type.hooks.on_connecting() {
            let timeout = self.core.config.hook_timeout;
            self.guarded(
                timeout,
                Call::Hook("connect"),
                self.core.host.connect(&self.info, request),
            )
            .await
        } else {
            // No user code to run: admit it, and let the host know without waiting.
            self.core.host.connected(&self.info, request);
            Ok(Effects::default())
        };
        match result {
            Ok(mut effects) => {
                self.conns.insert(conn.id.clone(), conn.clone());
                self.conn_list = Arc::new(self.conns.values().cloned().collect());
                // The new connection hears `ready` before any event of its own connect, so
                // this release sends those events itself, after `ready`.
                let ready = conn::ready_frame(conn.encoding, &self.info.id, &conn.id);
                let messages = std::mem::take(&mut effects.messages);
                let conns = self.conn_list.clone();
                self.commit(
                    effects,
                    None,
                    Box::new(move |durable| {
                        if durable.is_ok() {
                            conn.push(ready);
                            conn::deliver(&conns, &messages);
                        }
                        // The socket task may have ended meanwhile.
                        let _ = reply.send(durable);
                    }),
                );
            }
            Err(err) => {
                // The socket task may have ended meanwhile.
                let _ = reply.send(Err(err));
            }
        }
    }

    /// Grants a guarded subscription once the event's `canSubscribe` agrees and what it changed
    /// is durable; a refusal sends the connection an `error` frame naming the event.
    async fn handle_subscribe(&mut self, conn: ConnHandle, event: String, subscribe: bool) {
        if !subscribe {
            conn.unsubscribe(&event);
            return;
        }
        if !self.conns.contains_key(&conn.id) {
            // The connection closed (or was never admitted) before its turn came.
            return;
        }
        let timeout = self.core.config.hook_timeout;
        let result = self
            .guarded(
                timeout,
                Call::Hook("canSubscribe"),
                self.core.host.can_subscribe(&self.info, &conn.id, &event),
            )
            .await;
        match result {
            Ok(mut effects) => {
                let messages = std::mem::take(&mut effects.messages);
                let conns = self.conn_list.clone();
                let dev = self.core.config.dev;
                self.commit(
                    effects,
                    None,
                    Box::new(move |durable| match durable {
                        Ok(()) => {
                            conn.subscribe(event);
                            conn::deliver(&conns, &messages);
                        }
                        Err(err) => conn.refuse_subscription(&event, &err, dev),
                    }),
                );
            }
            Err(err) => {
                tracing::debug!(event, error = %err, "subscription refused");
                conn.refuse_subscription(&event, &err, self.core.config.dev);
            }
        }
    }

    async fn handle_disconnect(&mut self, conn_id: Arc<str>) {
        if self.conns.remove(&conn_id).is_none() {
            return;
        }
        self.conn_list = Arc::new(self.conns.values().cloned().collect());
        if !self.actor_type.hooks.on_disconnect {
            // No user code to run: let the host know without waiting.
            self.core.host.disconnected(&self.info, &conn_id);
            return;
        }
        let timeout = self.core.config.hook_timeout;
        let result = self
            .guarded(
                timeout,
                Call::Hook("disconnect"),
                self.core.host.disconnect(&self.info, &conn_id),
            )
            .await;
        match result {
            Ok(effects) => self.commit(effects, None, Box::new(log_commit_failure)),
            Err(err) => tracing::warn!(error = %err, "the disconnect hook failed"),
        }
    }

    async fn handle_request(
        &mut self,
        request: RawRequest,
        reply: oneshot::Sender<Result<RawResponse>>,
    ) {
        let timeout = self
            .actor_type
            .action_timeout
            .unwrap_or(self.core.config.action_timeout);
        let result = self
            .guarded(
                timeout,
                Call::Action("onRequest"),
                self.core.host.request(&self.info, request),
            )
            .await;
        if matches!(result, Err(Error::ActionTimedOut { .. })) {
            self.reset_instance("actor reset after a timeout").await;
        }
        self.commit_reply(result, reply);
    }

    async fn handle_raw_socket(
        &mut self,
        event: RawSocketEvent,
        socket: Option<ConnHandle>,
        reply: oneshot::Sender<Result<()>>,
    ) {
        match (&event, socket) {
            (RawSocketEvent::Open { socket_id, .. }, Some(socket)) => {
                self.raw_sockets.insert(socket_id.clone(), socket);
            }
            // A socket this instance no longer has: it closed it and ran its close listeners
            // already, or the socket belonged to an instance reset since.
            (RawSocketEvent::Close { socket_id, .. }, _)
                if self.raw_sockets.remove(socket_id).is_none() =>
            {
                return reply.answer(Ok(()));
            }
            (RawSocketEvent::Message { socket_id, .. }, _)
                if !self.raw_sockets.contains_key(socket_id) =>
            {
                return reply.answer(Ok(()));
            }
            _ => {}
        }
        let timeout = self.core.config.hook_timeout;
        let result = self
            .guarded(
                timeout,
                Call::Hook("websocket"),
                self.core.host.raw_socket(&self.info, event),
            )
            .await;
        self.commit_reply(result.map(|effects| ((), effects)), reply);
    }

    async fn handle_action(&mut self, call: ActionCall, reply: Reply) {
        let span = tracing::debug_span!("action", action = %call.action);
        let timeout = self
            .actor_type
            .action_timeout
            .unwrap_or(self.core.config.action_timeout);
        let name = call.action.clone();
        let action = self.core.host.action(&self.info, call);
        let started = std::time::Instant::now();
        let result = self
            .guarded(timeout, Call::Action(&name), action)
            .instrument(span.clone())
            .await;
        self.core.metrics.action_done(&result, started.elapsed());
        if matches!(result, Err(Error::ActionTimedOut { .. })) {
            self.reset_instance("actor reset after a timeout").await;
        }
        let _entered = span.enter();
        match &result {
            Ok(_) => tracing::trace!("action finished"),
            Err(err) => tracing::debug!(error = %err, "action failed"),
        }
        self.commit_reply(result.map(|done| (done.output, done.effects)), reply);
    }

    /// Commits a call's outcome and replies once it is durable: the value and its effects on
    /// success; on failure no effects, and the error still waits for earlier outputs, so
    /// replies leave in order.
    fn commit_reply<T: Send + 'static>(
        &mut self,
        result: Result<(T, Effects)>,
        reply: impl Answer<T>,
    ) {
        let (effects, outcome) = match result {
            Ok((value, effects)) => (effects, Ok(value)),
            Err(err) => (Effects::default(), Err(err)),
        };
        self.commit(
            effects,
            None,
            Box::new(move |durable| reply.answer(durable.and(outcome))),
        );
    }

    /// Runs a due schedule and settles it in the same commit as the action's effects.
    async fn handle_alarm(&mut self, stored: StoredSchedule) {
        let schedule = stored.schedule;
        let span =
            tracing::debug_span!("alarm", schedule_id = %schedule.id, action = %schedule.action);
        // It may have been cancelled (or run) since the timer read it; ask the database once
        // this actor's own commits have landed.
        self.settle_commits().await;
        match self.core.store.schedule(&schedule.id) {
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(error = %err, schedule_id = %schedule.id, "reading a due schedule failed; offering it again later");
                offer_again(
                    &self.core,
                    schedule.id,
                    self.info.id.clone(),
                    stored.attempts,
                );
                return;
            }
        }
        let result = match self.actor_type.check_action(&schedule.action) {
            Ok(()) => {
                let call = ActionCall {
                    action: schedule.action.clone(),
                    args: Payload::cbor(schedule.args.clone()),
                    output: Encoding::Cbor,
                    conn_id: None,
                    request: None,
                };
                let timeout = self
                    .actor_type
                    .action_timeout
                    .unwrap_or(self.core.config.action_timeout);
                let started = std::time::Instant::now();
                let result = self
                    .guarded(
                        timeout,
                        Call::Action(&schedule.action),
                        self.core.host.action(&self.info, call),
                    )
                    .instrument(span.clone())
                    .await;
                self.core.metrics.action_done(&result, started.elapsed());
                if matches!(result, Err(Error::ActionTimedOut { .. })) {
                    self.reset_instance("actor reset after a timeout").await;
                }
                result
            }
            Err(err) => Err(err),
        };
        let _entered = span.enter();
        let (effects, settle) = match result {
            Ok(done) => {
                tracing::debug!("schedule ran");
                (done.effects, Settle::Done)
            }
            Err(Error::RegistryShutDown) if self.force.is_cancelled() => return,
            Err(err) => {
                let attempts = stored.attempts + 1;
                if attempts >= SCHEDULE_MAX_ATTEMPTS {
                    tracing::warn!(error = %err, attempts, action = %schedule.action, "schedule failed; giving up");
                    (Effects::default(), Settle::Done)
                } else {
                    let delay = retry_delay(attempts);
                    tracing::debug!(error = %err, attempts, delay_ms = delay.as_millis() as u64, "schedule failed; will retry");
                    let at_ms = self.core.clock.now_ms() + delay.as_millis() as i64;
                    (Effects::default(), Settle::Retry { at_ms, attempts })
                }
            }
        };
        let retry = match &settle {
            Settle::Retry { at_ms, .. } => Some((schedule.id.clone(), *at_ms)),
            Settle::Done => None,
        };
        let core = self.core.clone();
        let actor_id = self.info.id.clone();
        let id = schedule.id.clone();
        let attempts = stored.attempts;
        self.commit(
            effects,
            Some((schedule.id, settle)),
            Box::new(move |durable| match durable {
                Ok(()) => {
                    if let Some((id, at_ms)) = retry {
                        core.alarms.add(id, actor_id, at_ms);
                    }
                }
                Err(err) => {
                    // The failed commit left the schedule as it was in the database; offer it
                    // again, or it would wait for the next start-up.
                    tracing::warn!(error = %err, schedule_id = %id, "committing a schedule's run failed; offering it again later");
                    offer_again(&core, id, actor_id, attempts);
                }
            }),
        );
    }

    /// Hands effects to the writer. `release` runs once they are durable; schedule changes
    /// reach the alarm timer then, and sleep or destroy requests take effect at once.
    ///
    /// Effects whose KV writes break the limits are refused whole (nothing of the call is
    /// written, sent, slept or destroyed), and `release` gets the limit error, still in
    /// commit order.
    fn commit(&mut self, effects: Effects, settle: Option<(String, Settle)>, release: Release) {
        let (effects, release) = match self.core.config.limits.check_kv(&effects.kv) {
            Ok(()) => (effects, release),
            Err(err) => {
                tracing::debug!(error = %err, "refusing a call's effects");
                self.refused = true;
                let release: Release = Box::new(move |durable| release(durable.and(Err(err))));
                (Effects::default(), release)
            }
        };
        if effects.destroy {
            self.begin_stopping(StopReason::Destroy);
        } else if effects.sleep {
            self.begin_stopping(StopReason::Sleep);
        }
        let now_ms = self.core.clock.now_ms();
        let writes = (effects.writes() || settle.is_some()).then(|| {
            Box::new(Writes {
                state: effects.state,
                kv: effects.kv,
                schedules: effects
                    .schedules
                    .into_iter()
                    .map(|op| op.resolve(now_ms))
                    .collect(),
                settle,
            })
        });
        let schedule_ops = writes
            .as_ref()
            .map(|writes| writes.schedules.clone())
            .unwrap_or_default();
        let pending = self.pending_commits.clone();
        pending.fetch_add(1, Ordering::AcqRel);
        let core = self.core.clone();
        let actor_id = self.info.id.clone();
        let messages = effects.messages;
        let disconnects = effects.disconnects;
        let conns =
            (!messages.is_empty() || !disconnects.is_empty()).then(|| self.conn_list.clone());
        self.core.writer.commit(
            self.info.id.clone(),
            writes,
            Some(self.poison.clone()),
            Box::new(move |durable| {
                let ok = durable.is_ok();
                // Schedules are armed before the caller hears back.
                if ok && !schedule_ops.is_empty() {
                    core.alarms.apply(&actor_id, &schedule_ops);
                }
                // One connection's frames leave in the order they were produced: the events
                // of the call, then its own output (the caller's reply), then the closes it
                // asked for. All of it is queued here, on the writer's thread, in commit
                // order.
                let conns = conns.filter(|_| ok);
                if let Some(conns) = &conns {
                    conn::deliver(conns, &messages);
                }
                release(durable);
                if let Some(conns) = &conns {
                    for (conn_id, reason) in &disconnects {
                        if let Some(conn) = conns.iter().find(|c| *c.id == **conn_id) {
                            conn.close(close::NORMAL, reason);
                        }
                    }
                }
                pending.fetch_sub(1, Ordering::AcqRel);
            }),
        );
    }

    /// Waits until this actor's commits so far are durable.
    async fn settle_commits(&self) {
        if self.pending_commits.load(Ordering::Acquire) > 0 {
            if let Err(err) = self.core.writer.flush().await {
                tracing::warn!(error = %err, "waiting for the actor's commits failed");
            }
        }
    }

    /// Runs a host call under a timeout, giving up at once if the drain is forced.
    async fn guarded<T>(
        &self,
        timeout: Duration,
        what: Call<'_>,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::select! {
            // A forced drain outranks the call: its result would not be waited for anyway.
            biased;
            _ = self.force.cancelled() => Err(Error::RegistryShutDown),
            // The call, bounded by its timeout.
            result = tokio::time::timeout(timeout, call) => match result {
                Ok(result) => result,
                Err(_) => {
                    let timeout_ms = timeout.as_millis() as u64;
                    match what {
                        Call::Action(action) => {
                            tracing::warn!(action, timeout_ms, "action timed out");
                            Err(Error::ActionTimedOut { timeout_ms })
                        }
                        Call::Hook(hook) => {
                            tracing::warn!(hook, timeout_ms, "hook timed out");
                            Err(Error::HookTimedOut { hook, timeout_ms })
                        }
                    }
                }
            },
        }
    }

    /// If a commit of this instance failed, or core refused a call's effects itself (the KV
    /// limits), replaces the instance: it holds changes that were refused, and so may every
    /// call since.
    async fn recover_from_failed_commit(&mut self) {
        if self.refused {
            tracing::debug!("replacing the instance after its effects were refused");
            self.reset_instance("actor reset after refused effects")
                .await;
        } else if self.poison.is_set() {
            tracing::debug!("replacing the instance after a failed commit");
            self.reset_instance("actor reset after a failed commit")
                .await;
        }
    }

    /// Replaces the instance with a fresh one loaded from committed state: after an action
    /// timed out (its user code may still be running and may still change the instance), so
    /// nothing the late code does can leak into later calls or be lost from them; and after
    /// a commit failed, so that the refused change is gone from memory too.
    async fn reset_instance(&mut self, why: &str) {
        // Connections belong to the instance being discarded; their clients reconnect to the
        // fresh one (1011 is a retryable close).
        self.close_sockets(close::INTERNAL, why);
        // Every commit of the old instance is answered (refused, if it was poisoned) before
        // the mark is cleared, so none of them can land afterwards.
        self.settle_commits().await;
        self.poison.clear();
        self.refused = false;
        let timeout = self.core.config.hook_timeout;
        let reset = self.guarded(
            timeout,
            Call::Hook("reset"),
            self.core.host.stop(&self.info, StopReason::Reset),
        );
        if let Err(err) = reset.await {
            tracing::warn!(error = %err, "discarding the timed-out instance failed");
        }
        if let Err(err) = self.start().await {
            tracing::warn!(error = %err, "restarting the actor after a timeout failed; stopping it");
            self.close_and_fail(|| err.duplicate());
            self.close_sockets(close::GOING_AWAY, "actor stopped");
            self.stopping = Some(StopReason::Reset);
        }
    }

    /// Stops the instance, flushes, and leaves.
    async fn finish(mut self, reason: StopReason) {
        self.settle_commits().await;
        let reason = if reason == StopReason::Destroy && self.poison.is_set() {
            // The commit of the call that asked for the destroy is the task's last, and it
            // did not land (it failed, or was refused behind one that did): the destroy did
            // not happen either. The actor stops as it is on disk, its instance discarded.
            tracing::warn!("a destroy whose commit failed is not carried out");
            StopReason::Reset
        } else {
            reason
        };
        // The stop hook runs on committed state, not on top of a refused change.
        if matches!(reason, StopReason::Sleep | StopReason::Shutdown) {
            self.recover_from_failed_commit().await;
        }
        let (code, close_reason) = match reason {
            StopReason::Destroy => (close::NORMAL, "actor destroyed"),
            _ => (close::GOING_AWAY, "actor stopping"),
        };
        self.close_raw_sockets(code, close_reason).await;
        let timeout = self.core.config.hook_timeout;
        let stopped = self.guarded(
            timeout,
            Call::Hook(reason.as_str()),
            self.core.host.stop(&self.info, reason),
        );
        match stopped.await {
            Ok(effects) if reason != StopReason::Destroy => {
                let effects = Effects {
                    sleep: false,
                    destroy: false,
                    ..effects
                };
                self.commit(effects, None, Box::new(log_commit_failure));
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %err, reason = reason.as_str(), "stopping the actor failed")
            }
        }
        if reason == StopReason::Destroy {
            if let Err(err) = self.core.writer.delete_actor(self.info.id.clone()).await {
                tracing::error!(error = %err, "deleting the destroyed actor failed");
            }
            // Only once the row is gone, so nothing resolves the key to the deleted actor.
            self.core.forget_key(&self.info);
        }
        if let Err(err) = self.core.writer.flush().await {
            tracing::error!(error = %err, "flushing the actor's state failed");
        }
        self.close_sockets(code, close_reason);
        tracing::debug!(reason = reason.as_str(), "actor stopped");
        self.exit();
    }

    /// Closes the raw sockets of a stopping actor and runs their close listeners in this
    /// instance, before its stop hook. Their sockets' own close events then find no socket
    /// here and the actor asleep, and wake nothing.
    async fn close_raw_sockets(&mut self, code: u16, reason: &str) {
        let timeout = self.core.config.hook_timeout;
        for (socket_id, socket) in std::mem::take(&mut self.raw_sockets) {
            socket.close(code, reason);
            let closed = RawSocketEvent::Close {
                socket_id,
                code,
                reason: reason.to_string(),
            };
            let result = self
                .guarded(
                    timeout,
                    Call::Hook("websocket"),
                    self.core.host.raw_socket(&self.info, closed),
                )
                .await;
            match result {
                Ok(effects) => {
                    // The actor is stopping already.
                    let effects = Effects {
                        sleep: false,
                        destroy: false,
                        ..effects
                    };
                    self.commit(effects, None, Box::new(log_commit_failure));
                }
                Err(err) => tracing::warn!(error = %err, "a raw socket's close listener failed"),
            }
        }
    }

    /// Closes every open socket (after what is queued on it).
    fn close_sockets(&mut self, code: u16, reason: &str) {
        for conn in self.conns.values().chain(self.raw_sockets.values()) {
            conn.close(code, reason);
        }
        self.conns.clear();
        self.raw_sockets.clear();
        self.conn_list = Arc::new(Vec::new());
    }

    /// Closes the mailbox and fails whatever is queued.
    fn close_and_fail(&mut self, err: impl Fn() -> Error) {
        self.rx.close();
        while let Ok(command) = self.rx.try_recv() {
            command.fail(err());
        }
    }

    /// Leaves the live set and wakes the callers waiting to retry.
    fn exit(self) {
        self.core.forget(&self.info.id, self.generation);
        self.stopped.send_replace(true);
    }
}

/// What a guarded host call is, for its timeout error and warning.
#[derive(Clone, Copy)]
enum Call<'a> {
    /// An action, by name.
    Action(&'a str),
    /// A lifecycle hook.
    Hook(&'static str),
}

/// Offers a schedule whose run left it unchanged in the database again after the delay of
/// its next retry; the attempt is not counted, since nothing of it was committed.
fn offer_again(core: &Core, id: String, actor_id: Arc<str>, attempts: u32) {
    let at_ms = core.clock.now_ms() + retry_delay(attempts + 1).as_millis() as i64;
    core.alarms.add(id, actor_id, at_ms);
}

fn log_commit_failure(result: Result<()>) {
    if let Err(err) = result {
        tracing::error!(error = %err, "committing the actor's effects failed");
    }
}
