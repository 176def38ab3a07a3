//! One live actor: a task that owns the actor's instance, and the handles that reach it.
//!
//! Every message to an actor goes through its bounded mailbox and is handled in arrival
//! order, one at a time, by [`ActorTask::run`]. The task never waits for durability itself:
//! it hands each result to the writer, whose commit releases the reply (the output gate), and
//! moves on to the next message, so one actor's pipelined calls share commits too.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::actor_type::ActorType;
use crate::error::{Error, Result};
use crate::host::{ActionCall, ActorInfo, StartRequest, StopReason};
use crate::runtime::Core;

/// A message to an actor.
pub(crate) enum Command {
    /// Runs an action; the reply carries its JSON result once the state it produced is durable.
    Action {
        call: ActionCall,
        reply: oneshot::Sender<Result<String>>,
    },
}

impl Command {
    fn fail(self, err: Error) {
        match self {
            // The caller may have stopped waiting.
            Command::Action { reply, .. } => drop(reply.send(Err(err))),
        }
    }
}

/// The cloneable sending side of a live actor.
#[derive(Clone)]
pub(crate) struct ActorHandle {
    /// Who the actor is.
    pub(crate) info: Arc<ActorInfo>,
    /// The actor's mailbox; the task closes it when the drain begins and drops it on exit.
    tx: mpsc::Sender<Command>,
}

impl ActorHandle {
    /// Sends an action and waits for its gated reply.
    pub(crate) async fn action(&self, call: ActionCall) -> Result<String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Command::Action { call, reply })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => Error::ActorOverloaded {
                    capacity: self.tx.max_capacity(),
                },
                mpsc::error::TrySendError::Closed(_) => Error::ActorStopped,
            })?;
        rx.await.map_err(|_| Error::ActorStopped)?
    }

    /// Whether the actor's task has stopped taking messages.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Owns one live actor's instance (through the host) and its mailbox.
pub(crate) struct ActorTask {
    info: Arc<ActorInfo>,
    actor_type: Arc<ActorType>,
    core: Arc<Core>,
    /// The mailbox; every [`ActorHandle`] holds a sender.
    rx: mpsc::Receiver<Command>,
    /// A child of the runtime's root token: cancelled when the graceful drain begins.
    stop: CancellationToken,
    /// Cancelled when the drain runs out of time: abandon work at once.
    force: CancellationToken,
    /// Tells this task's entry in the live set apart from a later task for the same actor.
    generation: u64,
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
        let task = ActorTask {
            stop: core.stop.child_token(),
            force: core.force.clone(),
            info: info.clone(),
            generation,
            actor_type,
            core,
            rx,
        };
        (task, ActorHandle { info, tx })
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

    /// Starts the instance, handles messages until the drain closes the mailbox, then stops
    /// the instance and flushes its state.
    pub(crate) async fn run(mut self) {
        if let Err(err) = self.start().await {
            tracing::warn!(error = %err, "actor failed to start");
            self.rx.close();
            while let Ok(command) = self.rx.try_recv() {
                command.fail(err.duplicate());
            }
            self.core.forget(&self.info.id, self.generation);
            return;
        }
        tracing::debug!("actor started");
        loop {
            tokio::select! {
                // Lifecycle first: once the drain begins, take no new messages but finish the
                // queued ones, which were already accepted.
                biased;
                _ = self.stop.cancelled(), if !self.rx.is_closed() => self.rx.close(),
                // The next message; `None` once the mailbox is closed and empty.
                command = self.rx.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => break,
                },
            }
            if self.force.is_cancelled() {
                self.abandon();
                return;
            }
        }
        self.finish(StopReason::Shutdown).await;
    }

    async fn start(&mut self) -> Result<()> {
        let snapshot = self
            .core
            .store
            .load(&self.info.id)?
            .ok_or(Error::ActorNotFound)?;
        let request = StartRequest {
            state: snapshot.state,
            input: snapshot.input,
        };
        let timeout = self.core.config.hook_timeout;
        let started = self
            .guarded(timeout, "start", self.core.host.start(&self.info, request))
            .await?;
        if let Some(state) = started.state {
            self.core.writer.commit(
                self.info.id.clone(),
                Some(state),
                Box::new(|result| {
                    if let Err(err) = result {
                        tracing::error!(error = %err, "persisting the created state failed");
                    }
                }),
            );
        }
        Ok(())
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Action { call, reply } => {
                let span = tracing::debug_span!("action", action = %call.action);
                let timeout = self
                    .actor_type
                    .action_timeout
                    .unwrap_or(self.core.config.action_timeout);
                let action = self.core.host.action(&self.info, call);
                let result = self
                    .guarded(timeout, "action", action)
                    .instrument(span.clone())
                    .await;
                let _entered = span.enter();
                match result {
                    Ok(done) => {
                        tracing::trace!("action finished");
                        let output = done.output;
                        self.core.writer.commit(
                            self.info.id.clone(),
                            done.state,
                            Box::new(move |durable| {
                                // The caller may have stopped waiting.
                                let _ = reply.send(durable.map(|()| output));
                            }),
                        );
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "action failed");
                        // Even an error waits for earlier outputs, so replies leave in order.
                        self.core.writer.commit(
                            self.info.id.clone(),
                            None,
                            Box::new(move |durable| {
                                // The caller may have stopped waiting.
                                let _ = reply.send(durable.and(Err(err)));
                            }),
                        );
                    }
                }
            }
        }
    }

    /// Runs a host call under a timeout, giving up at once if the drain is forced.
    async fn guarded<T>(
        &self,
        timeout: Duration,
        what: &'static str,
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
                    tracing::warn!(call = what, timeout_ms = timeout.as_millis() as u64, "user code timed out");
                    Err(Error::ActionTimedOut { timeout_ms: timeout.as_millis() as u64 })
                }
            },
        }
    }

    /// Stops the instance and waits until its last state is durable.
    async fn finish(self, reason: StopReason) {
        let timeout = self.core.config.hook_timeout;
        match self
            .guarded(timeout, "stop", self.core.host.stop(&self.info, reason))
            .await
        {
            Ok(state) => {
                if state.is_some() {
                    self.core.writer.commit(
                        self.info.id.clone(),
                        state,
                        Box::new(|result| {
                            if let Err(err) = result {
                                tracing::error!(error = %err, "persisting the final state failed");
                            }
                        }),
                    );
                }
            }
            Err(err) => tracing::warn!(error = %err, "stopping the actor failed"),
        }
        if let Err(err) = self.core.writer.flush().await {
            tracing::error!(error = %err, "flushing the actor's state failed");
        }
        tracing::debug!(reason = reason.as_str(), "actor stopped");
        self.core.forget(&self.info.id, self.generation);
    }

    /// The drain ran out of time: fail whatever is still queued and exit.
    fn abandon(mut self) {
        self.rx.close();
        while let Ok(command) = self.rx.try_recv() {
            command.fail(Error::RegistryShutDown);
        }
        tracing::debug!("actor abandoned by a forced drain");
        self.core.forget(&self.info.id, self.generation);
    }
}
