//! The N-API binding: exposes core's registry to JS and runs user code through JS.
//!
//! This crate holds no load-bearing logic. It converts options and errors, implements core's
//! `Host` trait with JS callbacks (`host.rs`), and installs the tracing subscriber once.
//!
//! # Layout
//! - `convert`: options in, errors out (the one conversion of core errors for JS).
//! - `engine`: `serve` as an envoy of a Rivet Engine (keel-envoy), and its drain.
//! - `host`: the batched JS host.
//! - `shapes`: the napi shapes of invocations and completions, and their conversion.
//! - `logging`: the process-wide subscriber, and `c.log` lines inside their actor's span.
//! - `workers`: the tokio runtime, sized by `KEEL_WORKER_THREADS`.

/// mimalloc returns freed memory to the OS promptly (glibc keeps per-thread arenas), so the
/// process shrinks again after a burst of actors goes to sleep. It is built to commit its
/// arenas' pages as it hands them out (`MI_DEFAULT_ARENA_EAGER_COMMIT=0` in
/// `.cargo/config.toml`), not a whole arena at once.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(test)]
mod allocator_tests {
    /// `mi_option_arena_eager_commit` in mimalloc.h's `mi_option_e` (the same in v2 and v3).
    const ARENA_EAGER_COMMIT: i32 = 4;

    extern "C" {
        fn mi_option_get(option: i32) -> std::ffi::c_long;
    }

    /// Fails when the build lost `.cargo/config.toml`'s CFLAGS (a CFLAGS of the caller's own
    /// replaces it): mimalloc then commits whole arenas and an idle registry is 5 MB larger.
    #[test]
    fn mimalloc_commits_arena_pages_on_demand() {
        // SAFETY: mi_option_get reads an option; any option index is valid to read.
        let eager = unsafe { mi_option_get(ARENA_EAGER_COMMIT) };
        assert_eq!(eager, 0, "mimalloc was built with eager arena commit");
    }
}

mod calls;
mod convert;
mod engine;
mod host;
mod logging;
mod shapes;
mod workers;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use keel_core::kv_key;
use keel_core::{Registry, RuntimeConfig};
use napi::bindgen_prelude::{Buffer, Either};
use napi::threadsafe_function::ThreadsafeFunction;
use napi::Status;
use napi_derive::napi;
use parking_lot::Mutex;

use crate::convert::{
    ActorTypeOptions, ErrorInfo, HttpRequest, HttpResponse, Outcome, RuntimeOptions,
};
use crate::host::{JsHost, SharedHost};
pub use crate::logging::{init_logging, log_max_level};
use crate::shapes::{kv_key_of, kv_key_to_js, kv_writes, Completion, KvWriteJs};
pub use crate::workers::worker_threads;

/// Called once with the bound address (`host:port`) when the server listens. Weak: the
/// pending `serve` promise is what keeps Node alive.
type ListeningFn = ThreadsafeFunction<String, (), String, Status, false, true>;

/// The registry as JS sees it: the state machine of core's `Registry` plus the JS host.
#[napi]
pub struct CoreRegistry {
    registry: Arc<Registry>,
    host: Arc<JsHost>,
    /// The envoy and its drain budget while running as an envoy of a Rivet Engine; the
    /// shutdown stops it first, so the engine stops the actors as going away.
    engine: engine::EngineSlot,
    /// The configuration `prepareServerless` resolved, with its dev flag; every serverless
    /// request uses it as it is.
    serverless: Mutex<Option<(Arc<RuntimeConfig>, bool)>>,
    /// How many times options were turned into a runtime configuration (resolving the host).
    option_resolutions: AtomicU32,
}

#[napi]
impl CoreRegistry {
    /// Creates an idle registry whose user code runs through `dispatch`, woken through keel's
    /// own libuv handle (or a threadsafe function with `KEEL_UV_DISPATCH=0`; see
    /// docs/configuration.md). The binding holds `dispatch` weakly: the JS registry keeps it.
    #[napi(constructor)]
    pub fn new(
        env: napi::Env,
        #[napi(ts_arg_type = "(batch: Invocation[]) => void")]
        dispatch: napi::bindgen_prelude::Function<'_>,
    ) -> napi::Result<CoreRegistry> {
        use napi::JsValue;
        // Without options this cannot fail; `setup()` calls `initLogging` with its own first.
        let _ = logging::init(None);
        // SAFETY: a constructor runs on the JS thread of `env`, and `dispatch` is its argument.
        let host = unsafe { JsHost::new(env.raw(), dispatch.raw()) }?;
        let registry = Arc::new(Registry::new(Arc::new(SharedHost(host.clone()))));
        Ok(CoreRegistry {
            registry,
            host,
            engine: Arc::default(),
            serverless: Mutex::new(None),
            option_resolutions: AtomicU32::new(0),
        })
    }

    /// How this registry wakes the JS thread: `uv` (keel's libuv handle) or `threadsafe`
    /// (Node's threadsafe function). For tests and diagnostics.
    #[napi(getter)]
    pub fn dispatch_route(&self) -> String {
        if self.host.uses_uv() {
            "uv"
        } else {
            "threadsafe"
        }
        .to_string()
    }

    /// Adds an actor type; only while idle. Returns an error object instead of throwing.
    #[napi]
    pub fn register(&self, name: String, options: ActorTypeOptions) -> Option<ErrorInfo> {
        options
            .into_actor_type(name)
            .and_then(|actor_type| self.registry.register(actor_type))
            .err()
            .map(|err| ErrorInfo::from_error(&err, false))
    }

    /// Checks options without starting anything.
    #[napi]
    pub fn validate_options(&self, options: RuntimeOptions) -> Option<ErrorInfo> {
        self.config_of(&options)
            .and_then(|_| options.engine_config())
            .err()
            .map(|err| ErrorInfo::from_error(&err, false))
    }

    /// Checks and resolves the options of serverless mode once, host name included; every
    /// `handleRequest` then uses them as they are. Returns an error object for bad options,
    /// keeping none. Calling it again replaces the options (a runtime already built keeps its
    /// own).
    #[napi]
    pub fn prepare_serverless(&self, options: RuntimeOptions) -> Option<ErrorInfo> {
        let dev = options.dev.unwrap_or(false);
        match self.config_of(&options) {
            Ok(config) => {
                *self.serverless.lock() = Some((Arc::new(config), dev));
                None
            }
            Err(err) => Some(ErrorInfo::from_error(&err, false)),
        }
    }

    /// How many times this registry turned options into a runtime configuration (checking
    /// them and resolving the host name): once per `start()` check and `serve`, once for
    /// serverless mode however many requests it handles. For tests and diagnostics.
    #[napi(getter)]
    pub fn option_resolutions(&self) -> u32 {
        self.option_resolutions.load(Ordering::Relaxed)
    }

    /// Serves HTTP until shutdown, or, with an engine endpoint, runs as an envoy of that
    /// engine (`onListening` then gets the engine's `host:port`); resolves after the drain
    /// completes.
    #[napi(ts_args_type = "options: RuntimeOptions, onListening: (address: string) => void")]
    pub async fn serve(&self, options: RuntimeOptions, on_listening: ListeningFn) -> Outcome {
        let dev = options.dev.unwrap_or(false);
        if let Some(err) = workers::rejected() {
            return Outcome::from_result(Err(err), dev);
        }
        let config = match self.config_of(&options) {
            Ok(config) => config,
            Err(err) => return Outcome::from_result(Err(err), dev),
        };
        let engine = match options.engine_config() {
            Ok(engine) => engine,
            Err(err) => return Outcome::from_result(Err(err), dev),
        };
        let announce = move |address: String| {
            tokio::spawn(async move {
                if let Err(err) = on_listening.call_async_catch(address).await {
                    tracing::warn!(error = %err, "the listening callback failed");
                }
            });
        };
        let result = match engine {
            Some(engine) => {
                engine::serve(
                    &self.registry,
                    &self.host,
                    &self.engine,
                    config,
                    engine,
                    announce,
                )
                .await
            }
            None => {
                self.registry
                    .serve(config, |address| announce(address.to_string()))
                    .await
            }
        };
        if let Err(err) = &result {
            if err.http_status() >= 500 {
                tracing::error!(group = err.group(), code = err.code(), error = %err, "the server failed to start");
            }
        }
        Outcome::from_result(result, dev)
    }

    /// Handles one request in serverless mode, building the runtime on the first call, with
    /// the options `prepareServerless` resolved. Every failure, including the registry's own
    /// (`registry.wrong_mode`, `registry.shut_down`, a failed build), comes back as a JSON error
    /// response with its mapped status; without prepared options the answer is
    /// `registry.invalid_config` with status 500.
    #[napi]
    pub async fn handle_request(&self, request: HttpRequest) -> HttpResponse {
        let prepared = self.serverless.lock().clone();
        let Some((config, dev)) = prepared else {
            // Bad options are the deployment's fault, not the caller's: a 500, as
            // `registry.handler` answers for the options it checks itself.
            let err = keel_core::Error::config("the serverless handler has no valid options");
            let mut response = keel_core::http::error_response(&err, false);
            *response.status_mut() = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
            return HttpResponse::from_http(response).await;
        };
        let response = match request.into_http() {
            Ok(request) => self.registry.handle(&config, request).await,
            Err(err) => Err(err),
        };
        let response = response.unwrap_or_else(|err| keel_core::http::error_response(&err, dev));
        HttpResponse::from_http(response).await
    }

    /// Shuts down and resolves once the drain is complete. Idempotent. In engine mode the
    /// engine is told first, and stops every actor as going away within the drain timeout.
    #[napi]
    pub async fn shutdown(&self) {
        engine::stop(&self.engine).await;
        self.registry.shutdown().await;
        // Nothing runs user code after the drain: let go of the JS thread's wake-up.
        self.host.close();
    }

    /// Runs one SQL statement on a live actor's database for the instance whose start carried
    /// `db_token`. `params` and the result are CBOR (see core's `Runtime::db_execute`).
    #[napi]
    pub async fn db_execute(
        &self,
        actor_id: String,
        db_token: i64,
        sql: String,
        params: Buffer,
    ) -> DbResult {
        let result = match self.running() {
            Ok(runtime) => {
                runtime
                    .db_execute(&actor_id, db_token as u64, sql, params.to_vec())
                    .await
            }
            Err(err) => Err(err),
        };
        match result {
            Ok(bytes) => DbResult {
                error: None,
                result: Some(Buffer::from(bytes)),
            },
            Err(err) => DbResult {
                error: Some(ErrorInfo::from_error(&err, false)),
                result: None,
            },
        }
    }

    /// Begins (`begin`), commits (`commit`) or rolls back (`rollback`) the migration
    /// transaction of a starting actor's database, around `onMigrate`.
    #[napi]
    pub async fn db_migration(&self, actor_id: String, db_token: i64, step: String) -> Outcome {
        let step = match step.as_str() {
            "begin" => keel_core::MigrationStep::Begin,
            "commit" => keel_core::MigrationStep::Commit,
            _ => keel_core::MigrationStep::Rollback,
        };
        let result = match self.running() {
            Ok(runtime) => runtime.db_migration(&actor_id, db_token as u64, step).await,
            Err(err) => Err(err),
        };
        Outcome::from_result(result, false)
    }

    /// Reads KV values of a live actor (after its own pending commits land). Keys are the
    /// user's, strings or bytes; core's codec finds them.
    #[napi]
    pub async fn kv_get(&self, actor_id: String, keys: Vec<Either<String, Buffer>>) -> KvGetResult {
        let keys: Vec<Vec<u8>> = keys
            .into_iter()
            .map(|key| kv_key::encode(&kv_key_of(key)))
            .collect();
        match self.running() {
            Ok(runtime) => match runtime.kv_get(&actor_id, keys).await {
                Ok(values) => KvGetResult {
                    error: None,
                    values: Some(values.into_iter().map(|v| v.map(Buffer::from)).collect()),
                },
                Err(err) => KvGetResult::failed(&err),
            },
            Err(err) => KvGetResult::failed(&err),
        }
    }

    /// Lists KV entries of a live actor whose keys start with `prefix` (a string prefix lists
    /// string keys, a byte prefix byte keys, none every key), in core's key order (or
    /// reverse), with `pending`, the call's own uncommitted writes, laid over what is stored.
    #[napi]
    pub async fn kv_list(
        &self,
        actor_id: String,
        prefix: Option<Either<String, Buffer>>,
        limit: u32,
        reverse: bool,
        pending: Vec<KvWriteJs>,
    ) -> KvListResult {
        let prefix = prefix.map_or_else(Vec::new, |prefix| kv_key::encode(&kv_key_of(prefix)));
        let pending = kv_writes(pending);
        let limit = limit as usize;
        let listed = match self.running() {
            Ok(runtime) => {
                runtime
                    .kv_list(&actor_id, prefix.clone(), limit + pending.len(), reverse)
                    .await
            }
            Err(err) => Err(err),
        };
        match listed {
            Ok(stored) => KvListResult {
                error: None,
                entries: Some(
                    kv_key::overlay(stored, &pending, &prefix, limit, reverse)
                        .into_iter()
                        .map(|(key, value)| KvEntry {
                            key: kv_key_to_js(&key),
                            value: value.into(),
                        })
                        .collect(),
                ),
            },
            Err(err) => KvListResult {
                error: Some(ErrorInfo::from_error(&err, false)),
                entries: None,
            },
        }
    }

    /// Lists the pending schedules of a live actor.
    #[napi]
    pub async fn schedule_list(&self, actor_id: String) -> ScheduleListResult {
        let listed = match self.running() {
            Ok(runtime) => runtime.schedules(&actor_id).await,
            Err(err) => Err(err),
        };
        match listed {
            Ok(schedules) => ScheduleListResult {
                error: None,
                schedules: Some(
                    schedules
                        .into_iter()
                        .map(|stored| ScheduleInfo {
                            id: stored.schedule.id,
                            at_ms: stored.schedule.at_ms as f64,
                            action: stored.schedule.action,
                            args: stored.schedule.args.into(),
                            attempts: stored.attempts,
                        })
                        .collect(),
                ),
            },
            Err(err) => ScheduleListResult {
                error: Some(ErrorInfo::from_error(&err, false)),
                schedules: None,
            },
        }
    }

    /// The registry's metrics as a Prometheus text page (format 0.0.4), at any time: before
    /// the runtime is built, while it serves, and during and after a shutdown.
    #[napi]
    pub fn metrics_text(&self) -> String {
        self.registry.metrics().render()
    }

    /// The runtime's clock, in epoch milliseconds: the clock schedules are stamped with and
    /// fired on. Before the runtime is built (and after shutdown), the system clock.
    #[napi]
    pub fn clock_now_ms(&self) -> f64 {
        self.registry.runtime().map_or_else(
            || keel_core::clock::Clock::new().now_ms() as f64,
            |runtime| runtime.now_ms() as f64,
        )
    }

    /// The number of live (awake) actors.
    #[napi(getter)]
    pub fn live_actors(&self) -> u32 {
        self.registry
            .runtime()
            .map_or(0, |runtime| runtime.live_actors() as u32)
    }

    /// Sends a message on a raw WebSocket; returns an error object if the socket is gone.
    #[napi]
    pub fn raw_send(&self, socket_id: String, data: Buffer, binary: bool) -> Option<ErrorInfo> {
        self.running()
            .and_then(|runtime| runtime.raw_send(&socket_id, data.to_vec(), binary))
            .err()
            .map(|err| ErrorInfo::from_error(&err, false))
    }

    /// Closes a raw WebSocket (no error if it is already gone).
    #[napi]
    pub fn raw_close(&self, socket_id: String, code: u32, reason: String) {
        if let Ok(runtime) = self.running() {
            runtime.raw_close(&socket_id, u16::try_from(code).unwrap_or(1000), &reason);
        }
    }

    /// Takes a batch of results from JS user code.
    #[napi]
    pub fn complete(&self, completions: Vec<Completion>) {
        self.host.complete(completions);
    }

    /// The registry's state: `idle`, `starting_serve`, `building_serverless`,
    /// `running_serve`, `running_serverless` or `shutting_down`.
    #[napi(getter)]
    pub fn state(&self) -> String {
        self.registry.state_name().to_string()
    }

    /// How many runtimes this registry has built.
    #[napi(getter)]
    pub fn build_count(&self) -> u32 {
        self.registry.build_count() as u32
    }
}

impl CoreRegistry {
    /// Turns options into a runtime configuration, counting it.
    fn config_of(&self, options: &RuntimeOptions) -> keel_core::Result<RuntimeConfig> {
        self.option_resolutions.fetch_add(1, Ordering::Relaxed);
        options.to_config()
    }

    fn running(&self) -> keel_core::Result<Arc<keel_core::Runtime>> {
        self.registry
            .runtime()
            .ok_or(keel_core::Error::RegistryShutDown)
    }
}

/// The KV limits core enforces on every commit (they are not configurable).
#[napi(object)]
pub struct KvLimits {
    /// Largest KV key, in bytes (string keys count their UTF-8 bytes).
    pub max_key_bytes: u32,
    /// Largest KV value once encoded, in bytes.
    pub max_value_bytes: u32,
}

/// The KV limits, from core, so the JS host's early check uses the values core enforces.
#[napi]
pub fn kv_limits() -> KvLimits {
    let limits = keel_core::Limits::default();
    KvLimits {
        max_key_bytes: limits.max_kv_key_bytes as u32,
        max_value_bytes: limits.max_kv_value_bytes as u32,
    }
}

/// One numeric option of `setup()`, as core defines it (`keel_core::options`).
#[napi(object, object_from_js = false)]
pub struct OptionSpecJs {
    /// The option's name, such as `drainTimeoutMs`.
    pub name: String,
    pub default: f64,
    pub min: f64,
    pub max: f64,
    /// The environment variable it falls back to, if any.
    pub env: Option<String>,
    /// `ms`, `bytes`, `messages` or `port`.
    pub unit: String,
    /// What it does.
    pub doc: String,
}

/// Every numeric option with its default and range, from core's one table, so that the
/// TypeScript layer checks and defaults with the values core uses.
#[napi]
pub fn option_specs() -> Vec<OptionSpecJs> {
    keel_core::options::NUMERIC_OPTIONS
        .iter()
        .map(|spec| OptionSpecJs {
            name: spec.name.to_string(),
            default: spec.default as f64,
            min: spec.min as f64,
            max: spec.max as f64,
            env: spec.env.map(str::to_string),
            unit: spec.unit.to_string(),
            doc: spec.doc.to_string(),
        })
        .collect()
}

/// The values `kvGet` read, in key order; `null` where a key is absent.
#[napi(object)]
pub struct KvGetResult {
    pub error: Option<ErrorInfo>,
    pub values: Option<Vec<Option<Buffer>>>,
}

impl KvGetResult {
    fn failed(err: &keel_core::Error) -> KvGetResult {
        KvGetResult {
            error: Some(ErrorInfo::from_error(err, false)),
            values: None,
        }
    }
}

/// One KV entry: the user's key, a string or bytes, and the value as the host encoded it.
#[napi(object, object_from_js = false)]
pub struct KvEntry {
    pub key: Either<String, Buffer>,
    pub value: Buffer,
}

/// The entries `kvList` found.
#[napi(object, object_from_js = false)]
pub struct KvListResult {
    pub error: Option<ErrorInfo>,
    pub entries: Option<Vec<KvEntry>>,
}

/// One pending schedule.
#[napi(object)]
pub struct ScheduleInfo {
    pub id: String,
    pub at_ms: f64,
    pub action: String,
    /// The arguments as a CBOR array.
    pub args: Buffer,
    /// How many runs have failed so far.
    pub attempts: u32,
}

/// The schedules `scheduleList` found.
#[napi(object)]
pub struct ScheduleListResult {
    pub error: Option<ErrorInfo>,
    pub schedules: Option<Vec<ScheduleInfo>>,
}

/// The result of one SQL statement: `result` (CBOR) or `error`.
#[napi(object, object_from_js = false)]
pub struct DbResult {
    /// The failure, if any.
    pub error: Option<ErrorInfo>,
    /// `[columns, values, changes, lastInsertRowid]` as CBOR.
    pub result: Option<Buffer>,
}
