//! The registry and its state machine: `Idle`, `BuildingServerless`, `Running`, `ShuttingDown`.
//!
//! What must stay true:
//! - The state lock is a short synchronous section; no lock is held across an `.await`.
//! - Concurrent first serverless requests cause exactly one build. A waiter subscribes to the
//!   build's outcome while it holds the lock, so a builder that settles right after the waiter
//!   lets go can never be missed.
//! - `shutdown()` trips the root token before it takes the lock, is idempotent, and every
//!   caller returns only after the drain is complete. The "stopped" latch is a `watch` value,
//!   so it resolves for callers who arrive before, during or long after the stop.
//! - A failed build returns the registry to `Idle` (definitions kept) and every waiter gets
//!   the build's own error; a shutdown during a build makes the builder drain what it built.
//! - No lock is held while storage opens (blocking I/O that may wait on SQLite's busy
//!   timeout): `serve` claims the registry (`StartingServe`), opens outside the lock, and
//!   checks the state again before it moves to `Running`.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::actor_type::{ActorType, ActorTypes};
use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::host::Host;
use crate::metrics::{Metrics, ShutdownPhase};
use crate::runtime::activation::Intents;
use crate::runtime::facade::Runtime;
use crate::runtime::ingress::{Request, Response};
use crate::spans::{ActorSpans, SpanTracking};
use crate::storage::seam::Storage;

/// How a running registry receives requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// keel owns an HTTP listener.
    Serve,
    /// A Fetch-style host hands requests over one at a time.
    Serverless,
    /// A driver (a Rivet Engine) starts and stops actors and tunnels their requests.
    Engine,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Serve => "serve",
            Mode::Serverless => "serverless",
            Mode::Engine => "engine",
        }
    }
}

/// Binds the serve-mode listener; returns it with the address it got.
fn bind(listen: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = std::net::TcpListener::bind(listen)
        .and_then(|listener| {
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .map_err(|source| Error::Bind {
            address: listen.to_string(),
            source,
        })?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::io("reading the bound address", e))?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|e| Error::io("registering the listener", e))?;
    Ok((listener, address))
}

/// The published outcome of one serverless build; `None` while it runs.
type BuildOutcome = Option<std::result::Result<(), Arc<Error>>>;

enum State {
    /// Accepts `register`; nothing is running.
    Idle,
    /// `serve` is binding its listener and opening storage, outside the lock.
    StartingServe,
    /// The first serverless request is building the runtime.
    BuildingServerless {
        /// Receives the build's outcome; waiters clone it while holding the lock.
        outcome: watch::Receiver<BuildOutcome>,
    },
    /// A runtime is serving.
    Running { mode: Mode, runtime: Arc<Runtime> },
    /// Terminal: the drain has begun (and maybe finished; see the stopped latch).
    ShuttingDown,
}

/// The user-facing registry: actor types plus the state machine around one runtime.
pub struct Registry {
    state: Mutex<State>,
    types: Mutex<ActorTypes>,
    host: Arc<dyn Host>,
    /// Each live actor's current span, kept by the host wrapper `new` puts around `host`.
    spans: Arc<ActorSpans>,
    /// Tripped first thing by `shutdown()`; the runtime's tokens are its children.
    root: CancellationToken,
    /// The stopped latch: `true` once the drain is complete. Never goes back to `false`.
    stopped: watch::Sender<bool>,
    /// Counters that outlive any one runtime (builds among them), shared with the runtime.
    metrics: Arc<Metrics>,
}

impl Registry {
    /// A new, idle registry whose user code runs on `host`.
    pub fn new(host: Arc<dyn Host>) -> Registry {
        let spans = Arc::new(ActorSpans::default());
        Registry {
            state: Mutex::new(State::Idle),
            types: Mutex::new(ActorTypes::default()),
            host: Arc::new(SpanTracking::new(host, spans.clone())),
            spans,
            root: CancellationToken::new(),
            stopped: watch::Sender::new(false),
            metrics: Arc::default(),
        }
    }

    /// Adds an actor type. Only while `Idle`.
    pub fn register(&self, actor_type: ActorType) -> Result<()> {
        let state = self.state.lock();
        if !matches!(*state, State::Idle) {
            return Err(Error::RegistryNotIdle);
        }
        self.types.lock().add(actor_type)
    }

    /// Which span each live actor's user code logs in (see `spans.rs`).
    pub fn actor_spans(&self) -> &Arc<ActorSpans> {
        &self.spans
    }

    /// The state's name, for diagnostics and tests.
    pub fn state_name(&self) -> &'static str {
        match &*self.state.lock() {
            State::Idle => "idle",
            State::StartingServe => "starting_serve",
            State::BuildingServerless { .. } => "building_serverless",
            State::Running {
                mode: Mode::Serve, ..
            } => "running_serve",
            State::Running {
                mode: Mode::Serverless,
                ..
            } => "running_serverless",
            State::Running {
                mode: Mode::Engine, ..
            } => "running_engine",
            State::ShuttingDown => "shutting_down",
        }
    }

    /// How many runtimes this registry has built (at most one per process lifetime of a
    /// successful start; failed serverless builds count too).
    pub fn build_count(&self) -> u64 {
        self.metrics.runtime_builds()
    }

    /// The registry's metrics; [`Metrics::render`] writes them as a Prometheus page at any
    /// time, during and after a shutdown included.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The running runtime, if any.
    pub fn runtime(&self) -> Option<Arc<Runtime>> {
        match &*self.state.lock() {
            State::Running { runtime, .. } => Some(runtime.clone()),
            _ => None,
        }
    }

    /// Serves HTTP on `config.listen` until shutdown; `on_listening` gets the bound address.
    /// Resolves after the drain has completed.
    pub async fn serve(
        &self,
        config: RuntimeConfig,
        on_listening: impl FnOnce(SocketAddr),
    ) -> Result<()> {
        {
            let mut state = self.state.lock();
            match &*state {
                State::Idle => {}
                State::BuildingServerless { .. } => {
                    return Err(Error::RegistryWrongMode {
                        running: Mode::Serverless.as_str(),
                        wanted: "serve",
                    })
                }
                State::Running {
                    mode: Mode::Serverless,
                    ..
                } => {
                    return Err(Error::RegistryWrongMode {
                        running: Mode::Serverless.as_str(),
                        wanted: "serve",
                    })
                }
                State::StartingServe
                | State::Running {
                    mode: Mode::Serve | Mode::Engine,
                    ..
                } => return Err(Error::RegistryAlreadyRunning),
                State::ShuttingDown => return Err(Error::RegistryShutDown),
            }
            *state = State::StartingServe;
        }
        // Binding and opening storage are blocking I/O that may wait on SQLite's busy
        // timeout: off the async workers, and with no lock held.
        let types = Arc::new(self.types.lock().clone());
        let host = self.host.clone();
        let root = self.root.clone();
        let metrics = self.metrics.clone();
        let started = tokio::task::spawn_blocking(move || {
            let (listener, address) = bind(config.listen)?;
            metrics.runtime_built();
            let runtime = Runtime::open_with(config, types, host, &root, metrics)?;
            Ok((listener, address, runtime))
        })
        .await
        .unwrap_or_else(|join| {
            Err(Error::ActorInternal {
                message: format!("starting the server panicked: {join}"),
            })
        });
        let orphan = {
            let mut state = self.state.lock();
            let starting = matches!(*state, State::StartingServe);
            match started {
                Ok((listener, address, runtime)) if starting => {
                    let runtime = Arc::new(runtime);
                    runtime.serve(listener);
                    *state = State::Running {
                        mode: Mode::Serve,
                        runtime,
                    };
                    Ok(address)
                }
                Err(err) if starting => {
                    *state = State::Idle;
                    return Err(err);
                }
                // A shutdown arrived meanwhile and is waiting on the stopped latch, which
                // this starter owns.
                started => Err(started.ok().map(|(_, _, runtime)| runtime)),
            }
        };
        let address = match orphan {
            Ok(address) => address,
            Err(orphan) => {
                if let Some(runtime) = orphan {
                    runtime.drain().await;
                }
                self.stopped.send_replace(true);
                return Err(Error::RegistryShutDown);
            }
        };
        tracing::info!(%address, "listening");
        on_listening(address);
        self.wait_stopped().await;
        Ok(())
    }

    /// Runs as a driven runtime (engine mode) over `storage` until shutdown: no listener;
    /// `on_running` gets the runtime, through which the driver starts and stops actors and
    /// tunnels their requests. Resolves after the drain has completed.
    pub async fn serve_driven(
        &self,
        config: RuntimeConfig,
        storage: Arc<dyn Storage>,
        intents: Arc<dyn Intents>,
        on_running: impl FnOnce(Arc<Runtime>),
    ) -> Result<()> {
        let runtime = {
            let mut state = self.state.lock();
            match &*state {
                State::Idle => {}
                State::BuildingServerless { .. }
                | State::Running {
                    mode: Mode::Serverless,
                    ..
                } => {
                    return Err(Error::RegistryWrongMode {
                        running: Mode::Serverless.as_str(),
                        wanted: "serve",
                    })
                }
                State::StartingServe | State::Running { .. } => {
                    return Err(Error::RegistryAlreadyRunning)
                }
                State::ShuttingDown => return Err(Error::RegistryShutDown),
            }
            let types = Arc::new(self.types.lock().clone());
            self.metrics.runtime_built();
            let runtime = Arc::new(Runtime::open_driven(
                config,
                types,
                self.host.clone(),
                &self.root,
                self.metrics.clone(),
                storage,
                intents,
            )?);
            *state = State::Running {
                mode: Mode::Engine,
                runtime: runtime.clone(),
            };
            runtime
        };
        tracing::info!("running as an engine envoy");
        on_running(runtime);
        self.wait_stopped().await;
        Ok(())
    }

    /// Handles one serverless request, building the runtime on the first call.
    pub async fn handle(&self, config: &RuntimeConfig, request: Request) -> Result<Response> {
        /// What the request does next, decided under the lock and done after it.
        enum Next {
            Handle(Arc<Runtime>),
            Build(watch::Sender<BuildOutcome>),
            Wait(watch::Receiver<BuildOutcome>),
        }
        loop {
            let next = {
                let mut state = self.state.lock();
                match &*state {
                    State::Running {
                        mode: Mode::Serverless,
                        runtime,
                    } => Next::Handle(runtime.clone()),
                    State::Running {
                        mode: mode @ (Mode::Serve | Mode::Engine),
                        ..
                    } => {
                        return Err(Error::RegistryWrongMode {
                            running: mode.as_str(),
                            wanted: "handle serverless requests",
                        })
                    }
                    State::StartingServe => {
                        return Err(Error::RegistryWrongMode {
                            running: Mode::Serve.as_str(),
                            wanted: "handle serverless requests",
                        })
                    }
                    State::ShuttingDown => return Err(Error::RegistryShutDown),
                    // Subscribing while locked: the builder publishes under this lock, so
                    // this receiver sees the outcome whenever it lands.
                    State::BuildingServerless { outcome } => Next::Wait(outcome.clone()),
                    State::Idle => {
                        let (publish, outcome) = watch::channel(None);
                        *state = State::BuildingServerless { outcome };
                        Next::Build(publish)
                    }
                }
            };
            match next {
                Next::Handle(runtime) => return Ok(runtime.handle(request).await),
                Next::Build(publish) => self.build_serverless(config.clone(), publish).await?,
                Next::Wait(mut outcome) => {
                    let settled = outcome
                        .wait_for(Option::is_some)
                        .await
                        .map_err(|_| Error::RegistryShutDown)?
                        .clone();
                    if let Some(Err(err)) = settled {
                        return Err(err.duplicate());
                    }
                    // Built: loop round to find the runtime under the lock.
                }
            }
        }
    }

    /// The builder's half of a serverless build. Publishes the outcome under the state lock.
    async fn build_serverless(
        &self,
        config: RuntimeConfig,
        publish: watch::Sender<BuildOutcome>,
    ) -> Result<()> {
        // Opening storage is blocking I/O that may wait on SQLite's busy timeout; keep it off
        // the async workers, and hold no lock meanwhile.
        let types = Arc::new(self.types.lock().clone());
        let host = self.host.clone();
        let root = self.root.clone();
        let metrics = self.metrics.clone();
        self.metrics.runtime_built();
        let built = tokio::task::spawn_blocking(move || {
            Runtime::open_with(config, types, host, &root, metrics)
        })
        .await
        .unwrap_or_else(|join| {
            Err(Error::ActorInternal {
                message: format!("the build panicked: {join}"),
            })
        });
        let orphan = {
            let mut state = self.state.lock();
            let building = matches!(*state, State::BuildingServerless { .. });
            match built {
                Ok(runtime) if building => {
                    *state = State::Running {
                        mode: Mode::Serverless,
                        runtime: Arc::new(runtime),
                    };
                    publish.send_replace(Some(Ok(())));
                    return Ok(());
                }
                Err(err) if building => {
                    *state = State::Idle;
                    publish.send_replace(Some(Err(Arc::new(err.duplicate()))));
                    return Err(err);
                }
                built => {
                    publish.send_replace(Some(Err(Arc::new(Error::RegistryShutDown))));
                    built.ok()
                }
            }
        };
        // A shutdown arrived during the build and is waiting on the stopped latch, which this
        // builder owns: drain what it built, then release the latch.
        if let Some(runtime) = orphan {
            runtime.drain().await;
        }
        self.stopped.send_replace(true);
        Err(Error::RegistryShutDown)
    }

    /// Shuts down: trips the root token, drains the runtime (bounded by its drain timeout),
    /// and resolves once the drain is complete. Idempotent; every caller waits for the same
    /// drain.
    pub async fn shutdown(&self) {
        self.root.cancel();
        self.metrics.enter_phase(ShutdownPhase::Draining);
        let previous = std::mem::replace(&mut *self.state.lock(), State::ShuttingDown);
        match previous {
            State::Idle => {
                self.metrics.enter_phase(ShutdownPhase::Stopped);
                self.stopped.send_replace(true);
            }
            State::Running { runtime, .. } => {
                tracing::info!("shutdown begun");
                runtime.drain().await;
                tracing::info!("shutdown finished");
                self.stopped.send_replace(true);
            }
            // The builder (or starter) sees `ShuttingDown` when it settles and releases the
            // latch.
            State::BuildingServerless { .. } | State::StartingServe => {}
            // Another caller is draining.
            State::ShuttingDown => {}
        }
        self.wait_stopped().await;
        self.metrics.enter_phase(ShutdownPhase::Stopped);
    }

    /// Resolves once the registry has stopped; at once if it already has.
    pub async fn wait_stopped(&self) {
        let mut stopped = self.stopped.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we borrow it.
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }
}
