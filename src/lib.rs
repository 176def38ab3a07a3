//! The N-API binding: exposes core's registry to JS and runs user code through JS.
//!
//! This crate holds no load-bearing logic. It converts options and errors, implements core's
//! `Host` trait with JS callbacks (`host.rs`), and installs the tracing subscriber once.
//!
//! # Layout
//! - `convert`: options in, errors out (the one conversion of core errors for JS).
//! - `host`: the batched JS host.
//! - `logging`: the process-wide subscriber.

mod convert;
mod host;
mod logging;

use std::sync::Arc;

use keel_core::Registry;
use napi::threadsafe_function::ThreadsafeFunction;
use napi::Status;
use napi_derive::napi;

use crate::convert::{
    ActorTypeOptions, ErrorInfo, HttpRequest, HttpResponse, Outcome, RuntimeOptions,
};
use crate::host::{Completion, DispatchFn, JsHost, SharedHost};

/// Called once with the bound address (`host:port`) when the server listens. Weak: the
/// pending `serve` promise is what keeps Node alive.
type ListeningFn = ThreadsafeFunction<String, (), String, Status, false, true>;

/// The registry as JS sees it: the state machine of core's `Registry` plus the JS host.
#[napi]
pub struct CoreRegistry {
    registry: Arc<Registry>,
    host: Arc<JsHost>,
}

#[napi]
impl CoreRegistry {
    /// Creates an idle registry whose user code runs through `dispatch`.
    #[napi(constructor)]
    pub fn new(
        #[napi(ts_arg_type = "(batch: Invocation[]) => void")] dispatch: DispatchFn,
    ) -> CoreRegistry {
        logging::init();
        let host = JsHost::new(dispatch);
        let registry = Arc::new(Registry::new(Arc::new(SharedHost(host.clone()))));
        CoreRegistry { registry, host }
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
        options
            .to_config()
            .err()
            .map(|err| ErrorInfo::from_error(&err, false))
    }

    /// Serves HTTP until shutdown; resolves after the drain completes.
    #[napi(ts_args_type = "options: RuntimeOptions, onListening: (address: string) => void")]
    pub async fn serve(&self, options: RuntimeOptions, on_listening: ListeningFn) -> Outcome {
        let dev = options.dev.unwrap_or(false);
        let config = match options.to_config() {
            Ok(config) => config,
            Err(err) => return Outcome::from_result(Err(err), dev),
        };
        let result = self
            .registry
            .serve(config, |address| {
                let address = address.to_string();
                tokio::spawn(async move {
                    if let Err(err) = on_listening.call_async_catch(address).await {
                        tracing::warn!(error = %err, "the listening callback failed");
                    }
                });
            })
            .await;
        Outcome::from_result(result, dev)
    }

    /// Handles one request in serverless mode, building the runtime on the first call. Every
    /// failure, including the registry's own (`registry.wrong_mode`, `registry.shut_down`, a
    /// failed build), comes back as a JSON error response with its mapped status.
    #[napi]
    pub async fn handle_request(
        &self,
        options: RuntimeOptions,
        request: HttpRequest,
    ) -> HttpResponse {
        let dev = options.dev.unwrap_or(false);
        let response = match options.to_config() {
            Ok(config) => match request.into_http() {
                Ok(request) => self.registry.handle(&config, request).await,
                Err(err) => Err(err),
            },
            Err(err) => Err(err),
        };
        let response = response.unwrap_or_else(|err| keel_core::http::error_response(&err, dev));
        HttpResponse::from_http(response).await
    }

    /// Shuts down and resolves once the drain is complete. Idempotent.
    #[napi]
    pub async fn shutdown(&self) {
        self.registry.shutdown().await;
    }

    /// Takes a batch of results from JS user code.
    #[napi]
    pub fn complete(&self, completions: Vec<Completion>) {
        self.host.complete(completions);
    }

    /// The registry's state: `idle`, `building_serverless`, `running_serve`,
    /// `running_serverless` or `shutting_down`.
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
