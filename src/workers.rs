//! The tokio runtime the binding runs core on, sized before anything uses it.
//!
//! napi-rs would build a runtime with one worker per core. On the sequential path every
//! cross-thread wake of a task then also unparks the other, idle worker to steal it, so each
//! call pays for wakes that move no work; and the JS thread and the SQLite writer need cores
//! of their own. So the binding builds the runtime itself, with one worker fewer than the
//! machine has cores (at least one), unless `KEEL_WORKER_THREADS` says otherwise. The runtime
//! is built when the addon loads, before `setup()` runs, so the count is an environment
//! variable and not a `setup()` option; a bad value is reported by `serve` as
//! `registry.invalid_config` and the default is used meanwhile.

use std::sync::OnceLock;

/// The environment variable that sets the number of tokio workers.
pub const WORKER_THREADS_ENV: &str = "KEEL_WORKER_THREADS";

/// The most workers `KEEL_WORKER_THREADS` may ask for.
const MAX_WORKER_THREADS: usize = 256;

/// The runtime handed to napi-rs, kept to report its size.
static RUNTIME: OnceLock<tokio::runtime::Handle> = OnceLock::new();

/// Why `KEEL_WORKER_THREADS` was not used, if it was set to something that is not a count.
static REJECTED: OnceLock<String> = OnceLock::new();

/// The default: one worker fewer than the machine's cores, and at least one.
fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |cores| cores.get().saturating_sub(1))
        .max(1)
}

/// The worker count `value` (the variable's text, if set) asks for, or why it cannot be used.
pub fn workers_from(value: Option<&str>) -> Result<usize, String> {
    let Some(text) = value else {
        return Ok(default_workers());
    };
    match text.trim().parse::<usize>() {
        Ok(count) if (1..=MAX_WORKER_THREADS).contains(&count) => Ok(count),
        _ => Err(format!(
            "{WORKER_THREADS_ENV} must be a whole number from 1 to {MAX_WORKER_THREADS}, not {text:?}"
        )),
    }
}

/// Hands napi-rs the runtime it will use; called once, when the addon loads.
#[napi_derive::module_init]
fn init_runtime() {
    let value = std::env::var(WORKER_THREADS_ENV).ok();
    let workers = workers_from(value.as_deref()).unwrap_or_else(|reason| {
        // The first registry's `serve` reports it; the runtime must exist before then.
        let _ = REJECTED.set(reason);
        default_workers()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => {
            let _ = RUNTIME.set(runtime.handle().clone());
            napi::bindgen_prelude::create_custom_tokio_runtime(runtime);
        }
        // napi-rs then builds its own default runtime on first use.
        Err(err) => {
            let _ = REJECTED.set(format!("could not build the tokio runtime: {err}"));
        }
    }
}

/// How many worker threads the runtime that core runs on has (0 if napi-rs built its own).
#[napi_derive::napi]
pub fn worker_threads() -> u32 {
    RUNTIME
        .get()
        .map_or(0, |runtime| runtime.metrics().num_workers() as u32)
}

/// The error for a `KEEL_WORKER_THREADS` that could not be used, if any.
pub fn rejected() -> Option<keel_core::Error> {
    REJECTED.get().map(keel_core::Error::config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_in_range_is_taken_and_anything_else_is_refused() {
        assert_eq!(workers_from(Some("1")), Ok(1));
        assert_eq!(workers_from(Some(" 3 ")), Ok(3));
        assert_eq!(workers_from(None), Ok(default_workers()));
        assert!(default_workers() >= 1);
        for bad in ["0", "-1", "two", "", "1.5", "257"] {
            let err = workers_from(Some(bad)).unwrap_err();
            assert!(err.contains(WORKER_THREADS_ENV), "{err}");
        }
    }
}
