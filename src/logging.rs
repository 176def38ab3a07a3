//! The process-wide tracing subscriber, installed once however many registries exist.
//!
//! `KEEL_LOG` takes EnvFilter syntax (default `info`, which is quiet: milestones only) and
//! `KEEL_LOG_FORMAT` picks `pretty` (the default on a terminal), `json`, or `logfmt`.

use std::io::IsTerminal;
use std::sync::Once;

use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::EnvFilter;

static INIT: Once = Once::new();

/// Installs the subscriber unless one is already installed.
pub fn init() {
    INIT.call_once(|| {
        let filter = EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
        let format = std::env::var("KEEL_LOG_FORMAT").unwrap_or_else(|_| {
            if std::io::stderr().is_terminal() {
                "pretty".to_string()
            } else {
                "logfmt".to_string()
            }
        });
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_span_events(FmtSpan::NONE);
        let result = match format.as_str() {
            "json" => builder
                .json()
                .with_current_span(false)
                .with_span_list(true)
                .try_init(),
            "pretty" => builder.with_ansi(true).try_init(),
            _ => builder.with_ansi(false).try_init(),
        };
        // Another subscriber (an embedding app's) already owns the process: keep it.
        drop(result);
    });
}
