//! A Rust host for core's integration tests: a counter whose state is JSON, with actions that
//! record their order, fail, sleep or block on a semaphore.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{
    ActionCall, ActionDone, ActorInfo, ActorType, ActorTypes, ConnectRequest, Effects, Encoding,
    Error, Host, KvWrite, Outbound, Payload, Result, Runtime, RuntimeConfig, Schedule, ScheduleOp,
    StartRequest, StopReason, Target,
};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

/// The actions of the `counter` type.
pub const ACTIONS: &[&str] = &[
    "increment",
    "get",
    "append",
    "fail",
    "slow",
    "block",
    "seen",
    "kv_put",
    "schedule",
    "schedule_after",
    "cancel",
    "sleep",
    "destroy",
    "flaky",
    "panic",
    "broadcast",
    "kick",
    "increment_and_put",
];

/// A counter host. Every actor's live state is held here between calls, as JS would.
pub struct CounterHost {
    states: Mutex<HashMap<String, Value>>,
    /// Every action run, as `actor_id:action:args`, in the order they started.
    pub log: Mutex<Vec<String>>,
    /// `block` waits for a permit here.
    pub gate: Arc<Semaphore>,
    /// How many `block` runs are waiting at the gate; tests wait on it to know a call is
    /// running (taken off its mailbox) without sleeping.
    pub blocked: watch::Sender<usize>,
    /// How many instances were started and stopped.
    pub starts: Mutex<u32>,
    pub stops: Mutex<u32>,
    /// Every stop, as `key:reason`.
    pub stop_log: Mutex<Vec<String>>,
    /// How many more times `flaky` fails before it succeeds.
    pub flaky_failures: Mutex<u32>,
    /// Every connection call, as `connect:<conn>` or `disconnect:<conn>` for the hook calls
    /// and `connected:<conn>` or `disconnected:<conn>` for the notices of hookless types.
    pub conn_log: Mutex<Vec<String>>,
}

impl CounterHost {
    pub fn new() -> Arc<CounterHost> {
        Arc::new(CounterHost {
            states: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            gate: Arc::new(Semaphore::new(0)),
            blocked: watch::Sender::new(0),
            starts: Mutex::new(0),
            stops: Mutex::new(0),
            stop_log: Mutex::new(Vec::new()),
            flaky_failures: Mutex::new(0),
            conn_log: Mutex::new(Vec::new()),
        })
    }

    /// How many runs of `action` have started, on any actor.
    pub fn runs(&self, action: &str) -> usize {
        let needle = format!(":{action}:");
        self.log
            .lock()
            .iter()
            .filter(|line| line.contains(&needle))
            .count()
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Value) -> Value) -> ActionDone {
        let mut states = self.states.lock();
        let state = states.get_mut(id).expect("the instance was started");
        let output = f(state);
        ActionDone {
            output: Payload::json(output.to_string()),
            effects: Effects {
                state: Some(serde_json::to_vec(state).unwrap()),
                ..Effects::default()
            },
        }
    }

    fn read(&self, id: &str, field: &str) -> ActionDone {
        ActionDone {
            output: Payload::json(self.states.lock()[id][field].to_string()),
            effects: Effects::default(),
        }
    }

    fn effects(effects: Effects) -> ActionDone {
        ActionDone {
            output: Payload::json("null"),
            effects,
        }
    }
}

#[async_trait]
impl Host for CounterHost {
    async fn start(&self, actor: &Arc<ActorInfo>, request: StartRequest) -> Result<Effects> {
        *self.starts.lock() += 1;
        let (state, created) = match request.state {
            Some(bytes) => (serde_json::from_slice(&bytes).unwrap(), false),
            None => {
                let input = request
                    .input
                    .map(|input| serde_json::from_slice::<Value>(&input.bytes).unwrap());
                if input
                    .as_ref()
                    .is_some_and(|input| input["refuse"] == json!(true))
                {
                    return Err(Error::User {
                        code: "refused".into(),
                        message: "the create hook refused".into(),
                        metadata: None,
                    });
                }
                let start = input.and_then(|input| input["start"].as_i64()).unwrap_or(0);
                (json!({ "count": start, "seen": [] }), true)
            }
        };
        let bytes = serde_json::to_vec(&state).unwrap();
        self.states.lock().insert(actor.id.to_string(), state);
        Ok(Effects {
            state: created.then_some(bytes),
            ..Effects::default()
        })
    }

    async fn action(&self, actor: &Arc<ActorInfo>, call: ActionCall) -> Result<ActionDone> {
        let id = actor.id.to_string();
        self.log.lock().push(format!(
            "{}:{}:{}",
            actor.key_string,
            call.action,
            String::from_utf8_lossy(&call.args.bytes)
        ));
        let args: Vec<Value> = match call.args.encoding {
            Encoding::Json => serde_json::from_slice(&call.args.bytes).unwrap(),
            // Schedules carry CBOR; this host stores its schedule args as JSON text in a CBOR
            // text string with a one-byte length, which is all the tests need.
            Encoding::Cbor => serde_json::from_slice(&call.args.bytes[2..]).unwrap(),
        };
        let amount = args.first().and_then(Value::as_i64).unwrap_or(1);
        match call.action.as_str() {
            "increment" => Ok(self.update(&id, |s| {
                s["count"] = json!(s["count"].as_i64().unwrap() + amount);
                s["count"].clone()
            })),
            "get" => Ok(self.read(&id, "count")),
            "seen" => Ok(self.read(&id, "seen")),
            "kv_put" => Ok(Self::effects(Effects {
                kv: vec![KvWrite::Put {
                    key: args[0].as_str().unwrap().as_bytes().to_vec(),
                    value: args[1].as_str().unwrap().as_bytes().to_vec(),
                }],
                ..Effects::default()
            })),
            // args: [key, value]: counts one more and writes one entry, in one call.
            "increment_and_put" => {
                let mut done = self.update(&id, |s| {
                    s["count"] = json!(s["count"].as_i64().unwrap() + 1);
                    s["count"].clone()
                });
                done.effects.kv.push(KvWrite::Put {
                    key: args[0].as_str().unwrap().as_bytes().to_vec(),
                    value: args[1].as_str().unwrap().as_bytes().to_vec(),
                });
                Ok(done)
            }
            "schedule" => {
                // args: [id, at_ms, action, arg]
                let inner = json!([args[3].clone()]).to_string();
                assert!(inner.len() < 256, "the test host keeps schedule args short");
                let mut encoded = vec![0x78, inner.len() as u8];
                encoded.extend_from_slice(inner.as_bytes());
                Ok(Self::effects(Effects {
                    schedules: vec![ScheduleOp::Add(Schedule {
                        id: args[0].as_str().unwrap().to_string(),
                        at_ms: args[1].as_i64().unwrap(),
                        action: args[2].as_str().unwrap().to_string(),
                        args: encoded,
                    })],
                    ..Effects::default()
                }))
            }
            "schedule_after" => {
                // args: [id, delay_ms, action, arg]
                let inner = json!([args[3].clone()]).to_string();
                assert!(inner.len() < 256, "the test host keeps schedule args short");
                let mut encoded = vec![0x78, inner.len() as u8];
                encoded.extend_from_slice(inner.as_bytes());
                Ok(Self::effects(Effects {
                    schedules: vec![ScheduleOp::After {
                        id: args[0].as_str().unwrap().to_string(),
                        delay_ms: args[1].as_u64().unwrap(),
                        action: args[2].as_str().unwrap().to_string(),
                        args: encoded,
                    }],
                    ..Effects::default()
                }))
            }
            "cancel" => Ok(Self::effects(Effects {
                schedules: vec![ScheduleOp::Cancel {
                    id: args[0].as_str().unwrap().to_string(),
                }],
                ..Effects::default()
            })),
            "sleep" => Ok(Self::effects(Effects {
                sleep: true,
                ..Effects::default()
            })),
            "destroy" => Ok(Self::effects(Effects {
                destroy: true,
                ..Effects::default()
            })),
            "panic" => panic!("the host panicked on purpose"),
            // Counts, and tells every subscriber of `tick` the new count.
            "broadcast" => {
                let mut done = self.update(&id, |s| {
                    s["count"] = json!(s["count"].as_i64().unwrap() + 1);
                    s["count"].clone()
                });
                done.effects.messages.push(Outbound {
                    to: None,
                    event: "tick".into(),
                    json: Some(done.output.bytes.clone()),
                    cbor: None,
                });
                Ok(done)
            }
            // Closes the calling connection.
            "kick" => Ok(Self::effects(Effects {
                disconnects: vec![(call.conn_id.clone().unwrap(), "kicked".into())],
                ..Effects::default()
            })),
            "flaky" => {
                let mut failures = self.flaky_failures.lock();
                if *failures > 0 {
                    *failures -= 1;
                    return Err(Error::ActorInternal {
                        message: "flaky failure".into(),
                    });
                }
                drop(failures);
                Ok(self.update(&id, |s| {
                    s["seen"].as_array_mut().unwrap().push(json!("flaky"));
                    json!(null)
                }))
            }
            "append" => Ok(self.update(&id, |s| {
                s["seen"].as_array_mut().unwrap().push(json!(amount));
                json!(null)
            })),
            "fail" => Err(Error::User {
                code: "nope".into(),
                message: "this action always fails".into(),
                metadata: Some(json!({ "why": "testing" })),
            }),
            "slow" => {
                tokio::time::sleep(Duration::from_millis(amount as u64)).await;
                Ok(self.update(&id, |s| {
                    s["count"] = json!(s["count"].as_i64().unwrap() + 1);
                    s["count"].clone()
                }))
            }
            "block" => {
                self.blocked.send_modify(|waiting| *waiting += 1);
                let permit = self.gate.acquire().await.expect("the gate stays open");
                permit.forget();
                self.blocked.send_modify(|waiting| *waiting -= 1);
                Ok(self.update(&id, |s| {
                    s["count"] = json!(s["count"].as_i64().unwrap() + 1);
                    s["count"].clone()
                }))
            }
            other => panic!("unknown action {other}"),
        }
    }

    fn state_encoding(&self) -> Encoding {
        Encoding::Json
    }

    async fn connect(&self, _actor: &Arc<ActorInfo>, request: ConnectRequest) -> Result<Effects> {
        self.conn_log
            .lock()
            .push(format!("connect:{}", request.conn_id));
        Ok(Effects::default())
    }

    fn connected(&self, _actor: &Arc<ActorInfo>, request: ConnectRequest) {
        self.conn_log
            .lock()
            .push(format!("connected:{}", request.conn_id));
    }

    fn disconnected(&self, _actor: &Arc<ActorInfo>, conn_id: &str) {
        self.conn_log.lock().push(format!("disconnected:{conn_id}"));
    }

    async fn disconnect(&self, _actor: &Arc<ActorInfo>, conn_id: &str) -> Result<Effects> {
        self.conn_log.lock().push(format!("disconnect:{conn_id}"));
        Ok(Effects::default())
    }

    async fn stop(&self, actor: &Arc<ActorInfo>, reason: StopReason) -> Result<Effects> {
        *self.stops.lock() += 1;
        self.stop_log
            .lock()
            .push(format!("{}:{}", actor.key_string, reason.as_str()));
        self.states.lock().remove(&*actor.id);
        Ok(Effects::default())
    }
}

/// The counter type registered under `counter`.
pub fn types() -> Arc<ActorTypes> {
    let mut types = ActorTypes::default();
    types
        .add(ActorType {
            raw_requests: true,
            raw_sockets: true,
            ..ActorType::new("counter", ACTIONS.iter().copied())
        })
        .unwrap();
    Arc::new(types)
}

/// A config over `dir` with a free port.
pub fn config(dir: &Path) -> RuntimeConfig {
    RuntimeConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..RuntimeConfig::default()
    }
}

/// Opens a runtime over `dir`.
pub fn open(dir: &Path, host: Arc<CounterHost>) -> Runtime {
    Runtime::open(config(dir), types(), host, &CancellationToken::new()).unwrap()
}

/// A target for the counter with a one-segment key.
pub fn counter(key: &str) -> Target {
    Target::Key {
        name: "counter".into(),
        key: vec![key.to_string()],
        mode: keel_core::Resolve::GetOrCreate,
        input: None,
    }
}

/// Calls an action with JSON args and returns its JSON output.
pub async fn call(runtime: &Runtime, target: Target, action: &str, args: &str) -> Result<String> {
    let output = runtime
        .call(target, action, Payload::json(args), Encoding::Json)
        .await?;
    Ok(String::from_utf8(output.bytes).unwrap())
}

/// Reads an actor's committed count straight from the database file.
pub fn committed_count(dir: &Path, key: &str) -> Option<i64> {
    let conn = rusqlite::Connection::open(dir.join(keel_core::store::DB_FILE)).unwrap();
    let state: Option<Vec<u8>> = conn
        .query_row(
            "SELECT state FROM actors WHERE name = 'counter' AND key = ?1",
            [key],
            |row| row.get(0),
        )
        .ok()
        .flatten();
    state.map(|bytes| {
        serde_json::from_slice::<Value>(&bytes).unwrap()["count"]
            .as_i64()
            .unwrap()
    })
}

/// Waits (bounded, real time) until `condition` holds.
/// Keeps the actor `key` busy in a `block` call until the host's gate opens
/// (`host.gate.add_permits(1)`); returns once the call waits at the gate. The actor is started
/// first, so that its start's own commit is durable by then. While it waits no other actor is
/// alone, so every commit goes to the writer thread: a call can then run on top of a commit
/// still in flight, which an inline commit, applied by its actor's own task, leaves no room for.
pub async fn block_a_call(
    runtime: &Arc<Runtime>,
    host: &Arc<CounterHost>,
    key: &str,
) -> tokio::task::JoinHandle<Result<String>> {
    call(runtime, counter(key), "get", "[]").await.unwrap();
    let blocked = {
        let runtime = runtime.clone();
        let key = key.to_string();
        tokio::spawn(async move { call(&runtime, counter(&key), "block", "[]").await })
    };
    host.blocked
        .subscribe()
        .wait_for(|waiting| *waiting == 1)
        .await
        .unwrap();
    blocked
}

pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> keel_core::http::Request {
    let mut builder = axum::http::Request::builder().method(method).uri(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(axum::body::Body::from(body.to_string()))
        .unwrap()
}

/// A serverless request: status, headers and body.
pub async fn handle(
    runtime: &Runtime,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, axum::http::HeaderMap, String) {
    let response = runtime.handle(request(method, path, headers, "")).await;
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8(bytes.to_vec()).unwrap(),
    )
}
