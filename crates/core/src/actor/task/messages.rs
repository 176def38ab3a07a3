//! How a live actor's task handles each message: actions, schedules, connections, raw
//! requests and raw sockets. Each handler runs user code under its timeout and hands the
//! outcome to `commit`, whose release answers the caller once the effects are durable; what
//! must stay true is the task's (see `task.rs`).

use std::sync::Arc;

use tokio::sync::oneshot;
use tracing::Instrument;

use super::{log_commit_failure, ActorTask, Call};
use crate::actor::conn::{self, ConnHandle};
use crate::actor::schedules::{after_failure, offer_again_delay};
use crate::actor::{ActorEnv, Answer, Command, Reply};
use crate::error::{Error, Result};
use crate::host::{
    ActionCall, ConnectRequest, Effects, Encoding, Payload, RawRequest, RawResponse,
    RawSocketEvent, RequestHead,
};
use crate::storage::seam::StoredSchedule;
use crate::storage::seam::{ConnWrite, Settle, StoredConn};

impl ActorTask {
    /// Handles one message from the mailbox.
    pub(super) async fn handle(&mut self, command: Command) {
        match command {
            Command::Action { call, reply } => self.handle_action(call, reply).await,
            Command::Alarm { stored, firing } => {
                drop(firing);
                self.handle_alarm(stored).await
            }
            Command::Connect {
                conn,
                params,
                resume: Some(token),
                reply,
                ..
            } => self.handle_resume(conn, params, token, reply),
            Command::Connect {
                conn,
                params,
                resume: None,
                request,
                reply,
            } => self.handle_connect(conn, params, request, reply).await,
            Command::Disconnect { conn } => self.handle_disconnect(conn).await,
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
        // A hibernatable connection's record keeps what it connected with.
        let stored_params = self
            .actor_type
            .hibernatable_conns
            .then(|| params.bytes.clone());
        let request = ConnectRequest {
            conn_id: conn.id.to_string(),
            params,
            request: upgrade,
        };
        let result = if self.actor_type.hooks.on_connecting() {
            let timeout = self.env.hook_timeout;
            self.guarded(
                timeout,
                Call::Hook("connect"),
                self.env.host.connect(&self.info, request),
            )
            .await
        } else {
            // No user code to run: admit it, and let the host know without waiting.
            self.env.host.connected(&self.info, request);
            Ok(Effects::default())
        };
        match result {
            Ok(mut effects) => {
                self.ensure_outbox();
                self.conns.insert(conn.id.clone(), conn.clone());
                self.conn_list = Arc::new(self.conns.values().cloned().collect());
                // A hibernatable connection's record (with the state its connect gave it)
                // is written in the connect's own commit, so it is durable before `ready`.
                let token = stored_params.map(|params| {
                    let token = format!("{:032x}", rand::random::<u128>());
                    let at = effects
                        .conn_states
                        .iter()
                        .position(|(id, _)| **id == *conn.id);
                    let state = at.map(|at| effects.conn_states.swap_remove(at).1);
                    self.conn_writes.push(ConnWrite::Open(StoredConn {
                        id: conn.id.to_string(),
                        token: token.clone(),
                        encoding: conn.encoding,
                        params,
                        state,
                    }));
                    self.tokens.insert(conn.id.clone(), token.clone());
                    token
                });
                // The new connection hears `ready` before any event of its own connect, so
                // this release sends those events itself, after `ready`.
                let ready = conn::ready_frame(
                    conn.encoding,
                    &self.info.id,
                    &conn.id,
                    token.as_deref(),
                    false,
                );
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

    /// Resumes a hibernatable connection on a new socket (after a restart): the client
    /// presents the connection's id (the handle's) and token. No connect hook runs; the
    /// connection is in `c.conns` already, restored with the instance. An unknown id, a
    /// wrong token, or an id whose socket is still open is `connection.resume_refused`.
    fn handle_resume(
        &mut self,
        conn: ConnHandle,
        params: Payload,
        token: String,
        reply: oneshot::Sender<Result<()>>,
    ) {
        use subtle::ConstantTimeEq;
        // The stored parameters are the connection's; the ones sent again are not used.
        drop(params);
        let known = self
            .tokens
            .get(&conn.id)
            .is_some_and(|stored| bool::from(stored.as_bytes().ct_eq(token.as_bytes())));
        let in_use = matches!(self.conns.get(&conn.id), Some(open) if !open.is_closing());
        if !known || in_use {
            tracing::debug!(known, in_use, "resuming a connection refused");
            // The socket task may have ended meanwhile.
            let _ = reply.send(Err(Error::ConnResumeRefused));
            return;
        }
        self.detached.remove(&conn.id);
        self.ensure_outbox();
        self.conns.insert(conn.id.clone(), conn.clone());
        self.conn_list = Arc::new(self.conns.values().cloned().collect());
        let ready = conn::ready_frame(conn.encoding, &self.info.id, &conn.id, Some(&token), true);
        tracing::debug!("connection resumed");
        // Behind the actor's earlier commits, as any other admission.
        self.commit(
            Effects::default(),
            None,
            Box::new(move |durable| {
                if durable.is_ok() {
                    conn.push(ready);
                }
                // The socket task may have ended meanwhile.
                let _ = reply.send(durable);
            }),
        );
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
        let timeout = self.env.hook_timeout;
        let result = self
            .guarded(
                timeout,
                Call::Hook("canSubscribe"),
                self.env.host.can_subscribe(&self.info, &conn.id, &event),
            )
            .await;
        let dev = self.env.dev;
        match result {
            Ok(mut effects) => {
                let messages = std::mem::take(&mut effects.messages);
                let conns = self.conn_list.clone();
                self.commit(
                    effects,
                    None,
                    Box::new(move |durable| match durable {
                        Ok(()) => {
                            conn.subscribe([event]);
                            conn::deliver(&conns, &messages);
                        }
                        Err(err) => conn.refuse_subscription(&event, &err, dev),
                    }),
                );
            }
            Err(err) => {
                tracing::debug!(event, error = %err, "subscription refused");
                conn.refuse_subscription(&event, &err, dev);
            }
        }
    }

    async fn handle_disconnect(&mut self, conn: ConnHandle) {
        // Only this socket's connection: one resumed on a new socket under the same id stays.
        if !self
            .conns
            .get(&conn.id)
            .is_some_and(|open| open.same(&conn))
        {
            return;
        }
        self.conns.remove(&conn.id);
        self.conn_list = Arc::new(self.conns.values().cloned().collect());
        self.close_for_good(conn.id.clone()).await;
    }

    /// Restored connections whose resume window has passed close for good.
    pub(super) async fn expire_detached(&mut self) {
        let now = tokio::time::Instant::now();
        let expired: Vec<Arc<str>> = self
            .detached
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for conn_id in expired {
            self.detached.remove(&conn_id);
            tracing::debug!(conn_id = %conn_id, "restored connection not resumed in time");
            self.close_for_good(conn_id).await;
        }
    }

    /// A connection closed for good: `onDisconnect` runs, and its durable record (if it has
    /// one) is deleted in the same commit.
    async fn close_for_good(&mut self, conn_id: Arc<str>) {
        if self.tokens.remove(&conn_id).is_some() {
            self.conn_writes.push(ConnWrite::Close {
                id: conn_id.to_string(),
            });
        }
        if !self.actor_type.hooks.on_disconnect {
            // No user code to run: let the host know without waiting.
            self.env.host.disconnected(&self.info, &conn_id);
            if !self.conn_writes.is_empty() {
                self.commit(Effects::default(), None, Box::new(log_commit_failure));
            }
            return;
        }
        let timeout = self.env.hook_timeout;
        let result = self
            .guarded(
                timeout,
                Call::Hook("disconnect"),
                self.env.host.disconnect(&self.info, &conn_id),
            )
            .await;
        match result {
            Ok(effects) => self.commit(effects, None, Box::new(log_commit_failure)),
            Err(err) => {
                tracing::warn!(error = %err, "the disconnect hook failed");
                // The connection is gone all the same, and so is its record.
                if !self.conn_writes.is_empty() {
                    self.commit(Effects::default(), None, Box::new(log_commit_failure));
                }
            }
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
            .unwrap_or(self.env.action_timeout);
        let result = self
            .guarded(
                timeout,
                Call::Action("onRequest"),
                self.env.host.request(&self.info, request),
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
        let timeout = self.env.hook_timeout;
        let result = self
            .guarded(
                timeout,
                Call::Hook("websocket"),
                self.env.host.raw_socket(&self.info, event),
            )
            .await;
        self.commit_reply(result.map(|effects| ((), effects)), reply);
    }

    async fn handle_action(&mut self, call: ActionCall, reply: Reply) {
        let span = tracing::debug_span!("action", action = %call.action);
        let timeout = self
            .actor_type
            .action_timeout
            .unwrap_or(self.env.action_timeout);
        let name = call.action.clone();
        let action = self.env.host.action(&self.info, call);
        let started = std::time::Instant::now();
        let result = self
            .guarded(timeout, Call::Action(&name), action)
            .instrument(span.clone())
            .await;
        self.env.metrics.action_done(&result, started.elapsed());
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
        match self.env.storage.schedule(&schedule.id).await {
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(error = %err, schedule_id = %schedule.id, "reading a due schedule failed; offering it again later");
                offer_again(
                    &self.env,
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
                    chain: Vec::new(),
                };
                let timeout = self
                    .actor_type
                    .action_timeout
                    .unwrap_or(self.env.action_timeout);
                let started = std::time::Instant::now();
                let result = self
                    .guarded(
                        timeout,
                        Call::Action(&schedule.action),
                        self.env.host.action(&self.info, call),
                    )
                    .instrument(span.clone())
                    .await;
                self.env.metrics.action_done(&result, started.elapsed());
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
                if let Some(delay) = after_failure(attempts) {
                    tracing::debug!(error = %err, attempts, delay_ms = delay.as_millis() as u64, "schedule failed; will retry");
                    let at_ms = self.env.clock.now_ms() + delay.as_millis() as i64;
                    (Effects::default(), Settle::Retry { at_ms, attempts })
                } else {
                    tracing::warn!(error = %err, attempts, action = %schedule.action, "schedule failed; giving up");
                    (Effects::default(), Settle::Done)
                }
            }
        };
        let retry = match &settle {
            Settle::Retry { at_ms, .. } => Some((schedule.id.clone(), *at_ms)),
            Settle::Done => None,
        };
        let env = self.env.clone();
        let actor_id = self.info.id.clone();
        let id = schedule.id.clone();
        let attempts = stored.attempts;
        self.commit(
            effects,
            Some((schedule.id, settle)),
            Box::new(move |durable| match durable {
                Ok(()) => {
                    if let Some((id, at_ms)) = retry {
                        env.schedules.add(id, actor_id, at_ms);
                    }
                }
                Err(err) => {
                    // The failed commit left the schedule as it was in the database; offer it
                    // again, or it would wait for the next start-up.
                    tracing::warn!(error = %err, schedule_id = %id, "committing a schedule's run failed; offering it again later");
                    offer_again(&env, id, actor_id, attempts);
                }
            }),
        );
    }
}

/// Offers a schedule whose run left it unchanged in the database again after the delay of
/// its next retry; the attempt is not counted, since nothing of it was committed.
fn offer_again(env: &ActorEnv, id: String, actor_id: Arc<str>, attempts: u32) {
    let at_ms = env.clock.now_ms() + offer_again_delay(attempts).as_millis() as i64;
    env.schedules.add(id, actor_id, at_ms);
}
