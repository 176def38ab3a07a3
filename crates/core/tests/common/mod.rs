//! A Rust host for core's integration tests: a counter whose state is JSON, with actions that
//! record their order, fail, sleep or block on a semaphore.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{
    ActionCall, ActionDone, ActorInfo, ActorType, ActorTypes, Error, Host, Result, Runtime,
    RuntimeConfig, StartRequest, Started, StopReason, Target,
};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
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
];

/// A counter host. Every actor's live state is held here between calls, as JS would.
pub struct CounterHost {
    states: Mutex<HashMap<String, Value>>,
    /// Every action run, as `actor_id:action:args`, in the order they started.
    pub log: Mutex<Vec<String>>,
    /// `block` waits for a permit here.
    pub gate: Arc<Semaphore>,
    /// How many instances were started and stopped.
    pub starts: Mutex<u32>,
    pub stops: Mutex<u32>,
}

impl CounterHost {
    pub fn new() -> Arc<CounterHost> {
        Arc::new(CounterHost {
            states: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            gate: Arc::new(Semaphore::new(0)),
            starts: Mutex::new(0),
            stops: Mutex::new(0),
        })
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Value) -> Value) -> ActionDone {
        let mut states = self.states.lock();
        let state = states.get_mut(id).expect("the instance was started");
        let output = f(state);
        ActionDone {
            output: output.to_string(),
            state: Some(serde_json::to_vec(state).unwrap()),
        }
    }
}

#[async_trait]
impl Host for CounterHost {
    async fn start(&self, actor: &Arc<ActorInfo>, request: StartRequest) -> Result<Started> {
        *self.starts.lock() += 1;
        let (state, created) = match request.state {
            Some(bytes) => (serde_json::from_slice(&bytes).unwrap(), false),
            None => {
                let start = request
                    .input
                    .map(|input| serde_json::from_str::<Value>(&input).unwrap()["start"].clone())
                    .and_then(|v| v.as_i64())
                    .unwrap_or(0);
                (json!({ "count": start, "seen": [] }), true)
            }
        };
        let bytes = serde_json::to_vec(&state).unwrap();
        self.states.lock().insert(actor.id.to_string(), state);
        Ok(Started {
            state: created.then_some(bytes),
        })
    }

    async fn action(&self, actor: &Arc<ActorInfo>, call: ActionCall) -> Result<ActionDone> {
        let id = actor.id.to_string();
        self.log.lock().push(format!(
            "{}:{}:{}",
            actor.key_string, call.action, call.args
        ));
        let args: Vec<Value> = serde_json::from_str(&call.args).unwrap();
        let amount = args.first().and_then(Value::as_i64).unwrap_or(1);
        match call.action.as_str() {
            "increment" => Ok(self.update(&id, |s| {
                s["count"] = json!(s["count"].as_i64().unwrap() + amount);
                s["count"].clone()
            })),
            "get" => Ok(ActionDone {
                output: self.states.lock()[&id]["count"].to_string(),
                state: None,
            }),
            "seen" => Ok(ActionDone {
                output: self.states.lock()[&id]["seen"].to_string(),
                state: None,
            }),
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
                let permit = self.gate.acquire().await.expect("the gate stays open");
                permit.forget();
                Ok(self.update(&id, |s| {
                    s["count"] = json!(s["count"].as_i64().unwrap() + 1);
                    s["count"].clone()
                }))
            }
            other => panic!("unknown action {other}"),
        }
    }

    async fn stop(&self, actor: &Arc<ActorInfo>, _reason: StopReason) -> Result<Option<Vec<u8>>> {
        *self.stops.lock() += 1;
        self.states.lock().remove(&*actor.id);
        Ok(None)
    }
}

/// The counter type registered under `counter`.
pub fn types() -> Arc<ActorTypes> {
    let mut types = ActorTypes::default();
    types
        .add(ActorType::new("counter", ACTIONS.iter().copied()))
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
