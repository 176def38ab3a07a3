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
//! With `KEEL_UV_DISPATCH=1` (experimental, off by default) batches leave the same way but
//! wake the JS thread through keel's own libuv async handle ([`UvWake`]) instead of the
//! threadsafe function: Node sends a threadsafe function's wake while holding its queue's
//! mutex, so the JS thread wakes, blocks on that mutex, and is woken again by the unlock.
//!
//! Invocations and completions are discriminated unions (napi structured enums): each kind
//! carries exactly its fields. Besides calls, the queue carries notices (a connection opened
//! or closed on a type without the hooks that would run then), which JS takes without
//! answering; a notice waits here until the actor's next call, so it costs no trip of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use keel_core::{
    ActionCall, ActionDone, ActorInfo, ConnectRequest, Effects, Encoding, Error, Host, Payload,
    RawRequest, RawResponse, RawSocketEvent, StartRequest, StopReason,
};
use napi::bindgen_prelude::Buffer;
use napi::threadsafe_function::ThreadsafeFunctionCallMode;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::shapes::{
    mismatched, Completion, DispatchFn, Invocation, Reply, RequestHeadJs, RestoredConnJs,
};

/// The most invocations sent to JS in one call.
const MAX_BATCH_LEN: usize = 1024;

/// Calls JS for core.
pub struct JsHost {
    /// Batches leave through this function; JS answers through [`JsHost::complete`].
    dispatch: DispatchFn,
    /// Opt-in (`KEEL_UV_DISPATCH=1`, experimental): batches leave through keel's own libuv
    /// async handle instead of `dispatch`, whose send wakes JS while holding Node's lock.
    uv: Option<UvWake>,
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

impl JsHost {
    /// A host that sends batches to `dispatch`.
    pub fn new(
        dispatch: DispatchFn,
        raw: Option<(napi::sys::napi_env, napi::sys::napi_value)>,
    ) -> Arc<JsHost> {
        let use_uv = std::env::var("KEEL_UV_DISPATCH").is_ok_and(|v| v == "1");
        Arc::new_cyclic(|weak: &Weak<JsHost>| JsHost {
            uv: raw
                .filter(|_| use_uv)
                .and_then(|(env, func)| unsafe { UvWake::new(env, func, weak.clone()) }),
            dispatch,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            outbox: Mutex::new(Outbox::default()),
            notices: Mutex::new(HashMap::new()),
        })
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
    /// JS thread itself, in the return callback of the one before.
    fn send(self: &Arc<Self>, invocations: impl IntoIterator<Item = Invocation>) {
        if let Some(uv) = &self.uv {
            let wake = {
                let mut outbox = self.outbox.lock();
                outbox.queue.extend(invocations);
                !std::mem::replace(&mut outbox.in_flight, true)
            };
            if wake && !uv.send() {
                // The JS environment is gone: nothing will run these.
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
        let batch = {
            let mut outbox = self.outbox.lock();
            outbox.queue.extend(invocations);
            if outbox.in_flight {
                return;
            }
            outbox.next_batch()
        };
        if let Some(batch) = batch {
            self.dispatch_batch(batch);
        }
    }

    /// Calls JS with `batch`; the batch counts as in flight until its call returns or is
    /// refused (see [`BatchInFlight`]).
    fn dispatch_batch(self: &Arc<Self>, batch: Vec<Invocation>) {
        let in_flight = BatchInFlight {
            host: Arc::downgrade(self),
            ids: batch.iter().filter_map(Invocation::id).collect(),
            outcome: Err("the call never reached JS (it is shutting down)".into()),
        };
        // A refused call drops the callback unrun, and with it `in_flight`, which fails the
        // batch; so the status adds nothing here.
        let _ = self.dispatch.call_with_return_value(
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
        let next = host.outbox.lock().next_batch();
        if let Some(batch) = next {
            host.dispatch_batch(batch);
        }
    }
}

/// The few libuv functions the opt-in wake uses; Node exports them to addons.
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

/// Wakes the JS thread through a libuv async handle: `uv_async_send` takes no lock, so the
/// woken JS thread never blocks on the sender (Node's threadsafe functions send while holding
/// their queue's mutex, which costs a JS sleep and two preemptions of the worker per call).
/// The handle is unreferenced, so it never keeps Node alive; an environment cleanup hook
/// closes it, after which sends are refused.
struct UvWake {
    handle: *mut std::os::raw::c_void,
    /// Whether the handle is still open; the cleanup hook clears it under the write lock.
    alive: Arc<parking_lot::RwLock<bool>>,
}

impl UvWake {
    /// Wakes the JS thread; false once the environment is gone.
    fn send(&self) -> bool {
        let alive = self.alive.read();
        if *alive {
            // SAFETY: the handle stays open while `alive` is set, and the read lock keeps the
            // cleanup hook from closing it meanwhile; `uv_async_send` is thread-safe.
            unsafe { uv::uv_async_send(self.handle) };
        }
        *alive
    }
}

// The handle is only sent to (uv_async_send is thread-safe) off the JS thread.
unsafe impl Send for UvWake {}
unsafe impl Sync for UvWake {}

/// What the JS-thread callback needs, reached through the handle's `data` field.
struct UvContext {
    env: napi::sys::napi_env,
    func: napi::sys::napi_ref,
    host: Weak<JsHost>,
    alive: Arc<parking_lot::RwLock<bool>>,
}

impl UvWake {
    /// Opens the handle on `env`'s loop, for batches to `func`; `None` (and the threadsafe
    /// function is used) if napi or libuv refuses.
    ///
    /// # Safety
    /// On the JS thread of `env`, with `func` a live function value of that environment.
    unsafe fn new(
        env: napi::sys::napi_env,
        func: napi::sys::napi_value,
        host: Weak<JsHost>,
    ) -> Option<UvWake> {
        use napi::sys;
        let mut func_ref = std::ptr::null_mut();
        if sys::napi_create_reference(env, func, 1, &mut func_ref) != sys::Status::napi_ok {
            return None;
        }
        let mut uv_loop = std::ptr::null_mut();
        if sys::napi_get_uv_event_loop(env, &mut uv_loop) != sys::Status::napi_ok {
            sys::napi_delete_reference(env, func_ref);
            return None;
        }
        let size = uv::uv_handle_size(uv::UV_ASYNC);
        let words = size.div_ceil(16);
        let handle =
            Box::into_raw(vec![0u128; words].into_boxed_slice()) as *mut std::os::raw::c_void;
        if uv::uv_async_init(uv_loop.cast(), handle, on_async) != 0 {
            sys::napi_delete_reference(env, func_ref);
            return None;
        }
        uv::uv_unref(handle);
        let alive = Arc::new(parking_lot::RwLock::new(true));
        let context = Box::into_raw(Box::new(UvContext {
            env,
            func: func_ref,
            host,
            alive: alive.clone(),
        }));
        // `data` is the first field of every uv handle.
        *(handle as *mut *mut UvContext) = context;
        sys::napi_add_env_cleanup_hook(env, Some(on_cleanup), handle);
        Some(UvWake { handle, alive })
    }
}

/// Closes the handle when the JS environment is torn down; later sends are refused. The
/// handle's memory and context are left allocated (once per registry, at teardown).
unsafe extern "C" fn on_cleanup(handle: *mut std::os::raw::c_void) {
    let context = &*(*(handle as *mut *mut UvContext));
    let mut alive = context.alive.write();
    *alive = false;
    uv::uv_close(handle, None);
}

/// Runs on the JS thread when woken: sends everything queued to `dispatch`, a batch at a
/// time, through `napi_make_callback` (so microtasks run after each batch, as after a
/// threadsafe-function call), until the queue is empty.
unsafe extern "C" fn on_async(handle: *mut std::os::raw::c_void) {
    use napi::sys;
    let context = &*(*(handle as *mut *mut UvContext));
    let Some(host) = context.host.upgrade() else {
        return;
    };
    let env = context.env;
    loop {
        // Clears `in_flight` once the queue is empty, so the next send wakes JS again.
        let Some(batch) = host.outbox.lock().next_batch() else {
            break;
        };
        let ids: Vec<u32> = batch.iter().filter_map(Invocation::id).collect();
        let mut scope = std::ptr::null_mut();
        sys::napi_open_handle_scope(env, &mut scope);
        let mut func = std::ptr::null_mut();
        sys::napi_get_reference_value(env, context.func, &mut func);
        let mut recv = std::ptr::null_mut();
        sys::napi_get_global(env, &mut recv);
        let outcome = match <Vec<Invocation> as napi::bindgen_prelude::ToNapiValue>::to_napi_value(
            env, batch,
        ) {
            Ok(arg) => {
                let mut result = std::ptr::null_mut();
                let status = sys::napi_make_callback(
                    env,
                    std::ptr::null_mut(),
                    recv,
                    func,
                    1,
                    &arg,
                    &mut result,
                );
                if status == sys::Status::napi_ok {
                    Ok(())
                } else {
                    let mut exception = std::ptr::null_mut();
                    sys::napi_get_and_clear_last_exception(env, &mut exception);
                    Err(format!("napi status {status}"))
                }
            }
            Err(err) => Err(err.to_string()),
        };
        sys::napi_close_handle_scope(env, scope);
        if let Err(reason) = outcome {
            host.fail(&ids, &reason);
        }
    }
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
