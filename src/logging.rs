//! The process-wide tracing subscriber, installed once however many registries exist, and the
//! lines user code logs through `c.log`.
//!
//! The line schema and the formats belong to core (`keel_core::logging`), so that any host
//! prints the same lines; this module only decides what to install and when. The first
//! registry installs: from `setup({ logging })` where given, else from `KEEL_LOG` (EnvFilter
//! syntax, default `info`, which is quiet: milestones only) and `KEEL_LOG_FORMAT` (`pretty`
//! on a terminal, `json`, or `logfmt` otherwise). A malformed environment value falls back to
//! its default with a warning; a malformed `setup()` value is an error. A later registry that
//! asks for different settings is ignored with one warning, since a process has one
//! subscriber.
//!
//! A debug build of the addon (`npm run build:debug`) says so with one warning when it
//! installs the logger, so that nothing measures or ships it by mistake.
//!
//! User lines: core remembers each live actor's current span (its `actor` span, or the
//! `action` span inside it while an action runs; see `keel_core::spans`), and a JS line is
//! logged inside the span core names, the very span a Rust line from the same place would be.

use std::sync::Arc;

use keel_core::logging::LogSettings;
use keel_core::{ActorInfo, Error};
use napi::bindgen_prelude::Env;
use napi_derive::napi;
use parking_lot::Mutex;
use tracing::level_filters::LevelFilter;
use tracing::{Level, Span};

use crate::convert::ErrorInfo;
use crate::CoreRegistry;

/// What the first registry asked for, or `None` before that.
static INSTALLED: Mutex<Option<Installed>> = Mutex::new(None);

/// The settings the first registry asked for, and whether they became the process's
/// subscriber (an embedding app may own it instead).
struct Installed {
    settings: LogSettings,
    ours: bool,
}

/// `setup({ logging })`: every field falls back to its environment variable.
#[napi(object)]
#[derive(Default, Clone)]
pub struct LoggingOptions {
    /// Filter in `EnvFilter` syntax, such as `info` or `warn,keel::js=debug`. `KEEL_LOG`,
    /// default `info`.
    pub level: Option<String>,
    /// `pretty`, `json` or `logfmt`. `KEEL_LOG_FORMAT`, default `pretty` on a terminal and
    /// `logfmt` otherwise.
    pub format: Option<String>,
}

/// Installs keel's subscriber unless this process already has one. With `options`, checks
/// them first (`registry.invalid_config` if malformed); if another registry installed
/// different settings, these are ignored with one warning.
pub fn init(options: Option<&LoggingOptions>) -> Result<(), Error> {
    let options = options.cloned().unwrap_or_default();
    let given = options.level.is_some() || options.format.is_some();
    let (settings, problems) =
        LogSettings::resolve(options.level.as_deref(), options.format.as_deref())?;
    let mut installed = INSTALLED.lock();
    match &*installed {
        None => {
            // `false` means another subscriber (an embedding app's) already owns the process:
            // it is kept.
            let ours = settings.install(problems);
            *installed = Some(Installed { settings, ours });
            if cfg!(debug_assertions) {
                // `npm run build:debug` writes the file the release build writes, so say which
                // one this process loaded: tests, examples and the bench all come through here.
                tracing::warn!(
                    rebuild = "npm run build",
                    "keel's native addon is a debug build, much slower than the release build"
                );
            }
        }
        Some(Installed {
            settings: current, ..
        }) if given && *current != settings => {
            tracing::warn!(
                installed_level = %current.directives,
                installed_format = %current.format,
                ignored_level = %settings.directives,
                ignored_format = %settings.format,
                "logging is configured once per process; ignoring different settings"
            );
        }
        Some(_) => {}
    }
    Ok(())
}

/// Installs the logger before the first registry is built; with `options` from
/// `setup({ logging })`, falling back to `KEEL_LOG` and `KEEL_LOG_FORMAT`. Returns an error
/// object for malformed options instead of throwing.
#[napi]
pub fn init_logging(options: Option<LoggingOptions>) -> Option<ErrorInfo> {
    init(options.as_ref())
        .err()
        .map(|err| ErrorInfo::from_error(&err, false))
}

/// The most verbose level a `c.log` line can be written at: 0 off, 1 error, 2 warn, 3 info,
/// 4 debug, 5 trace. JS skips calls above it without crossing into Rust; it can only change
/// when the first registry installs the logger.
///
/// With keel's own subscriber and a filter without span directives (`[...]`), a user line's
/// fate depends only on its level, so this is exact for target `keel::js`; otherwise it is
/// the most verbose level of any target, and Rust decides inside the actor's span.
#[napi]
pub fn log_max_level() -> u32 {
    let exact = INSTALLED
        .lock()
        .as_ref()
        .is_some_and(|installed| installed.ours && !installed.settings.directives.contains('['));
    if exact {
        let levels = [
            Level::TRACE,
            Level::DEBUG,
            Level::INFO,
            Level::WARN,
            Level::ERROR,
        ];
        let max = levels
            .into_iter()
            .find(|level| keel_core::logging::js_enabled(*level));
        return level_number(max);
    }
    level_number(LevelFilter::current().into_level())
}

fn level_number(level: Option<Level>) -> u32 {
    match level {
        None => 0,
        Some(Level::ERROR) => 1,
        Some(Level::WARN) => 2,
        Some(Level::INFO) => 3,
        Some(Level::DEBUG) => 4,
        Some(Level::TRACE) => 5,
    }
}

/// A `c.log` level: `error`, `warn`, `info` or `debug`.
fn parse_level(level: &str) -> Option<Level> {
    match level {
        "error" => Some(Level::ERROR),
        "warn" => Some(Level::WARN),
        "info" => Some(Level::INFO),
        "debug" => Some(Level::DEBUG),
        _ => None,
    }
}

fn throw_bad_level(env: &Env, level: &str) -> napi::Result<()> {
    let shown: String = level.chars().take(32).collect();
    env.throw_type_error(
        &format!("unknown log level {shown:?}; expected error, warn, info or debug"),
        None,
    )
}

/// Logs `msg` at `level` inside `actor` and then `call`, if the filter lets it through there.
/// Both spans are entered, outermost first, as core's instrumented tasks enter them: a filter
/// with span directives (`[actor{name=room}]=debug`) only sees spans entered on this thread.
fn emit_in(actor: &Span, call: Option<&Span>, level: Level, msg: &str, fields: Option<&str>) {
    let _actor = actor.enter();
    let _call = call.map(Span::enter);
    if keel_core::logging::js_enabled(level) {
        keel_core::logging::emit_json(level, msg, fields);
    }
}

#[napi]
impl CoreRegistry {
    /// Logs a line from an actor's user code (`c.log`) inside the actor's current span, under
    /// target `keel::js`. `fields` is a JSON object's text, written as the line's own fields.
    /// Returns `false`, logging nothing, when the actor is not live here; the caller then uses
    /// `logDetached`. Throws a `TypeError` for a level other than error, warn, info or debug.
    #[napi]
    pub fn log(
        &self,
        env: Env,
        actor_id: String,
        level: String,
        msg: String,
        fields: Option<String>,
    ) -> napi::Result<bool> {
        let Some(level) = parse_level(&level) else {
            throw_bad_level(&env, &level)?;
            return Ok(false);
        };
        let Some(spans) = self.registry.actor_spans().current(&actor_id) else {
            return Ok(false);
        };
        emit_in(
            &spans.actor,
            spans.call.as_ref(),
            level,
            &msg,
            fields.as_deref(),
        );
        Ok(true)
    }

    /// Like `log`, for an actor that is not live here (user code still running after its
    /// actor stopped): the line gets a fresh `actor` span with the same fields.
    #[napi]
    #[allow(clippy::too_many_arguments)] // Mirrors `log`, plus the identity it cannot look up.
    pub fn log_detached(
        &self,
        env: Env,
        actor_id: String,
        name: String,
        key: Vec<String>,
        level: String,
        msg: String,
        fields: Option<String>,
    ) -> napi::Result<()> {
        let Some(level) = parse_level(&level) else {
            return throw_bad_level(&env, &level);
        };
        let info = ActorInfo {
            id: Arc::from(actor_id),
            name: Arc::from(name),
            key_string: keel_core::key::encode(&key),
            key,
        };
        let span = keel_core::actor::span(&info);
        emit_in(&span, None, level, &msg, fields.as_deref());
        Ok(())
    }
}
