//! The task that owns one live actor's instance, and its life cycle.
//!
//! Every message to an actor goes through its bounded mailbox and is handled in arrival
//! order, one at a time, by [`ActorTask::run`]. The task never waits for durability itself:
//! it hands each call's effects to storage, whose commit releases the reply (the output
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::actor::conn::{self, close, ConnHandle};
use crate::actor::mailbox::{mailbox, MailReceiver};
use crate::actor::outbox::Outbox;
use crate::actor::signals::StopSignal;
use crate::actor::{ActorEnv, ActorHandle, Command, Lifecycle, Mail};
use crate::actor_type::ActorType;
use crate::actor_type::DbConfig;
use crate::error::{Error, Result};
use crate::host::{
    ActorInfo, Effects, Payload, RawSocketEvent, RestoredConn, StartRequest, StopReason,
};
use crate::kv_key;
use crate::storage::seam::{ActorDb, ConnWrite, DbChange, Poison, Release, Settle, Writes};

mod messages;

/// Owns one live actor's instance (through the host) and its mailbox.
pub(crate) struct ActorTask {
    info: Arc<ActorInfo>,
    actor_type: Arc<ActorType>,
    /// Storage, the host, the clock and the settings, shared by every task of the runtime.
    env: Arc<ActorEnv>,
    /// The directory that started this task, told when the task stops or is destroyed.
    lifecycle: Arc<dyn Lifecycle>,
    /// The mailbox; every [`ActorHandle`] holds a sender.
    rx: MailReceiver<Mail>,
    /// A child of the runtime's stop token: cancelled when the graceful drain begins, or
    /// when a handle asks the task to stop (`ActorHandle::request_stop`).
    stop: CancellationToken,
    /// Why a handle asked the task to stop; unset for the drain.
    stop_reason: Arc<parking_lot::Mutex<Option<StopReason>>>,
    /// Cancelled when the drain runs out of time: abandon work at once.
    force: CancellationToken,
    /// Tells this task's entry in the live set apart from a later task for the same actor.
    generation: u64,
    /// Signals the handles (and the directory) that the task has stopped; handles wait on it
    /// before retrying. Shares the keep-awake holds with them too (see `signals.rs`).
    stopped: StopSignal,
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
    /// The tokens of the actor's durable connections, by id (types with hibernatable
    /// connections): every connection with a record, with a socket or not.
    tokens: HashMap<Arc<str>, String>,
    /// Durable connections without a socket (restored after a restart, not yet resumed),
    /// and when each stops waiting: then it closes for good. They keep the actor awake.
    detached: HashMap<Arc<str>, Instant>,
    /// Changes to durable connections that the next commit carries, with the effects of the
    /// call that made them.
    conn_writes: Vec<ConnWrite>,
    /// Open raw sockets, by id; like connections, they keep the actor awake.
    raw_sockets: HashMap<String, ConnHandle>,
    /// Where commits' releases hand over what leaves for clients; started with the first
    /// connection, and from then on used by every release of the task (see `outbox.rs`).
    outbox: Option<Outbox>,
    /// The instance's SQL database, for a type with one: opened by each start, closed when
    /// the instance is discarded or the task stops.
    db: Option<Arc<dyn ActorDb>>,
    /// The SQL changes of the host call that just returned, taken by the commit that follows
    /// it (set by [`ActorTask::guarded`], which only borrows the task).
    db_change: parking_lot::Mutex<Option<DbChange>>,
}

impl ActorTask {
    /// Creates the task and its first handle; the caller spawns [`ActorTask::run`].
    pub(crate) fn new(
        info: Arc<ActorInfo>,
        actor_type: Arc<ActorType>,
        env: Arc<ActorEnv>,
        lifecycle: Arc<dyn Lifecycle>,
        generation: u64,
    ) -> (ActorTask, ActorHandle) {
        let (tx, rx) = mailbox(env.limits.max_mailbox_len);
        let (stopped, signals) = StopSignal::new();
        let pending_commits = Arc::new(AtomicUsize::new(0));
        let stop = env.stop.child_token();
        let stop_reason = Arc::new(parking_lot::Mutex::new(None));
        let task = ActorTask {
            stop: stop.clone(),
            stop_reason: stop_reason.clone(),
            force: env.force.clone(),
            info: info.clone(),
            generation,
            actor_type,
            env,
            lifecycle,
            rx,
            stopped,
            pending_commits: pending_commits.clone(),
            poison: Arc::default(),
            refused: false,
            stopping: None,
            conns: HashMap::new(),
            conn_list: Arc::new(Vec::new()),
            tokens: HashMap::new(),
            detached: HashMap::new(),
            conn_writes: Vec::new(),
            raw_sockets: HashMap::new(),
            outbox: None,
            db: None,
            db_change: parking_lot::Mutex::new(None),
        };
        let handle = ActorHandle {
            info,
            tx,
            signals,
            pending_commits,
            stop,
            stop_reason,
        };
        (task, handle)
    }

    /// Starts the instance, handles messages until the actor stops, then stops the instance
    /// and flushes its state.
    ///
    /// Starting, handling a message and stopping each run in a future of their own on the
    /// heap, made when they begin and freed when they end: an actor's task holds only what
    /// waiting for its next message needs (the largest of those steps, inline, would make
    /// every idle actor carry kilobytes it is not using).
    pub(crate) fn run(self) -> impl std::future::Future<Output = ()> + Send {
        // An `async fn` would keep `self` twice in its future (the argument and the local it
        // is moved into); a block captures it once.
        let mut task = self;
        async move {
            if let Err(err) = Box::pin(task.start()).await {
                tracing::warn!(error = %err, "actor failed to start");
                task.close_and_fail(|| err.duplicate());
                task.close_sockets(close::GOING_AWAY, "actor failed to start");
                task.close_db().await;
                task.exit();
                return;
            }
            tracing::debug!("actor started");
            match task.serve().await {
                Some(reason) => Box::pin(task.finish(reason)).await,
                None => {
                    task.close_and_fail(|| Error::RegistryShutDown);
                    task.close_sockets(close::GOING_AWAY, "server shutting down");
                    tracing::debug!("actor abandoned by a forced drain");
                    task.close_db().await;
                    task.exit();
                }
            }
        }
    }

    /// Loads the actor and starts its instance. A new actor whose creation fails is deleted,
    /// so a failed create hook leaves no actor behind.
    async fn start(&mut self) -> Result<()> {
        let mut snapshot = self
            .env
            .storage
            .load(&self.info.id)
            .await?
            .ok_or(Error::ActorNotFound)?;
        snapshot.verify(&self.info.id, self.env.host.state_encoding())?;
        let is_new = snapshot.state.is_none();
        let db_token = match self.actor_type.db {
            Some(config) => Some(self.open_db(config).await?),
            None => None,
        };
        let conns = self.restore_conns(std::mem::take(&mut snapshot.conns));
        let request = StartRequest {
            state: snapshot.state,
            input: snapshot.input,
            conns,
            db_token,
        };
        let timeout = self.env.hook_timeout;
        let started = self.guarded(
            timeout,
            Call::Hook("start"),
            self.env.host.start(&self.info, request),
        );
        match started.await {
            Ok(effects) => {
                self.commit(effects, None, Box::new(log_commit_failure));
                Ok(())
            }
            Err(err) => {
                // Closed before a new actor's deletion, which removes its file.
                self.close_db().await;
                if is_new {
                    self.lifecycle.forget_key(&self.info);
                    if let Err(delete) = self.env.storage.delete(self.info.id.clone()).await {
                        tracing::error!(error = %delete, "deleting the actor whose creation failed failed");
                    }
                }
                Err(err)
            }
        }
    }

    /// Reattaches a hibernatable type's durable connections to their sockets: those kept
    /// while the actor slept, and (after a reset) those of the replaced instance. A record
    /// without a socket waits, detached, for its client to resume it; a socket without a
    /// record (its admission never became durable) cannot be served and is closed.
    fn restore_conns(
        &mut self,
        stored: Vec<crate::storage::seam::StoredConn>,
    ) -> Vec<RestoredConn> {
        if !self.actor_type.hibernatable_conns {
            return Vec::new();
        }
        let mut sockets: HashMap<Arc<str>, ConnHandle> = self
            .env
            .hibernated
            .take(&self.info.id)
            .into_iter()
            .map(|conn| (conn.id.clone(), conn))
            .collect();
        sockets.extend(self.conns.drain());
        self.tokens.clear();
        self.detached.clear();
        let deadline = Instant::now() + self.actor_type.reconnect_window;
        let mut restored = Vec::with_capacity(stored.len());
        for conn in stored {
            let id: Arc<str> = Arc::from(conn.id.as_str());
            match sockets.remove(&id) {
                Some(socket) => {
                    self.conns.insert(id.clone(), socket);
                }
                None => {
                    self.detached.insert(id.clone(), deadline);
                }
            }
            self.tokens.insert(id, conn.token);
            restored.push(RestoredConn {
                conn_id: conn.id,
                params: Payload {
                    encoding: conn.encoding,
                    bytes: conn.params,
                },
                state: conn.state,
            });
        }
        for socket in sockets.into_values() {
            socket.close(close::INTERNAL, "connection lost");
        }
        self.conn_list = Arc::new(self.conns.values().cloned().collect());
        if !self.conns.is_empty() {
            self.ensure_outbox();
        }
        restored
    }

    /// Starts the outbox that the releases of a task with connections hand frames to.
    pub(super) fn ensure_outbox(&mut self) {
        if self.outbox.is_none() {
            let span = tracing::Span::current();
            self.outbox = Some(Outbox::start(&self.env.tracker, &self.force, span));
        }
    }

    /// Handles messages until the actor stops. Returns why it stopped, or `None` if the drain
    /// was forced.
    async fn serve(&mut self) -> Option<StopReason> {
        let idle = self
            .actor_type
            .sleep_timeout
            .unwrap_or(self.env.sleep_timeout);
        let mut idle_deadline = Instant::now() + idle;
        let signals = self.stopped.shared().clone();
        // Held for the loop, so that counting each message's handling takes no clone.
        let env = self.env.clone();
        loop {
            let deadline = match self.stopping {
                None => self.next_deadline(idle_deadline),
                Some(_) => None,
            };
            tokio::select! {
                // Lifecycle first: once the drain begins, take no new messages but finish the
                // queued ones, which were already accepted.
                biased;
                _ = self.stop.cancelled(), if self.stopping.is_none() => {
                    let reason = self.stop_reason.lock().unwrap_or(StopReason::Shutdown);
                    self.begin_stopping(reason);
                }
                // The next message; `None` once the mailbox is closed and empty.
                command = self.rx.recv() => match command {
                    Some(command) => {
                        let _handling = env.activity.handling();
                        Box::pin(self.next_message(*command)).await;
                        idle_deadline = Instant::now() + idle;
                    }
                    None => return self.stopping.or(Some(StopReason::Shutdown)),
                },
                // A keep-awake hold (`c.keepAwake` in JS) opened or closed: the idle time
                // counts from now.
                _ = signals.holds_changed() => {
                    idle_deadline = Instant::now() + idle;
                }
                // One timer (each awake actor carries it inline) for the sooner of two: a
                // restored connection not resumed in its window closes for good; idle for the
                // whole sleep timeout, with nobody connected (or only hibernatable
                // connections), the actor sleeps.
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let now = Instant::now();
                    if self.detached.values().any(|deadline| *deadline <= now) {
                        Box::pin(self.expire_detached()).await;
                        idle_deadline = Instant::now() + idle;
                    } else if self.is_unattended() && idle_deadline <= now {
                        self.begin_stopping(StopReason::Sleep);
                    }
                }
            }
            if self.force.is_cancelled() {
                return None;
            }
        }
    }

    /// Handles one message, first replacing the instance if a commit of it failed.
    async fn next_message(&mut self, command: Command) {
        self.recover_from_failed_commit().await;
        self.handle(command).await;
    }

    /// Closes the mailbox so the queue drains, remembering why. Destroying fails what is
    /// queued (the actor is gone); sleeping and shutting down handle it first.
    fn begin_stopping(&mut self, reason: StopReason) {
        if reason == StopReason::Destroy {
            // Requests by key wait for this task to leave from now on, before the destroying
            // call's reply is released, so the key is free once that reply is out.
            self.lifecycle
                .mark_dying(&self.info, self.stopped.shared().clone());
            self.stopping = Some(reason);
            self.close_and_fail(|| Error::ActorNotFound);
            return;
        }
        if self.stopping.is_none() {
            self.stopping = Some(reason);
            self.rx.close();
        }
    }

    /// When the serve loop's timer is due: the first restored connection's window ends, or
    /// (while nothing keeps the actor awake) `idle_deadline`.
    fn next_deadline(&self, idle_deadline: Instant) -> Option<Instant> {
        let detached = self.detached.values().min().copied();
        let idle = self.is_unattended().then_some(idle_deadline);
        detached.into_iter().chain(idle).min()
    }

    /// Whether no client and no keep-awake hold keeps the actor awake. Hibernatable
    /// connections do not (they stay open while the actor sleeps); detached ones, waiting to
    /// be resumed, do.
    fn is_unattended(&self) -> bool {
        (self.conns.is_empty() || self.actor_type.hibernatable_conns)
            && self.detached.is_empty()
            && self.raw_sockets.is_empty()
            && self.stopped.shared().holds() == 0
    }

    /// Hands effects to the writer. `release` runs once they are durable; schedule changes
    /// reach the alarm timer then, and sleep or destroy requests take effect at once.
    ///
    /// Effects whose KV writes break the limits are refused whole (nothing of the call is
    /// written, sent, slept or destroyed), and `release` gets the limit error, still in
    /// commit order.
    fn commit(&mut self, effects: Effects, settle: Option<(String, Settle)>, release: Release) {
        let limits = &self.env.limits;
        let checked = kv_key::check(
            &effects.kv,
            limits.max_kv_key_bytes,
            limits.max_kv_value_bytes,
        );
        // Only an actor with a database has changes to take (and a lock to take them from).
        let mut db_change = match self.db {
            Some(_) => self.db_change.lock().take(),
            None => None,
        };
        let (effects, release) = match checked {
            Ok(()) => (effects, release),
            Err(err) => {
                tracing::debug!(error = %err, "refusing a call's effects");
                self.refused = true;
                if let (Some(change), Some(db)) = (db_change.take(), &self.db) {
                    db.finish(change.seq, false);
                }
                let release: Release = Box::new(move |durable| release(durable.and(Err(err))));
                (Effects::default(), release)
            }
        };
        if effects.destroy {
            self.begin_stopping(StopReason::Destroy);
        } else if effects.sleep {
            self.begin_stopping(StopReason::Sleep);
        }
        let now_ms = self.env.clock.now_ms();
        let db_seq = db_change.as_ref().map(|change| change.seq);
        let db = self.db.clone().filter(|_| db_seq.is_some());
        let mut conn_writes = std::mem::take(&mut self.conn_writes);
        // Only connections with a record have a durable state.
        conn_writes.extend(
            effects
                .conn_states
                .into_iter()
                .filter(|(id, _)| self.tokens.contains_key(id.as_str()))
                .map(|(id, state)| ConnWrite::State { id, state }),
        );
        let writes = (effects.state.is_some()
            || !effects.kv.is_empty()
            || !effects.schedules.is_empty()
            || settle.is_some()
            || !conn_writes.is_empty()
            || db_change.is_some())
        .then(|| {
            Box::new(Writes {
                db: db_change,
                state: effects.state,
                kv: effects.kv,
                schedules: effects
                    .schedules
                    .into_iter()
                    .map(|op| op.resolve(now_ms))
                    .collect(),
                settle,
                conns: conn_writes,
            })
        });
        let schedule_ops = writes
            .as_ref()
            .map(|writes| writes.schedules.clone())
            .unwrap_or_default();
        let pending = self.pending_commits.clone();
        pending.fetch_add(1, Ordering::AcqRel);
        let schedules = self.env.schedules.clone();
        let actor_id = self.info.id.clone();
        let messages = effects.messages;
        let disconnects = effects.disconnects;
        let conns =
            (!messages.is_empty() || !disconnects.is_empty()).then(|| self.conn_list.clone());
        let outbox = self.outbox.clone();
        self.env.storage.commit(
            self.info.id.clone(),
            writes,
            Some(self.poison.clone()),
            Box::new(move |durable| {
                let ok = durable.is_ok();
                // The SQL change is committed to (or dropped from) the actor's database; the
                // actor's next call waits for that, the caller need not.
                if let (Some(db), Some(seq)) = (&db, db_seq) {
                    db.finish(seq, ok);
                }
                // Schedules are armed before the caller hears back.
                if ok && !schedule_ops.is_empty() {
                    schedules.apply(&actor_id, &schedule_ops);
                }
                // One connection's frames leave in the order they were produced: the events
                // of the call, then its own output (the caller's reply), then the closes it
                // asked for. Queued in commit order, by the outbox once the actor has one, so
                // that fanning out does not hold up storage's thread.
                let conns = conns.filter(|_| ok);
                let deliver = move || {
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
                };
                match &outbox {
                    Some(outbox) => outbox.send(Box::new(deliver)),
                    None => deliver(),
                }
                pending.fetch_sub(1, Ordering::AcqRel);
            }),
            // Alone: no other actor is handling a message, and no message of this one waits
            // behind this call (calls queued behind it run while the writer thread flushes
            // this commit, and their commits share the next flush).
            self.env.activity.alone() && self.rx.is_empty(),
        );
    }

    /// Waits until this actor's commits so far are durable.
    async fn settle_commits(&self) {
        if self.pending_commits.load(Ordering::Acquire) > 0 {
            if let Err(err) = self.env.storage.flush().await {
                tracing::warn!(error = %err, "waiting for the actor's commits failed");
            }
        }
    }

    /// Runs a host call under a timeout, giving up at once if the drain is forced. For an
    /// actor with a SQL database, the call runs after the previous call's SQL is committed to
    /// it, and its own statements end with it: prepared for the commit that follows if it
    /// returned, rolled back if it failed.
    async fn guarded<T>(
        &self,
        timeout: Duration,
        what: Call<'_>,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let Some(db) = &self.db else {
            return self.bounded(timeout, what, call).await;
        };
        db.settled().await;
        db.enter();
        let result = self.bounded(timeout, what, call).await;
        match result {
            Ok(value) => match db.prepare().await {
                Ok(change) => {
                    *self.db_change.lock() = change;
                    Ok(value)
                }
                Err(err) => Err(err),
            },
            Err(err) => {
                db.rollback().await;
                Err(err)
            }
        }
    }

    /// Runs a host call under its timeout, giving up at once if the drain is forced.
    async fn bounded<T>(
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
        // fresh one (1011 is a retryable close). Hibernatable ones are durable: the fresh
        // instance takes them over as committed.
        if self.actor_type.hibernatable_conns {
            for socket in self.raw_sockets.values() {
                socket.close(close::INTERNAL, why);
            }
            self.raw_sockets.clear();
        } else {
            self.close_sockets(close::INTERNAL, why);
        }
        // Every commit of the old instance is answered (refused, if it was poisoned) before
        // the mark is cleared, so none of them can land afterwards.
        self.settle_commits().await;
        self.poison.clear();
        self.refused = false;
        let timeout = self.env.hook_timeout;
        let reset = self.guarded(
            timeout,
            Call::Hook("reset"),
            self.env.host.stop(&self.info, StopReason::Reset),
        );
        if let Err(err) = reset.await {
            tracing::warn!(error = %err, "discarding the timed-out instance failed");
        }
        // The discarded instance's late statements must not reach the fresh one: the start
        // opens the database again, with a new token.
        self.close_db().await;
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
        let timeout = self.env.hook_timeout;
        let stopped = self.guarded(
            timeout,
            Call::Hook(reason.as_str()),
            self.env.host.stop(&self.info, reason),
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
            // Closed before the deletion removes its file; what `onDestroy` wrote to it is
            // dropped with it.
            self.close_db().await;
            if let Err(err) = self.env.storage.delete(self.info.id.clone()).await {
                tracing::error!(error = %err, "deleting the destroyed actor failed");
            }
            // Only once the row is gone, so nothing resolves the key to the deleted actor.
            self.lifecycle.forget_key(&self.info);
        }
        if let Err(err) = self.env.storage.flush().await {
            tracing::error!(error = %err, "flushing the actor's state failed");
        }
        if let Some(db) = &self.db {
            db.settled().await;
        }
        self.close_db().await;
        // What the last commits let out reaches the connections before they close.
        if let Some(outbox) = &self.outbox {
            outbox.drained().await;
        }
        if reason == StopReason::Sleep && self.actor_type.hibernatable_conns {
            self.hibernate_conns();
        }
        self.close_sockets(code, close_reason);
        tracing::debug!(reason = reason.as_str(), "actor stopped");
        self.exit();
    }

    /// Closes the raw sockets of a stopping actor and runs their close listeners in this
    /// instance, before its stop hook. Their sockets' own close events then find no socket
    /// here and the actor asleep, and wake nothing.
    async fn close_raw_sockets(&mut self, code: u16, reason: &str) {
        let timeout = self.env.hook_timeout;
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
                    self.env.host.raw_socket(&self.info, closed),
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

    /// Opens the instance's SQL database (applying what the log holds for it) and makes it
    /// reachable for the host's statements; returns its token.
    async fn open_db(&mut self, config: DbConfig) -> Result<u64> {
        self.close_db().await;
        let db = self
            .env
            .storage
            .open_db(self.info.id.clone(), config)
            .await?;
        let token = db.token();
        self.env.databases.insert(self.info.id.clone(), db.clone());
        self.db = Some(db);
        Ok(token)
    }

    /// Closes the instance's SQL database, if open: what a call left uncommitted is rolled
    /// back, and the host's statements are refused from now on.
    async fn close_db(&mut self) {
        if let Some(db) = self.db.take() {
            self.env.databases.remove(&self.info.id, db.token());
            self.db_change.lock().take();
            db.close().await;
        }
    }

    /// Leaves the open connections of a sleeping actor to the runtime, open, for its next
    /// task; before `exit`, so that task finds them. Once the drain has begun they are closed
    /// instead (their records stay for the restart).
    fn hibernate_conns(&mut self) {
        let conns: Vec<ConnHandle> = self.conns.drain().map(|(_, conn)| conn).collect();
        self.conn_list = Arc::new(Vec::new());
        let count = conns.len();
        match self.env.hibernated.put(self.info.id.clone(), conns) {
            Ok(()) => tracing::debug!(count, "connections hibernated"),
            Err(conns) => {
                for conn in conns {
                    conn.close(close::GOING_AWAY, "server shutting down");
                }
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
        while let Some(command) = self.rx.try_recv() {
            (*command).fail(err());
        }
    }

    /// Leaves the live set and wakes the callers waiting to retry.
    fn exit(self) {
        self.lifecycle.left(&self.info.id, self.generation);
        self.stopped.signal();
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

fn log_commit_failure(result: Result<()>) {
    if let Err(err) = result {
        tracing::error!(error = %err, "committing the actor's effects failed");
    }
}
