//! One live actor: a task that owns the actor's instance, and the handles that reach it.
//!
//! Every message to an actor goes through its bounded mailbox (`ActorHandle` is the sending
//! side) and is handled in arrival order, one at a time, by its task; the life cycle and the
//! output gate are the task's (`task.rs`). What must stay true here: a message that cannot be
//! delivered comes back to the sender (a stopping actor takes nothing more), so the dispatch
//! can hand it to the actor's next task and nothing runs twice.
//!
//! # Layout
//! - this module: the messages an actor takes (`Command`), its handle (`ActorHandle`), and
//!   `ActorEnv`, the narrow handle to everything an actor task uses from below and around it.
//! - `task`: the task that owns one live actor's instance, its life cycle and commits
//!   (`task/messages.rs`: how it handles each message).
//! - `conn`: one actor's connections: their outgoing queues, frames and reply order.
//! - `hibernation`: the open connections of sleeping actors whose type has hibernatable
//!   connections, kept until the actor's next task takes them.
//! - `outbox`: where a commit's release hands events and replies over, off storage's thread.
//! - `schedules`: schedule retries and the in-memory index of when each falls due.
//!
//! Rule: this floor uses storage (through the `Storage` seam) and the base modules, never the
//! runtime or the server; what it needs of the directory above it is the `Lifecycle`
//! callback that the runtime implements.

pub mod conn;
pub(crate) mod hibernation;
pub(crate) mod mailbox;
pub(crate) mod outbox;
pub(crate) mod schedules;
pub(crate) mod signals;
pub(crate) mod task;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actor::conn::ConnHandle;
use crate::actor::hibernation::Hibernated;
use crate::actor::mailbox::{MailSender, TrySend};
use crate::actor::schedules::{Alarms, Firing};
use crate::actor::signals::TaskSignals;
use crate::clock::Clock;
use crate::config::{Limits, RuntimeConfig};
use crate::error::{DbError, Error, Result};
use crate::host::{
    ActionCall, ActorInfo, Host, Payload, RawRequest, RawResponse, RawSocketEvent, RequestHead,
    StopReason,
};
use crate::metrics::Metrics;
use crate::storage::seam::ActorDb;
use crate::storage::seam::Storage;
use crate::storage::seam::StoredSchedule;

/// The span every line about `actor` is logged in: an `error`-level `actor` span with its
/// `actor_id`, `name` and `key`, as the actor's own task uses. A host logging for user code
/// outside the task (a late callback, say) enters one of these.
/// It is an `error`-level span so that it stays enabled under any filter that lets a
/// single line through: a `warn` logged with `KEEL_LOG=warn` still names its actor.
pub fn span(info: &ActorInfo) -> tracing::Span {
    tracing::error_span!(
        "actor",
        actor_id = %info.id,
        name = %info.name,
        key = %info.key_string,
    )
}

/// A message to an actor.
pub(crate) enum Command {
    /// Runs an action; the reply carries its output once the effects it produced are durable.
    Action { call: ActionCall, reply: Reply },
    /// Runs a schedule that fell due.
    /// `firing` keeps it counted as pending until the actor begins to run it.
    Alarm {
        stored: StoredSchedule,
        firing: Firing,
    },
    /// Admits a connection; on success the actor queues its `ready` frame itself.
    Connect {
        conn: ConnHandle,
        params: Payload,
        /// The token of the durable connection the client asks to resume (its id is the
        /// handle's); `None` for a new connection.
        resume: Option<String>,
        /// The WebSocket upgrade request.
        request: Option<RequestHead>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// A connection's socket ended. `conn` is the socket's own handle, so the end of an old
    /// socket never removes a connection resumed on a new one under the same id.
    Disconnect { conn: ConnHandle },
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

/// A message in an actor's mailbox. Boxed, so that a mailbox slot is one pointer: the queue
/// keeps the room it grew to until it empties (see `mailbox.rs`), and [`Command`] inline is a
/// few hundred bytes.
pub(crate) type Mail = Box<Command>;

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
    /// Messages travel boxed (see [`Mail`]).
    tx: MailSender<Mail>,
    /// Says when the task has stopped and left the live set, and holds the open keep-awake
    /// holds, which the task watches (see [`ActorHandle::keep_awake`]).
    signals: Arc<TaskSignals>,
    /// Commits sent to the writer and not yet durable.
    pending_commits: Arc<AtomicUsize>,
    /// The task's own stop token (a child of the drain token): cancelling it makes the task
    /// stop for the reason in `stop_reason`, as the drain does.
    stop: CancellationToken,
    /// Why [`ActorHandle::request_stop`] asked the task to stop; read by the task once
    /// `stop` is cancelled (`Shutdown` if unset, which is the drain).
    stop_reason: Arc<parking_lot::Mutex<Option<StopReason>>>,
}

impl ActorHandle {
    /// Queues a message without waiting: `actor.overloaded` if the mailbox is full,
    /// `actor.stopped` if the actor is stopping. On failure the message comes back, so a
    /// caller can deliver it to the actor's next task.
    pub(crate) fn try_deliver(&self, command: Command) -> Result<(), Box<(Error, Command)>> {
        self.tx.try_send(Box::new(command)).map_err(|err| {
            Box::new(match err {
                TrySend::Full(command) => (
                    Error::ActorOverloaded {
                        capacity: self.tx.max_capacity(),
                    },
                    *command,
                ),
                TrySend::Closed(command) => (Error::ActorStopped, *command),
            })
        })
    }

    /// Like [`ActorHandle::try_deliver`], dropping the message on failure.
    pub(crate) fn send(&self, command: Command) -> Result<()> {
        self.try_deliver(command).map_err(|failed| failed.0)
    }

    /// Opens (`held`) or closes a keep-awake hold: while any is open, the actor does not sleep
    /// for being idle; closing the last one starts its idle time afresh. Closing more holds
    /// than were opened is ignored.
    pub(crate) fn keep_awake(&self, held: bool) {
        self.signals.change_holds(held);
    }

    /// Resolves once the task has stopped and left the live set.
    pub(crate) async fn wait_stopped(&self) {
        self.signals.wait_stopped().await;
    }

    /// Whether the task has ended: it signalled `stopped`, or it is gone without signalling
    /// (a panic in user-facing code unwinds the task).
    pub(crate) fn has_exited(&self) -> bool {
        self.signals.is_stopped()
    }

    /// Whether the task has begun to stop (its mailbox is closed) or has ended.
    pub(crate) fn is_stopping(&self) -> bool {
        self.tx.is_closed() || self.has_exited()
    }

    /// Asks the task to stop for `reason` from outside it (an engine's stop command): it
    /// stops as for the drain, with that reason's hooks. The first reason asked for wins.
    pub(crate) fn request_stop(&self, reason: StopReason) {
        self.stop_reason.lock().get_or_insert(reason);
        self.stop.cancel();
    }

    /// Whether commits of this actor are still on their way to disk.
    pub(crate) fn has_pending_commits(&self) -> bool {
        self.pending_commits.load(Ordering::Acquire) > 0
    }
}

/// What every actor task of a runtime shares: storage, the host, the clock, the settings,
/// the cancellation tree, the metrics and the schedule index. Built once per runtime.
pub(crate) struct ActorEnv {
    /// Where the actor's state lives; every durable write goes through its `commit`.
    pub(crate) storage: Arc<dyn Storage>,
    /// Runs the user code.
    pub(crate) host: Arc<dyn Host>,
    /// The clock schedules are measured on.
    pub(crate) clock: Clock,
    /// The limits every call's effects are checked against.
    pub(crate) limits: Limits,
    /// The timeout of each lifecycle hook.
    pub(crate) hook_timeout: Duration,
    /// Dev mode: errors sent to clients (a refused subscription's) show internal messages.
    pub(crate) dev: bool,
    /// The default timeout of an action (a type may set its own).
    pub(crate) action_timeout: Duration,
    /// The default idle time before an actor sleeps (a type may set its own).
    pub(crate) sleep_timeout: Duration,
    /// The runtime's drain token: each task watches a child of it.
    pub(crate) stop: CancellationToken,
    /// Cancelled when the drain runs out of time: every task gives up at once.
    pub(crate) force: CancellationToken,
    /// The runtime's tracker, for the tasks an actor spawns (its outbox's drainer).
    pub(crate) tracker: TaskTracker,
    /// Counters, shared with the registry.
    pub(crate) metrics: Arc<Metrics>,
    /// When each pending schedule falls due; commits keep it up to date.
    pub(crate) schedules: Arc<Alarms>,
    /// The open connections of sleeping actors (hibernatable connections); the runtime
    /// closes it when the drain begins.
    pub(crate) hibernated: Arc<Hibernated>,
    /// The SQL databases of live actors, by actor id: tasks add theirs when they start and
    /// remove it when they stop; the runtime finds them for the host's statements.
    pub(crate) databases: Arc<OpenDbs>,
    /// How many actors are handling a message now, for where a commit may be applied.
    pub(crate) activity: Activity,
}

/// How many of the runtime's actors are handling a message now (a call, a connection's
/// event, a schedule). A commit made while its actor is the only one tells storage it is
/// `alone`: holding the thread for a flush then delays no other actor's call.
#[derive(Debug, Default)]
pub(crate) struct Activity(AtomicUsize);

/// One actor's message being handled; counted in [`Activity`] until dropped.
pub(crate) struct Handling<'a>(&'a Activity);

impl Activity {
    /// Counts one more actor handling a message, until the guard drops.
    pub(crate) fn handling(&self) -> Handling<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Handling(self)
    }

    /// Whether no actor but (at most) the caller is handling a message.
    pub(crate) fn alone(&self) -> bool {
        self.0.load(Ordering::Relaxed) <= 1
    }
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The open SQL databases of live actors, by actor id.
#[derive(Default)]
pub(crate) struct OpenDbs {
    by_actor: parking_lot::Mutex<HashMap<Arc<str>, Arc<dyn ActorDb>>>,
}

impl OpenDbs {
    /// Registers an actor's newly opened database, replacing an earlier one.
    pub(crate) fn insert(&self, actor_id: Arc<str>, db: Arc<dyn ActorDb>) {
        self.by_actor.lock().insert(actor_id, db);
    }

    /// Removes the actor's database if it is the one with `token`.
    pub(crate) fn remove(&self, actor_id: &str, token: u64) {
        let mut by_actor = self.by_actor.lock();
        if by_actor.get(actor_id).is_some_and(|db| db.token() == token) {
            by_actor.remove(actor_id);
        }
    }

    /// The actor's open database, if `token` names it: statements of a discarded instance,
    /// or of no instance, are refused.
    pub(crate) fn get(&self, actor_id: &str, token: u64) -> Result<Arc<dyn ActorDb>> {
        match self.by_actor.lock().get(actor_id) {
            Some(db) if db.token() == token => Ok(db.clone()),
            _ => Err(DbError::Unavailable.with(
                "the actor's database is not open for this instance (it has stopped, or this code outlived its call)",
            )),
        }
    }
}

impl ActorEnv {
    /// The environment of a runtime built with `config`.
    #[allow(clippy::too_many_arguments)] // One constructor, called once, by the runtime.
    pub(crate) fn new(
        config: &RuntimeConfig,
        storage: Arc<dyn Storage>,
        host: Arc<dyn Host>,
        clock: Clock,
        stop: CancellationToken,
        force: CancellationToken,
        tracker: TaskTracker,
        metrics: Arc<Metrics>,
        schedules: Arc<Alarms>,
        hibernated: Arc<Hibernated>,
    ) -> ActorEnv {
        ActorEnv {
            storage,
            host,
            clock,
            limits: config.limits.clone(),
            hook_timeout: config.hook_timeout,
            dev: config.dev,
            action_timeout: config.action_timeout,
            sleep_timeout: config.sleep_timeout,
            stop,
            force,
            tracker,
            metrics,
            schedules,
            hibernated,
            databases: Arc::default(),
            activity: Activity::default(),
        }
    }
}

/// What an actor task tells the directory that started it (the runtime implements it). The
/// task calls these from its own task, never while holding a lock of its own.
pub(crate) trait Lifecycle: Send + Sync + 'static {
    /// The actor is being destroyed: requests by its key wait until `stopped` turns `true`.
    /// Called before the destroying call's reply is released.
    fn mark_dying(&self, info: &Arc<ActorInfo>, stopped: Arc<TaskSignals>);
    /// The actor's key no longer resolves to it (its row is gone, or its creation failed).
    fn forget_key(&self, info: &ActorInfo);
    /// The task tagged `generation` has stopped and flushed: drop it from the live set,
    /// unless a newer task replaced it.
    fn left(&self, id: &str, generation: u64);
}

#[cfg(test)]
mod tests {
    /// A mailbox's slots are kept while it holds messages; each must stay one pointer.
    #[test]
    fn a_mailbox_slot_is_one_pointer() {
        assert_eq!(
            std::mem::size_of::<super::Mail>(),
            std::mem::size_of::<usize>()
        );
        assert!(std::mem::size_of::<super::Command>() > 4 * std::mem::size_of::<usize>());
    }
}
