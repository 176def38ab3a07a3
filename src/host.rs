//! Core's [`Host`] implemented by calling JS.
//!
//! Every call into user code (start, action, stop) becomes an [`Invocation`] (its shapes and
//! conversions live in `shapes.rs`). Invocations are sent to JS in batches, one
//! threadsafe-function call per batch, and JS reports results back in batches through
//! `CoreRegistry.complete`. So a burst of actions across many actors costs
//! one JS↔Rust hop each way, not one per action. A batch call returns as soon as JS has
//! started the invocations, so a slow action never holds up the others in its batch.
//!
//! One batch is in flight at a time; invocations that come meanwhile wait in the [`Outbox`]
//! and leave together, from the JS thread, when it returns. A call that finds nothing in
//! flight goes from the actor's task straight to the JS thread: no batching task sits in
//! between, so an uncontended call wakes no Rust thread on its way to JS or back from the
//! batch call.
//!
//! Batches wake the JS thread through keel's own libuv async handle ([`UvWake`]) by default.
//! Node's threadsafe function, the alternative (`KEEL_UV_DISPATCH=0`, or wherever the handle
//! cannot be opened), sends its wake while holding its queue's mutex, so the JS thread wakes,
//! blocks on that mutex, and is woken again by the unlock: about two more context switches
//! per call.
//!
//! Invocations and completions are discriminated unions (napi structured enums): each kind
//! carries exactly its fields. Besides calls, the queue carries notices (a connection opened
//! or closed on a type without the hooks that would run then), which JS takes without
//! answering; a notice waits here until the actor's next call, so it costs no trip of its own.

use std::collections::HashMap;
use std::os::raw::c_void;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use keel_core::{
    ActionCall, ActionDone, ActorInfo, ConnectRequest, Effects, Encoding, Error, Host, Payload,
    RawRequest, RawResponse, RawSocketEvent, StartRequest, StopReason,
};
use napi::bindgen_prelude::Buffer;
use napi::threadsafe_function::ThreadsafeFunctionCallMode;
use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use crate::shapes::{
    mismatched, Completion, DispatchFn, Invocation, Reply, RequestHeadJs, RestoredConnJs,
};

/// The most invocations sent to JS in one call.
const MAX_BATCH_LEN: usize = 1024;

/// Calls JS for core.
pub struct JsHost {
    /// How batches reach JS; JS answers through [`JsHost::complete`].
    route: Route,
    /// Waiting invocations by id; the entry is removed on completion or when the waiter
    /// gives up (a timeout drops it).
    pending: Mutex<HashMap<u32, oneshot::Sender<Reply>>>,
    next_id: AtomicU32,
    /// Invocations waiting for the batch in flight to return.
    outbox: Mutex<Outbox>,
    /// Connection notices not yet sent, by actor: each goes out just before the actor's next
    /// invocation, so an absent hook costs no trip to JS. Entries leave with that invocation.
    notices: Mutex<HashMap<Arc<str>, Vec<Invocation>>>,
}

/// How batches reach the JS thread.
enum Route {
    /// keel's own libuv async handle, which wakes JS without holding a lock (the default).
    Uv(UvWake),
    /// Node's threadsafe function (`KEEL_UV_DISPATCH=0`, or where the handle cannot be
    /// opened).
    Threadsafe(DispatchFn),
}

impl JsHost {
    /// A host that sends batches to the JS function `dispatch`, through keel's libuv handle
    /// unless `KEEL_UV_DISPATCH=0` (or the handle cannot be opened), else through a threadsafe
    /// function.
    ///
    /// # Safety
    /// On the JS thread of `env`, with `dispatch` a function value of that environment.
    pub unsafe fn new(
        env: napi::sys::napi_env,
        dispatch: napi::sys::napi_value,
    ) -> napi::Result<Arc<JsHost>> {
        let uv = if uv_dispatch_wanted() {
            UvWake::open(env, dispatch)
        } else {
            None
        };
        let route = match uv {
            Some(uv) => Route::Uv(uv),
            None => Route::Threadsafe(
                <DispatchFn as napi::bindgen_prelude::FromNapiValue>::from_napi_value(
                    env, dispatch,
                )?,
            ),
        };
        let host = Arc::new(JsHost {
            route,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            outbox: Mutex::new(Outbox::default()),
            notices: Mutex::new(HashMap::new()),
        });
        if let Route::Uv(uv) = &host.route {
            uv.attach(Arc::downgrade(&host));
        }
        Ok(host)
    }

    /// Whether batches go through keel's libuv handle (for diagnostics and tests).
    pub fn uses_uv(&self) -> bool {
        matches!(self.route, Route::Uv(_))
    }

    /// Lets go of the JS thread once the registry has shut down: the libuv handle is closed
    /// (on the JS thread, at its next turn) and the reference to `dispatch` deleted. Calls
    /// after that fail as calls refused during shutdown do. Idempotent.
    pub fn close(&self) {
        if let Route::Uv(uv) = &self.route {
            uv.close();
        }
    }

    /// Takes completions reported by JS and wakes their waiters.
    pub fn complete(&self, completions: Vec<Completion>) {
        let mut pending = self.pending.lock();
        for completion in completions {
            if let Some(waiter) = pending.remove(&completion.id()) {
                // The waiter may have timed out since; its result is no longer wanted.
                let _ = waiter.send(Reply::from_completion(completion));
            }
        }
    }

    /// Sends `invocations` to JS at once if no batch is in flight, or queues them for the batch
    /// that leaves when the one in flight returns. No Rust task stands in between: a lone call
    /// goes straight from the actor's task to the JS thread, and the next batch leaves from the
    /// JS thread itself (in the return callback of the one before, or in the libuv callback's
    /// loop).
    fn send(self: &Arc<Self>, invocations: impl IntoIterator<Item = Invocation>) {
        let dispatch = match &self.route {
            Route::Uv(uv) => {
                let wake = {
                    let mut outbox = self.outbox.lock();
                    outbox.queue.extend(invocations);
                    !std::mem::replace(&mut outbox.in_flight, true)
                };
                // The lock is released before the wake: the JS thread never waits for it.
                if wake && !uv.send() {
                    // The handle is closed (the registry shut down or the environment is
                    // gone): nothing will run these.
                    let refused: Vec<Invocation> = {
                        let mut outbox = self.outbox.lock();
                        outbox.in_flight = false;
                        outbox.queue.drain(..).collect()
                    };
                    let ids: Vec<u32> = refused.iter().filter_map(Invocation::id).collect();
                    self.fail(&ids, "the call never reached JS (it is shutting down)");
                }
                return;
            }
            Route::Threadsafe(dispatch) => dispatch,
        };
        let batch = {
            let mut outbox = self.outbox.lock();
            outbox.queue.extend(invocations);
            if outbox.in_flight {
                return;
            }
            outbox.next_batch()
        };
        if let Some(batch) = batch {
            self.dispatch_batch(dispatch, batch);
        }
    }

    /// Calls JS with `batch`; the batch counts as in flight until its call returns or is
    /// refused (see [`BatchInFlight`]).
    fn dispatch_batch(self: &Arc<Self>, dispatch: &DispatchFn, batch: Vec<Invocation>) {
        let in_flight = BatchInFlight {
            host: Arc::downgrade(self),
            ids: batch.iter().filter_map(Invocation::id).collect(),
            outcome: Err("the call never reached JS (it is shutting down)".into()),
        };
        // A refused call drops the callback unrun, and with it `in_flight`, which fails the
        // batch; so the status adds nothing here.
        let _ = dispatch.call_with_return_value(
            batch,
            ThreadsafeFunctionCallMode::NonBlocking,
            move |result, _env| {
                in_flight.returned(result);
                Ok(())
            },
        );
    }

    async fn invoke(
        self: &Arc<Self>,
        actor: &ActorInfo,
        id: u32,
        invocation: Invocation,
    ) -> Result<Reply, Error> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let _guard = PendingGuard { host: self, id };
        // The actor's notices first: JS learns of its connections before the call that may
        // see them. The actor's calls are serial, so nothing of its own can come between.
        let notices = self.notices.lock().remove(&actor.id);
        self.send(notices.into_iter().flatten().chain([invocation]));
        rx.await.map_err(|_| Error::ActorInternal {
            message: "the JS host dropped the invocation".into(),
        })
    }

    /// Keeps a connection notice for `actor`'s next invocation. A close whose open is still
    /// waiting cancels it: JS never needs to hear of that connection.
    fn notice(&self, actor: &ActorInfo, notice: Invocation) {
        let mut notices = self.notices.lock();
        let waiting = notices.entry(actor.id.clone()).or_default();
        if let Invocation::ConnClosed { conn_id, .. } = &notice {
            let opened = waiting.iter().position(|earlier| {
                matches!(earlier, Invocation::ConnOpened { conn_id: id, .. } if id == conn_id)
            });
            if let Some(index) = opened {
                waiting.remove(index);
                return;
            }
        }
        waiting.push(notice);
    }

    /// Fails the waiters of `ids` (those still waiting) with `reason`.
    fn fail(&self, ids: &[u32], reason: &str) {
        tracing::error!(error = %reason, invocations = ids.len(), "dispatching to JS failed");
        let mut pending = self.pending.lock();
        for id in ids {
            if let Some(waiter) = pending.remove(id) {
                // The waiter may have given up already.
                let _ = waiter.send(Reply::failed(format!("dispatching to JS failed: {reason}")));
            }
        }
    }

    /// A fresh invocation id.
    fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Removes a waiter's entry when it stops waiting, whether it got a reply or not.
struct PendingGuard<'a> {
    host: &'a JsHost,
    id: u32,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.host.pending.lock().remove(&self.id);
    }
}

/// The invocations that wait for JS while a batch is in flight. One batch at a time is in
/// JS's queue or running, so invocations that come meanwhile go together in the next one.
#[derive(Default)]
struct Outbox {
    /// Queued invocations, in the order they reach JS.
    queue: Vec<Invocation>,
    /// Whether a batch call is in flight.
    in_flight: bool,
}

impl Outbox {
    /// The next batch to send, marking it in flight; `None` (and nothing in flight) when the
    /// queue is empty.
    fn next_batch(&mut self) -> Option<Vec<Invocation>> {
        self.in_flight = !self.queue.is_empty();
        if !self.in_flight {
            return None;
        }
        let len = self.queue.len().min(MAX_BATCH_LEN);
        Some(self.queue.drain(..len).collect())
    }
}

/// A batch that JS has not returned from yet. It ends when dropped: on the JS thread when the
/// call returns, or wherever napi drops a call it refused. Then the waiters of a batch that
/// failed to run get their failure, and the next batch leaves.
struct BatchInFlight {
    host: Weak<JsHost>,
    /// The batch's calls (notices have no id and no waiter).
    ids: Vec<u32>,
    /// How the call went; a failure until JS returns.
    outcome: Result<(), String>,
}

impl BatchInFlight {
    /// JS returned from the batch, normally or by throwing.
    fn returned(mut self, result: napi::Result<()>) {
        self.outcome = result.map_err(|err| err.to_string());
    }
}

impl Drop for BatchInFlight {
    fn drop(&mut self) {
        let Some(host) = self.host.upgrade() else {
            return;
        };
        if let Err(reason) = &self.outcome {
            host.fail(&self.ids, reason);
        }
        let Route::Threadsafe(dispatch) = &host.route else {
            return;
        };
        let next = host.outbox.lock().next_batch();
        if let Some(batch) = next {
            host.dispatch_batch(dispatch, batch);
        }
    }
}

/// Whether `KEEL_UV_DISPATCH` leaves the libuv wake on: anything but `0` does.
fn uv_dispatch_wanted() -> bool {
    std::env::var("KEEL_UV_DISPATCH").map_or(true, |value| value.trim() != "0")
}

/// The few libuv functions the wake uses; Node exports them to addons.
mod uv {
    use std::os::raw::{c_int, c_void};
    extern "C" {
        pub fn uv_handle_size(kind: c_int) -> usize;
        pub fn uv_async_init(
            loop_: *mut c_void,
            handle: *mut c_void,
            cb: unsafe extern "C" fn(*mut c_void),
        ) -> c_int;
        pub fn uv_async_send(handle: *mut c_void) -> c_int;
        pub fn uv_unref(handle: *mut c_void);
        pub fn uv_close(handle: *mut c_void, cb: Option<unsafe extern "C" fn(*mut c_void)>);
    }
    pub const UV_ASYNC: c_int = 1;
}

/// Where a handle is in its life.
#[derive(Clone, Copy, PartialEq, Eq)]
enum UvState {
    /// Sends wake the JS thread.
    Open,
    /// The registry let go of it: sends are refused, and the JS thread closes it at its next
    /// turn, after running what is already queued.
    Closing,
    /// `uv_close` was called (or is about to be); the handle's memory may be gone.
    Closed,
}

/// What the sending threads and the JS thread share about one handle.
struct UvShared {
    handle: *mut c_void,
    /// Only the JS thread sets `Closed`, under the write lock and before `uv_close`, so a
    /// sender that reads `Open` or `Closing` under the read lock may still signal the handle.
    state: RwLock<UvState>,
    /// The host whose outbox the JS thread empties; weak, so a host dropped by the registry
    /// closes the handle instead of being kept by it.
    host: OnceLock<Weak<JsHost>>,
}

// The handle is only signalled (`uv_async_send` is thread-safe) off the JS thread, and only
// while `state` says it is not closed.
unsafe impl Send for UvShared {}
unsafe impl Sync for UvShared {}

/// Wakes the JS thread through a libuv async handle on Node's loop. `uv_async_send` takes no
/// lock, so the woken JS thread never blocks on the sender (Node's threadsafe functions send
/// while holding their queue's mutex, which costs a JS sleep and two preemptions of the worker
/// per call).
///
/// It never keeps Node alive and never keeps the registry's JS side alive: the handle is
/// unreferenced (the server's handles and the pending `serve` promise are what keep a
/// serving process up), and `dispatch` is held by a weak reference (the JS registry holds the
/// function; the binding only finds it). The handle is closed on the JS thread when the
/// registry shuts down ([`UvWake::close`]), when the host is dropped, or when the environment
/// is torn down (an async cleanup hook, which Node waits for), whichever comes first.
struct UvWake {
    shared: Arc<UvShared>,
}

impl UvWake {
    /// Wakes the JS thread; false once the handle is closing or closed.
    fn send(&self) -> bool {
        let state = self.shared.state.read();
        if *state != UvState::Open {
            return false;
        }
        // SAFETY: not closed (see `UvShared::state`); `uv_async_send` is thread-safe.
        unsafe { uv::uv_async_send(self.shared.handle) };
        true
    }

    /// Refuses further sends and has the JS thread close the handle at its next turn.
    fn close(&self) {
        let mut state = self.shared.state.write();
        if *state == UvState::Open {
            *state = UvState::Closing;
            // SAFETY: not closed yet, and only the JS thread closes it, under this lock.
            unsafe { uv::uv_async_send(self.shared.handle) };
        }
    }

    /// Names the host whose outbox the JS thread empties when woken.
    fn attach(&self, host: Weak<JsHost>) {
        let _ = self.shared.host.set(host);
    }

    /// Opens the handle on `env`'s loop, for batches to `func`; `None` (and the threadsafe
    /// function is used) if napi or libuv refuses.
    ///
    /// # Safety
    /// On the JS thread of `env`, with `func` a live function value of that environment.
    unsafe fn open(env: napi::sys::napi_env, func: napi::sys::napi_value) -> Option<UvWake> {
        use napi::sys;
        let mut uv_loop = std::ptr::null_mut();
        if sys::napi_get_uv_event_loop(env, &mut uv_loop) != sys::Status::napi_ok {
            return None;
        }
        let mut name = std::ptr::null_mut();
        let label = "keel.dispatch";
        if sys::napi_create_string_utf8(env, label.as_ptr().cast(), label.len() as isize, &mut name)
            != sys::Status::napi_ok
        {
            return None;
        }
        let mut async_context = std::ptr::null_mut();
        if sys::napi_async_init(env, std::ptr::null_mut(), name, &mut async_context)
            != sys::Status::napi_ok
        {
            return None;
        }
        // Weak (count 0): the JS registry holds `dispatch` for as long as it can be called.
        let mut func_ref = std::ptr::null_mut();
        if sys::napi_create_reference(env, func, 0, &mut func_ref) != sys::Status::napi_ok {
            sys::napi_async_destroy(env, async_context);
            return None;
        }
        let words = uv::uv_handle_size(uv::UV_ASYNC).div_ceil(16);
        let handle = Box::into_raw(vec![0u128; words].into_boxed_slice()) as *mut c_void;
        if uv::uv_async_init(uv_loop.cast(), handle, on_async) != 0 {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                handle as *mut u128,
                words,
            )));
            sys::napi_delete_reference(env, func_ref);
            sys::napi_async_destroy(env, async_context);
            return None;
        }
        uv::uv_unref(handle);
        let shared = Arc::new(UvShared {
            handle,
            state: RwLock::new(UvState::Open),
            host: OnceLock::new(),
        });
        let context = Box::into_raw(Box::new(UvContext {
            env,
            func: func_ref,
            async_context,
            shared: shared.clone(),
            words,
            cleanup: std::ptr::null_mut(),
        }));
        // `data` is the first field of every uv handle.
        *(handle as *mut *mut UvContext) = context;
        // A failure here leaves only the teardown without a close: the handle is unreferenced,
        // so it still never keeps Node alive.
        sys::napi_add_async_cleanup_hook(env, Some(on_cleanup), handle, &mut (*context).cleanup);
        Some(UvWake { shared })
    }
}

impl Drop for UvWake {
    fn drop(&mut self) {
        self.close();
    }
}

/// What the JS-thread callbacks need, reached through the handle's `data` field. Freed with
/// the handle, in [`on_closed`].
struct UvContext {
    env: napi::sys::napi_env,
    /// The weak reference to `dispatch`.
    func: napi::sys::napi_ref,
    /// The async resource the batches run in (as a threadsafe function's calls do).
    async_context: napi::sys::napi_async_context,
    shared: Arc<UvShared>,
    /// The handle's size in 16-byte words, to free it.
    words: usize,
    /// The environment's async cleanup hook; removed (or told it is done) when closed.
    cleanup: napi::sys::napi_async_cleanup_hook_handle,
}

/// The context of a handle.
///
/// # Safety
/// `handle` is open (not yet passed to `on_closed`) and its `data` is its context.
unsafe fn context_of<'a>(handle: *mut c_void) -> &'a UvContext {
    &*(*(handle as *mut *mut UvContext))
}

/// Runs on the JS thread when woken: sends everything queued to `dispatch`, a batch at a
/// time, through `napi_make_callback` (so microtasks run after each batch, as after a
/// threadsafe-function call), until the queue is empty; then closes the handle if the
/// registry let go of it or the host is gone.
unsafe extern "C" fn on_async(handle: *mut c_void) {
    let context = context_of(handle);
    let host = context.shared.host.get().and_then(Weak::upgrade);
    if let Some(host) = &host {
        loop {
            // Clears `in_flight` once the queue is empty, so the next send wakes JS again.
            let Some(batch) = host.outbox.lock().next_batch() else {
                break;
            };
            let ids: Vec<u32> = batch.iter().filter_map(Invocation::id).collect();
            if let Err(reason) = call_dispatch(context, batch) {
                host.fail(&ids, &reason);
            }
        }
    }
    if host.is_none() || *context.shared.state.read() == UvState::Closing {
        close_handle(handle);
    }
}

/// Calls `dispatch` with one batch on the JS thread; a throw, or a `dispatch` that is gone,
/// is the batch's failure (as a threadsafe call's throw is).
unsafe fn call_dispatch(context: &UvContext, batch: Vec<Invocation>) -> Result<(), String> {
    use napi::sys;
    let env = context.env;
    let mut scope = std::ptr::null_mut();
    if sys::napi_open_handle_scope(env, &mut scope) != sys::Status::napi_ok {
        return Err("the JS environment refused the call".into());
    }
    let outcome = (|| {
        let mut func = std::ptr::null_mut();
        sys::napi_get_reference_value(env, context.func, &mut func);
        if func.is_null() {
            return Err("the registry's JS host is gone (it was garbage collected)".to_string());
        }
        // `napi_make_callback` takes an object as the receiver; `dispatch` is an arrow
        // function, which ignores it.
        let mut recv = std::ptr::null_mut();
        sys::napi_get_global(env, &mut recv);
        let arg =
            <Vec<Invocation> as napi::bindgen_prelude::ToNapiValue>::to_napi_value(env, batch)
                .map_err(|err| err.to_string())?;
        let mut result = std::ptr::null_mut();
        let status =
            sys::napi_make_callback(env, context.async_context, recv, func, 1, &arg, &mut result);
        if status == sys::Status::napi_ok {
            return Ok(());
        }
        let mut exception = std::ptr::null_mut();
        sys::napi_get_and_clear_last_exception(env, &mut exception);
        if exception.is_null() {
            return Err(format!("the call into JS failed (napi status {status})"));
        }
        // Read without running user code (no `toString`, no getters), as napi-rs reads a
        // threadsafe call's throw.
        let thrown = napi::Error::from_unknown_without_coercion(
            napi::bindgen_prelude::Unknown::from_raw_unchecked(env, exception),
        );
        Err(thrown.reason.clone())
    })();
    sys::napi_close_handle_scope(env, scope);
    outcome
}

/// Closes the handle on the JS thread, once; sends are refused from here on.
///
/// # Safety
/// On the JS thread, with `handle` not yet freed.
unsafe fn close_handle(handle: *mut c_void) {
    {
        let mut state = context_of(handle).shared.state.write();
        if *state == UvState::Closed {
            return;
        }
        *state = UvState::Closed;
    }
    uv::uv_close(handle, Some(on_closed));
}

/// The environment is being torn down: close the handle; Node waits until [`on_closed`] says
/// it is done.
unsafe extern "C" fn on_cleanup(
    _remove: napi::sys::napi_async_cleanup_hook_handle,
    arg: *mut c_void,
) {
    close_handle(arg);
}

/// The handle is closed: drop the reference to `dispatch` and the async resource, end (or
/// remove) the cleanup hook, and free the handle and its context.
unsafe extern "C" fn on_closed(handle: *mut c_void) {
    use napi::sys;
    let context = Box::from_raw(*(handle as *mut *mut UvContext));
    sys::napi_delete_reference(context.env, context.func);
    sys::napi_async_destroy(context.env, context.async_context);
    if !context.cleanup.is_null() {
        sys::napi_remove_async_cleanup_hook(context.cleanup);
    }
    drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
        handle as *mut u128,
        context.words,
    )));
}

fn check(reply: Reply, what: &str) -> Result<Reply, Error> {
    match reply {
        Reply::Failed(info) => {
            let err = info.into_error();
            if let Error::ActorInternal { message } = &err {
                tracing::warn!(call = what, error = %message, "user code threw");
            }
            Err(err)
        }
        reply => Ok(reply),
    }
}

/// The host core holds: the JS host behind an `Arc`, which the binding keeps too.
pub struct SharedHost(pub Arc<JsHost>);

#[async_trait]
impl Host for SharedHost {
    async fn start(
        &self,
        actor: &Arc<ActorInfo>,
        request: StartRequest,
    ) -> keel_core::Result<Effects> {
        let (input_encoding, input) = match request.input {
            Some(input) => (
                Some(input.encoding.as_str().to_string()),
                Some(Buffer::from(input.bytes)),
            ),
            None => (None, None),
        };
        let id = self.0.next_id();
        let invocation = Invocation::Start {
            id,
            actor_id: actor.id.to_string(),
            actor_type: actor.name.to_string(),
            key: actor.key.clone(),
            state: request.state.map(Buffer::from),
            input,
            input_encoding,
            conns: (!request.conns.is_empty()).then(|| {
                request
                    .conns
                    .into_iter()
                    .map(|conn| RestoredConnJs {
                        conn_id: conn.conn_id,
                        encoding: conn.params.encoding.as_str().to_string(),
                        params: Buffer::from(conn.params.bytes),
                        state: conn.state.map(Buffer::from),
                    })
                    .collect()
            }),
            db_token: request.db_token.map(|token| token as i64),
        };
        check(self.0.invoke(actor, id, invocation).await?, "start")?.effects("start")
    }

    async fn action(
        &self,
        actor: &Arc<ActorInfo>,
        call: ActionCall,
    ) -> keel_core::Result<ActionDone> {
        let id = self.0.next_id();
        let invocation = Invocation::Action {
            id,
            actor_id: actor.id.to_string(),
            action: call.action,
            args: Buffer::from(call.args.bytes),
            encoding: call.args.encoding.as_str().to_string(),
            output_encoding: call.output.as_str().to_string(),
            conn_id: call.conn_id,
            request: call.request.map(RequestHeadJs::from),
            chain: call.chain,
        };
        let (output, effects) = match check(self.0.invoke(actor, id, invocation).await?, "action")?
        {
            Reply::Returned(output, effects) => (output, effects),
            _ => return Err(mismatched("action")),
        };
        let output = match call.output {
            Encoding::Json => Payload::json(String::from_utf8_lossy(&output).into_owned()),
            Encoding::Cbor => Payload::cbor(output),
        };
        Ok(ActionDone { output, effects })
    }

    async fn stop(&self, actor: &Arc<ActorInfo>, reason: StopReason) -> keel_core::Result<Effects> {
        let id = self.0.next_id();
        let invocation = Invocation::Stop {
            id,
            actor_id: actor.id.to_string(),
            reason: reason.as_str().to_string(),
        };
        check(self.0.invoke(actor, id, invocation).await?, "stop")?.effects("stop")
    }

    async fn connect(
        &self,
        actor: &Arc<ActorInfo>,
        request: ConnectRequest,
    ) -> keel_core::Result<Effects> {
        let id = self.0.next_id();
        let invocation = Invocation::Connect {
            id,
            actor_id: actor.id.to_string(),
            conn_id: request.conn_id,
            params: Buffer::from(request.params.bytes),
            encoding: request.params.encoding.as_str().to_string(),
            request: request.request.map(RequestHeadJs::from),
        };
        check(self.0.invoke(actor, id, invocation).await?, "connect")?.effects("connect")
    }

    async fn disconnect(
        &self,
        actor: &Arc<ActorInfo>,
        conn_id: &str,
    ) -> keel_core::Result<Effects> {
        let id = self.0.next_id();
        let invocation = Invocation::Disconnect {
            id,
            actor_id: actor.id.to_string(),
            conn_id: conn_id.to_string(),
        };
        check(self.0.invoke(actor, id, invocation).await?, "disconnect")?.effects("disconnect")
    }

    async fn can_subscribe(
        &self,
        actor: &Arc<ActorInfo>,
        conn_id: &str,
        event: &str,
    ) -> keel_core::Result<Effects> {
        let id = self.0.next_id();
        let invocation = Invocation::Subscribe {
            id,
            actor_id: actor.id.to_string(),
            conn_id: conn_id.to_string(),
            event: event.to_string(),
        };
        check(self.0.invoke(actor, id, invocation).await?, "subscribe")?.effects("subscribe")
    }

    fn connected(&self, actor: &Arc<ActorInfo>, request: ConnectRequest) {
        let notice = Invocation::ConnOpened {
            actor_id: actor.id.to_string(),
            conn_id: request.conn_id,
            params: Buffer::from(request.params.bytes),
            encoding: request.params.encoding.as_str().to_string(),
        };
        self.0.notice(actor, notice);
    }

    fn disconnected(&self, actor: &Arc<ActorInfo>, conn_id: &str) {
        let notice = Invocation::ConnClosed {
            actor_id: actor.id.to_string(),
            conn_id: conn_id.to_string(),
        };
        self.0.notice(actor, notice);
    }

    async fn request(
        &self,
        actor: &Arc<ActorInfo>,
        request: RawRequest,
    ) -> keel_core::Result<(RawResponse, Effects)> {
        let id = self.0.next_id();
        let invocation = Invocation::Request {
            id,
            actor_id: actor.id.to_string(),
            method: request.method,
            path: request.path,
            headers: pairs(request.headers),
            body: Buffer::from(request.body),
        };
        match check(self.0.invoke(actor, id, invocation).await?, "request")? {
            Reply::Responded(response, effects) => Ok((response, effects)),
            _ => Err(Error::ActorInternal {
                message: "onRequest returned no Response".into(),
            }),
        }
    }

    async fn raw_socket(
        &self,
        actor: &Arc<ActorInfo>,
        event: RawSocketEvent,
    ) -> keel_core::Result<Effects> {
        let id = self.0.next_id();
        let actor_id = actor.id.to_string();
        let invocation = match event {
            RawSocketEvent::Open {
                socket_id,
                path,
                headers,
            } => Invocation::WsOpen {
                id,
                actor_id,
                socket_id,
                path,
                headers: pairs(headers),
            },
            RawSocketEvent::Message {
                socket_id,
                data,
                binary,
            } => Invocation::WsMessage {
                id,
                actor_id,
                socket_id,
                data: Buffer::from(data),
                binary,
            },
            RawSocketEvent::Close {
                socket_id,
                code,
                reason,
            } => Invocation::WsClose {
                id,
                actor_id,
                socket_id,
                code: u32::from(code),
                reason,
            },
        };
        check(self.0.invoke(actor, id, invocation).await?, "websocket")?.effects("websocket")
    }
}

fn pairs(headers: Vec<(String, String)>) -> Vec<Vec<String>> {
    headers
        .into_iter()
        .map(|(name, value)| vec![name, value])
        .collect()
}
