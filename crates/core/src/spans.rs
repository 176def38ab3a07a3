//! Which span a live actor's user code logs in.
//!
//! A host writes a line for user code (`c.log` in JS) outside core's tasks, on its own thread,
//! so it cannot rely on `Span::current()`. Core therefore remembers, for every live actor, the
//! span its current host call runs in: the actor's `actor` span from its start call on, and
//! inside it the `action` span while an action (or a schedule's run) is in progress. A host
//! asks [`ActorSpans::current`] when it writes a line, and the line lands in the very span a
//! Rust line from the same place would.
//!
//! [`SpanTracking`] keeps the record: it wraps the host core calls and enters every start,
//! action and stop call into [`ActorSpans`], inside the span core runs the call in. What must
//! stay true: an actor is forgotten when its stop call ends, or when its start call fails (it
//! gets no stop call then), so the map holds live actors only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use tracing::Span;

use crate::error::Result;
use crate::host::{
    ActionCall, ActionDone, ActorInfo, ConnectRequest, Effects, Encoding, Host, RawRequest,
    RawResponse, RawSocketEvent, StartRequest, StopReason,
};

/// Each live actor's current span, kept by [`SpanTracking`] (see the module doc).
#[derive(Default)]
pub struct ActorSpans {
    by_actor: Mutex<HashMap<Arc<str>, Spans>>,
    next_call: AtomicU64,
}

/// One live actor's spans.
struct Spans {
    /// The actor's own span, from its start call.
    actor: Span,
    /// The span of the call in progress (an action's), and the call's number.
    call: Option<(u64, Span)>,
}

/// The spans a user line of one actor is written in, outermost first.
#[derive(Debug, Clone)]
pub struct LogSpans {
    /// The actor's `actor` span.
    pub actor: Span,
    /// The span of the action in progress, inside `actor`, if one is.
    pub call: Option<Span>,
}

/// Which host call is beginning.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostCall {
    /// Starting the instance: the current span is the actor's. Unless the call succeeds, the
    /// actor is forgotten when it ends.
    Start,
    /// An action or a schedule's run: the current span is the call's, inside the actor's.
    Action,
    /// Stopping the instance: the actor's spans are forgotten when the call ends.
    Stop,
}

impl ActorSpans {
    /// The spans a user line of `actor_id` is written in now, or `None` if the actor is not
    /// live here (its user code may still run after it stopped).
    pub fn current(&self, actor_id: &str) -> Option<LogSpans> {
        let by_actor = self.by_actor.lock();
        let spans = by_actor.get(actor_id)?;
        Some(LogSpans {
            actor: spans.actor.clone(),
            call: spans.call.as_ref().map(|(_, call)| call.clone()),
        })
    }

    /// The number of actors whose spans are kept, for tests.
    pub fn len(&self) -> usize {
        self.by_actor.lock().len()
    }

    /// Whether no actor's spans are kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remembers the current span for `actor` until the returned guard drops. Called at the
    /// start of a host call, inside the span core runs the call in.
    fn enter(&self, actor: &ActorInfo, call: HostCall) -> CallGuard<'_> {
        let current = Span::current();
        let number = self.next_call.fetch_add(1, Ordering::Relaxed);
        let mut by_actor = self.by_actor.lock();
        let spans = by_actor.entry(actor.id.clone()).or_insert_with(|| Spans {
            actor: current.clone(),
            call: None,
        });
        match call {
            HostCall::Start => spans.actor = current,
            HostCall::Action => spans.call = Some((number, current)),
            HostCall::Stop => {}
        }
        CallGuard {
            spans: self,
            actor_id: actor.id.clone(),
            call,
            number,
            started: false,
        }
    }
}

/// Ends what [`ActorSpans::enter`] began.
struct CallGuard<'a> {
    spans: &'a ActorSpans,
    actor_id: Arc<str>,
    call: HostCall,
    number: u64,
    /// A start call succeeded: keep the actor's spans until it stops.
    started: bool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let mut by_actor = self.spans.by_actor.lock();
        match self.call {
            HostCall::Stop => {
                by_actor.remove(&self.actor_id);
            }
            // An instance that failed to start (or timed out starting) gets no stop call.
            HostCall::Start if !self.started => {
                by_actor.remove(&self.actor_id);
            }
            HostCall::Action => {
                if let Some(spans) = by_actor.get_mut(&self.actor_id) {
                    // A later call (after a timeout) may own the slot by now.
                    if spans.call.as_ref().is_some_and(|(n, _)| *n == self.number) {
                        spans.call = None;
                    }
                }
            }
            HostCall::Start => {}
        }
    }
}

/// A host wrapped so that its start, action and stop calls keep [`ActorSpans`] up to date.
/// The registry wraps the host it is given in one of these.
pub struct SpanTracking {
    inner: Arc<dyn Host>,
    spans: Arc<ActorSpans>,
}

impl SpanTracking {
    /// Wraps `inner`, keeping spans in `spans`.
    pub fn new(inner: Arc<dyn Host>, spans: Arc<ActorSpans>) -> SpanTracking {
        SpanTracking { inner, spans }
    }
}

#[async_trait]
impl Host for SpanTracking {
    async fn start(&self, actor: &Arc<ActorInfo>, request: StartRequest) -> Result<Effects> {
        let mut guard = self.spans.enter(actor, HostCall::Start);
        let result = self.inner.start(actor, request).await;
        guard.started = result.is_ok();
        result
    }

    async fn action(&self, actor: &Arc<ActorInfo>, call: ActionCall) -> Result<ActionDone> {
        let _guard = self.spans.enter(actor, HostCall::Action);
        self.inner.action(actor, call).await
    }

    async fn stop(&self, actor: &Arc<ActorInfo>, reason: StopReason) -> Result<Effects> {
        let _guard = self.spans.enter(actor, HostCall::Stop);
        self.inner.stop(actor, reason).await
    }

    async fn connect(&self, actor: &Arc<ActorInfo>, request: ConnectRequest) -> Result<Effects> {
        self.inner.connect(actor, request).await
    }

    async fn disconnect(&self, actor: &Arc<ActorInfo>, conn_id: &str) -> Result<Effects> {
        self.inner.disconnect(actor, conn_id).await
    }

    async fn can_subscribe(
        &self,
        actor: &Arc<ActorInfo>,
        conn_id: &str,
        event: &str,
    ) -> Result<Effects> {
        self.inner.can_subscribe(actor, conn_id, event).await
    }

    fn connected(&self, actor: &Arc<ActorInfo>, request: ConnectRequest) {
        self.inner.connected(actor, request);
    }

    fn disconnected(&self, actor: &Arc<ActorInfo>, conn_id: &str) {
        self.inner.disconnected(actor, conn_id);
    }

    async fn request(
        &self,
        actor: &Arc<ActorInfo>,
        request: RawRequest,
    ) -> Result<(RawResponse, Effects)> {
        self.inner.request(actor, request).await
    }

    async fn raw_socket(&self, actor: &Arc<ActorInfo>, event: RawSocketEvent) -> Result<Effects> {
        self.inner.raw_socket(actor, event).await
    }

    fn state_encoding(&self) -> Encoding {
        self.inner.state_encoding()
    }
}
