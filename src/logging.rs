//! The process-wide tracing subscriber, installed once however many registries exist.
//!
//! The line schema and the formats belong to core (`keel_core::logging`), so that any host
//! prints the same lines; this module only installs them from the environment: `KEEL_LOG`
//! takes EnvFilter syntax (default `info`, which is quiet: milestones only) and
//! `KEEL_LOG_FORMAT` picks `pretty` (the default on a terminal), `json`, or `logfmt` (the
//! default otherwise). A malformed value falls back to its default with a warning.

use std::sync::Once;

static INIT: Once = Once::new();

/// Installs keel's subscriber unless one is already installed.
pub fn init() {
    INIT.call_once(|| {
        // `false` means another subscriber (an embedding app's) already owns the process: it
        // is kept.
        let _installed = keel_core::logging::init_from_env();
    });
}
