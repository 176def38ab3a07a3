//! keel's log lines: one schema for Rust and JS, written as JSON, logfmt or for a terminal.
//!
//! Core only emits `tracing` events; this module decides what a line looks like, so that every
//! host (the N-API binding, a Rust CLI, the tests) prints the same lines. [`LogLayer`] is a
//! `tracing_subscriber` layer that writes one line per event to any `MakeWriter`; [`init`]
//! installs it as the process-wide subscriber behind an `EnvFilter`.
//!
//! This file owns the schema, the settings and their sources, [`emit`] and the layer, which
//! gathers a line's fields under the rules below; how a gathered line is written in each
//! format (quoting, escaping, colors) is `logging/format.rs`.
//!
//! # The schema
//! Every line has, in this order and in every format:
//! - `ts`: when the event happened, RFC 3339 in UTC with microseconds;
//! - `level`: `error`, `warn`, `info`, `debug` or `trace`;
//! - `target`: the module that logged (`keel::js` for lines from user code, see [`emit`]);
//! - `msg`: the event's message, empty when it has none;
//! - the fields of every enclosing span, outermost first: an actor's `actor_id`, `name` and
//!   `key`, then an action's `action`, and so on;
//! - the event's own fields.
//!
//! What must stay true:
//! - A key appears at most once per line. When a span or a Rust event repeats a field of an
//!   enclosing span, the innermost value wins and keeps the outer field's position.
//! - A field from user code ([`emit`]) never replaces one of keel's own keys: the four header
//!   keys, `message`, and every field of the enclosing spans and of the event itself (such as
//!   an actor's `actor_id`, `name` and `key`). Such a field is written as `field.<name>`
//!   instead (with one more `field.` for as long as that key is taken by keel or by another
//!   user field), in its own place among the user's fields, so `c.log.info(msg, { ...err })`
//!   cannot rename the actor on its line.
//! - Lines are flat: no nested `spans` or `fields` objects. A value can still be a JSON array or
//!   object when user code logs one.
//! - Fields named `ts`, `level`, `target` or `msg` cannot shadow the four above: they are
//!   written as `field.ts` and so on. Characters that would break a logfmt key (whitespace,
//!   `=`, `"`, control characters) become `_` in every format, so that the key set of a line is
//!   the same whatever the format.
//! - Strings stay strings and numbers and booleans stay numbers and booleans in JSON;
//!   `Display` (`%x`) and `Debug` (`?x`) values are strings.
//! - Span fields are captured when the span is created (and updated by `Span::record`), so a
//!   future instrumented with an actor's span logs that actor's identity from any thread.
//!
//! # Formats
//! - `json`: one flat JSON object per line.
//! - `logfmt`: `key=value` pairs separated by one space. A value is quoted when it is empty or
//!   holds whitespace, `=`, `"`, `\` or a control character; inside quotes, `"`, `\` and control
//!   characters are escaped as in JSON (`\"`, `\\`, `\n`, `\u001b`). Numbers and booleans are
//!   bare, arrays and objects are compact JSON.
//! - `pretty`: `ts level target: msg key=value ...` for people, values quoted as in logfmt,
//!   with colors only when [`LogLayer::with_ansi`] says so ([`init`] turns them on for a
//!   terminal unless `NO_COLOR` is set).
//!
//! # Levels
//! - `error`: work was lost or an invariant broke (a commit failed, state could not be saved).
//! - `warn`: a degradation keel handled (user code timed out or threw, a drain was forced).
//! - `info`: milestones only: listening, shutdown begun and finished. A healthy server that
//!   handles requests prints nothing more at the default `info`.
//! - `debug`: per actor and per action (actor started or stopped, an action failed).
//! - `trace`: per message (an action finished, a connection ended).
//!
//! The actor span is an `error`-level span so that it is enabled under any filter and every
//! warning names its actor; the `action` span is `debug`, so its `action` field shows only when
//! `debug` is enabled for core.
//!
//! # Lines from user code
//! A tracing callsite needs field names known at compile time, but JS fields are named at run
//! time. [`emit`] therefore logs one event with target [`JS_TARGET`] whose field
//! [`FIELDS_KEY`] (`keel.fields`) holds the user's fields as one JSON object. [`LogLayer`]
//! recognises that field on any event and writes the object's members as top-level fields, in
//! their order, each under the same rules as a Rust field: a JS line and a Rust line from the
//! same span have the same shape. Another subscriber (an embedding app's) simply sees a
//! `keel.fields` string. User lines are filtered like any other target, e.g.
//! `KEEL_LOG=info,keel::js=debug`.

use std::borrow::Cow;
use std::fmt;
use std::io::{IsTerminal, Write as _};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

use crate::error::{Error, Result};

mod format;

use format::{write_json_string, write_json_value, Line};

/// The environment variable holding the filter, in `EnvFilter` syntax.
pub const FILTER_ENV: &str = "KEEL_LOG";
/// The environment variable holding the format: `pretty`, `json` or `logfmt`.
pub const FORMAT_ENV: &str = "KEEL_LOG_FORMAT";
/// The filter used when [`FILTER_ENV`] is unset: milestones, warnings and errors.
pub const DEFAULT_FILTER: &str = "info";
/// The target of every line logged by user code through [`emit`].
pub const JS_TARGET: &str = "keel::js";
/// The event field whose JSON object [`LogLayer`] writes as top-level fields.
pub const FIELDS_KEY: &str = "keel.fields";

/// The keys every line starts with; fields of these names are written as `field.<name>`.
const HEADER_KEYS: [&str; 4] = ["ts", "level", "target", "msg"];
/// What a renamed field's key starts with.
const FIELD_PREFIX: &str = "field.";

/// How a line is written. Whatever the format, a line has the same keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// For people at a terminal.
    Pretty,
    /// One flat JSON object per line.
    Json,
    /// `key=value` pairs.
    Logfmt,
}

impl LogFormat {
    /// Parses `pretty`, `json` or `logfmt`, ignoring case and surrounding whitespace.
    pub fn parse(value: &str) -> Result<LogFormat> {
        match value.trim().to_ascii_lowercase().as_str() {
            "pretty" => Ok(LogFormat::Pretty),
            "json" => Ok(LogFormat::Json),
            "logfmt" => Ok(LogFormat::Logfmt),
            _ => Err(Error::InvalidConfig {
                message: format!("unknown log format {value:?}; expected pretty, json or logfmt"),
            }),
        }
    }

    /// `pretty` when the output is a terminal, `logfmt` otherwise.
    pub fn default_for(terminal: bool) -> LogFormat {
        if terminal {
            LogFormat::Pretty
        } else {
            LogFormat::Logfmt
        }
    }

    /// The format named by [`FORMAT_ENV`], or the default for stderr when it is unset or empty.
    pub fn from_env() -> Result<LogFormat> {
        match std::env::var(FORMAT_ENV) {
            Ok(value) if !value.trim().is_empty() => {
                LogFormat::parse(&value).map_err(|err| Error::InvalidConfig {
                    message: format!("{FORMAT_ENV}: {}", config_message(err)),
                })
            }
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::InvalidConfig {
                message: format!("{FORMAT_ENV} is not valid UTF-8"),
            }),
            _ => Ok(LogFormat::default_for(std::io::stderr().is_terminal())),
        }
    }

    /// The format's name, as [`LogFormat::parse`] accepts it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Pretty => "pretty",
            LogFormat::Json => "json",
            LogFormat::Logfmt => "logfmt",
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = Error;

    fn from_str(value: &str) -> Result<LogFormat> {
        LogFormat::parse(value)
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The message of an `InvalidConfig`, without the "invalid configuration" prefix.
fn config_message(err: Error) -> String {
    match err {
        Error::InvalidConfig { message } => message,
        other => other.to_string(),
    }
}

/// Parses a filter in `EnvFilter` syntax; an empty one means [`DEFAULT_FILTER`].
pub fn filter(directives: &str) -> Result<EnvFilter> {
    let directives = if directives.trim().is_empty() {
        DEFAULT_FILTER
    } else {
        directives
    };
    EnvFilter::builder()
        .parse(directives)
        .map_err(|err| Error::InvalidConfig {
            message: format!("malformed log filter {directives:?}: {err}"),
        })
}

/// A registry behind an `EnvFilter` of `filter_directives`, writing through `layer`: the
/// subscriber [`init`] installs, for hosts and tests that install it themselves (for example
/// with `tracing::subscriber::with_default`).
pub fn subscriber<W>(
    filter_directives: &str,
    layer: LogLayer<W>,
) -> Result<impl Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    Ok(tracing_subscriber::registry()
        .with(filter(filter_directives)?)
        .with(layer))
}

/// Installs keel's subscriber for the whole process, writing to stderr, with colors only for
/// `pretty` on a terminal without `NO_COLOR`. Returns whether it was installed: `false` when
/// another global subscriber (an embedding app's, or an earlier call's) already owns the
/// process, which is then kept. Fails only on a malformed filter.
pub fn init(filter_directives: &str, format: LogFormat) -> Result<bool> {
    let ansi = format == LogFormat::Pretty
        && std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let layer = LogLayer::new(format, std::io::stderr).with_ansi(ansi);
    let subscriber = subscriber(filter_directives, layer)?;
    Ok(tracing::subscriber::set_global_default(subscriber).is_ok())
}

/// A filter and a format: what [`init`] installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// The filter, in `EnvFilter` syntax.
    pub directives: String,
    /// The line format.
    pub format: LogFormat,
}

impl LogSettings {
    /// Settings given in code, each falling back to its environment variable (then to its
    /// default) when `None`. A malformed value given in code is an `InvalidConfig` error; a
    /// malformed environment value is replaced by its default and described in the returned
    /// problems.
    pub fn resolve(
        level: Option<&str>,
        format: Option<&str>,
    ) -> Result<(LogSettings, Vec<String>)> {
        let mut problems = Vec::new();
        let directives = match level {
            Some(level) => {
                filter(level)?;
                level.to_string()
            }
            None => match std::env::var(FILTER_ENV) {
                Ok(value) => match filter(&value) {
                    Ok(_) => value,
                    Err(err) => {
                        problems.push(format!("{FILTER_ENV}: {}", config_message(err)));
                        DEFAULT_FILTER.to_string()
                    }
                },
                Err(std::env::VarError::NotPresent) => DEFAULT_FILTER.to_string(),
                Err(std::env::VarError::NotUnicode(_)) => {
                    problems.push(format!("{FILTER_ENV} is not valid UTF-8"));
                    DEFAULT_FILTER.to_string()
                }
            },
        };
        let format = match format {
            Some(format) => LogFormat::parse(format)?,
            None => LogFormat::from_env().unwrap_or_else(|err| {
                problems.push(config_message(err));
                LogFormat::default_for(std::io::stderr().is_terminal())
            }),
        };
        Ok((LogSettings { directives, format }, problems))
    }

    /// Installs these settings with [`init`], then warns about each of `problems`. Returns
    /// whether the subscriber was installed.
    pub fn install(&self, problems: Vec<String>) -> bool {
        // The filter was checked when the settings were resolved, so only an existing
        // subscriber stops the install.
        let installed = init(&self.directives, self.format).unwrap_or(false);
        if installed {
            for problem in problems {
                tracing::warn!(error = %problem, "ignoring a malformed logging setting");
            }
        }
        installed
    }
}

/// Logs a line from user code through the current subscriber, inside the current span (the
/// caller enters the actor's span first). `fields` become top-level fields of the line, in
/// their order; see the module doc for how they travel.
pub fn emit(level: Level, msg: &str, fields: &[(String, Value)]) {
    macro_rules! emit_at {
        ($level:expr) => {
            // Serializing the fields is the costly part; skip it for a filtered-out line.
            if tracing::enabled!(target: JS_TARGET, $level) {
                let encoded = (!fields.is_empty()).then(|| encode_fields(fields));
                tracing::event!(
                    target: JS_TARGET,
                    $level,
                    { FIELDS_KEY } = encoded.as_deref(),
                    "{}",
                    msg
                );
            }
        };
    }
    match level {
        Level::ERROR => emit_at!(Level::ERROR),
        Level::WARN => emit_at!(Level::WARN),
        Level::INFO => emit_at!(Level::INFO),
        Level::DEBUG => emit_at!(Level::DEBUG),
        Level::TRACE => emit_at!(Level::TRACE),
    }
}

/// [`emit`] for fields already encoded as one JSON object, as a JS host gets them from
/// `JSON.stringify`: the text travels as it is, with no decoding and re-encoding on the way.
/// A text that is not a JSON object shows up as a plain `keel.fields` string field.
pub fn emit_json(level: Level, msg: &str, fields: Option<&str>) {
    macro_rules! emit_at {
        ($level:expr) => {
            tracing::event!(target: JS_TARGET, $level, { FIELDS_KEY } = fields, "{}", msg)
        };
    }
    match level {
        Level::ERROR => emit_at!(Level::ERROR),
        Level::WARN => emit_at!(Level::WARN),
        Level::INFO => emit_at!(Level::INFO),
        Level::DEBUG => emit_at!(Level::DEBUG),
        Level::TRACE => emit_at!(Level::TRACE),
    }
}

/// Whether a line from user code at `level` would be written, inside the current span. A
/// host checks this before it pays for encoding the line's fields.
pub fn js_enabled(level: Level) -> bool {
    match level {
        Level::ERROR => tracing::enabled!(target: JS_TARGET, Level::ERROR),
        Level::WARN => tracing::enabled!(target: JS_TARGET, Level::WARN),
        Level::INFO => tracing::enabled!(target: JS_TARGET, Level::INFO),
        Level::DEBUG => tracing::enabled!(target: JS_TARGET, Level::DEBUG),
        Level::TRACE => tracing::enabled!(target: JS_TARGET, Level::TRACE),
    }
}

/// The fields as one JSON object, members in their order.
fn encode_fields(fields: &[(String, Value)]) -> String {
    let mut out = String::from("{");
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_json_string(&mut out, key);
        out.push(':');
        write_json_value(&mut out, value);
    }
    out.push('}');
    out
}

/// Parses a JSON object into its members, keeping their order; `None` for anything else.
fn decode_fields(encoded: &str) -> Option<Vec<(String, Value)>> {
    struct Members;

    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, Value)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut members = Vec::new();
            while let Some(member) = map.next_entry()? {
                members.push(member);
            }
            Ok(members)
        }
    }

    let mut deserializer = serde_json::Deserializer::from_str(encoded);
    let members = (&mut deserializer).deserialize_map(Members).ok()?;
    deserializer.end().ok()?;
    Some(members)
}

/// The layer that writes keel's lines. It records span fields in span extensions, so it needs
/// a subscriber with span storage (`tracing_subscriber::registry()`).
pub struct LogLayer<W> {
    format: LogFormat,
    writer: W,
    ansi: bool,
}

impl<W> LogLayer<W>
where
    W: for<'w> MakeWriter<'w> + 'static,
{
    /// A layer writing `format` lines to `writer`, one `write_all` per line, without colors.
    pub fn new(format: LogFormat, writer: W) -> LogLayer<W> {
        LogLayer {
            format,
            writer,
            ansi: false,
        }
    }

    /// Whether `pretty` lines carry ANSI colors; the other formats never do.
    pub fn with_ansi(mut self, ansi: bool) -> LogLayer<W> {
        self.ansi = ansi;
        self
    }
}

/// A span's fields, captured when it was created; stored in the span's extensions.
struct SpanFields(Fields);

impl<S, W> Layer<S> for LogLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        // A second `LogLayer` on the same registry (stderr and a file, say) finds the fields
        // already captured.
        if extensions.get_mut::<SpanFields>().is_none() {
            let mut fields = Fields::default();
            attrs.record(&mut FieldVisitor::new(&mut fields));
            extensions.insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            values.record(&mut FieldVisitor::new(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let spans: Vec<_> = ctx
            .event_scope(event)
            .map(|scope| scope.from_root().collect())
            .unwrap_or_default();
        let extensions: Vec<_> = spans.iter().map(|span| span.extensions()).collect();
        let mut own = Fields::default();
        let mut user = Fields::default();
        let mut message = None;
        event.record(&mut FieldVisitor {
            fields: &mut own,
            message: Some(&mut message),
            user: Some(&mut user),
        });

        let mut fields: Vec<(&str, &Value)> = Vec::new();
        let span_fields = extensions
            .iter()
            .filter_map(|extensions| extensions.get::<SpanFields>())
            .flat_map(|SpanFields(fields)| fields.0.iter());
        for (key, value) in span_fields.chain(own.0.iter()) {
            match fields
                .iter_mut()
                .find(|(existing, _)| *existing == key.as_ref())
            {
                Some(slot) => slot.1 = value,
                None => fields.push((key.as_ref(), value)),
            }
        }
        // User fields come last and may not take a key keel already wrote. A renamed one also
        // avoids the user's other keys, so that no value is lost; among themselves the last
        // value of a key wins, as for any field.
        for i in 0..user.0.len() {
            if !is_keel_key(&user.0[i].0, &fields) {
                continue;
            }
            let mut renamed = format!("{FIELD_PREFIX}{}", user.0[i].0);
            while is_keel_key(&renamed, &fields) || user.0.iter().any(|(k, _)| *k == renamed) {
                renamed.insert_str(0, FIELD_PREFIX);
            }
            user.0[i].0 = Cow::Owned(renamed);
        }
        for (key, value) in &user.0 {
            match fields
                .iter_mut()
                .find(|(existing, _)| *existing == key.as_ref())
            {
                Some(slot) => slot.1 = value,
                None => fields.push((key.as_ref(), value)),
            }
        }

        let metadata = event.metadata();
        let mut ts = String::new();
        // Formatting the clock into a `String` cannot fail.
        let _ = SystemTime.format_time(&mut Writer::new(&mut ts));
        let line = Line {
            ts: &ts,
            level: *metadata.level(),
            target: metadata.target(),
            msg: message.as_deref().unwrap_or(""),
            fields: &fields,
        };
        let mut out = String::with_capacity(256);
        match self.format {
            LogFormat::Json => line.write_json(&mut out),
            LogFormat::Logfmt => line.write_logfmt(&mut out),
            LogFormat::Pretty => line.write_pretty(&mut out, self.ansi),
        }
        out.push('\n');
        // A log line that cannot be written has nowhere to be reported.
        let _ = self
            .writer
            .make_writer_for(metadata)
            .write_all(out.as_bytes());
    }
}

/// An ordered set of fields: setting a key that is present replaces its value in place.
#[derive(Default)]
struct Fields(Vec<(Cow<'static, str>, Value)>);

impl Fields {
    fn set(&mut self, key: Cow<'static, str>, value: Value) {
        match self.0.iter_mut().find(|(existing, _)| *existing == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }
}

/// Records tracing fields as JSON values; on events it also takes the message out and
/// flattens [`FIELDS_KEY`].
struct FieldVisitor<'a> {
    fields: &'a mut Fields,
    /// Where an event's `message` goes; `None` for spans, whose `message` is a plain field.
    message: Option<&'a mut Option<String>>,
    /// Where the members of an event's [`FIELDS_KEY`] go, kept apart so that they cannot
    /// replace keel's own fields; `None` for spans, which get them as their own fields.
    user: Option<&'a mut Fields>,
}

impl<'a> FieldVisitor<'a> {
    fn new(fields: &'a mut Fields) -> FieldVisitor<'a> {
        FieldVisitor {
            fields,
            message: None,
            user: None,
        }
    }

    fn set(&mut self, field: &Field, value: Value) {
        self.fields.set(key_name(field.name()), value);
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            if let Some(message) = self.message.as_mut() {
                **message = Some(value.to_string());
                return;
            }
        }
        if field.name() == FIELDS_KEY {
            if let Some(members) = decode_fields(value) {
                let target = match self.user.as_deref_mut() {
                    Some(user) => user,
                    None => &mut *self.fields,
                };
                for (key, value) in members {
                    target.set(Cow::Owned(key_name(&key).into_owned()), value);
                }
                return;
            }
        }
        self.set(field, Value::String(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.set(field, Value::String(value.to_string()));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field, Value::Bool(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.set(field, Value::from(value));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        let value = i64::try_from(value)
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(value.to_string()));
        self.set(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        let value = u64::try_from(value)
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(value.to_string()));
        self.set(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity; those are written as strings.
        let value = serde_json::Number::from_f64(value)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(value.to_string()));
        self.set(field, value);
    }
}

/// The key a field is written under: header names are prefixed with `field.`, and characters
/// that would break a logfmt key become `_`.
fn key_name<'a>(name: &'a str) -> Cow<'a, str> {
    let breaks_key = |c: char| c.is_whitespace() || c.is_control() || c == '=' || c == '"';
    let name: Cow<'a, str> = if name.is_empty() {
        Cow::Borrowed("_")
    } else if name.contains(breaks_key) {
        Cow::Owned(name.replace(breaks_key, "_"))
    } else {
        Cow::Borrowed(name)
    };
    if HEADER_KEYS.contains(&name.as_ref()) {
        Cow::Owned(format!("{FIELD_PREFIX}{name}"))
    } else {
        name
    }
}

/// Whether `key` is one of keel's own keys on a line whose span and event fields are
/// `fields`: a header key, `message` (the event's message, written as `msg`), or one of them.
fn is_keel_key(key: &str, fields: &[(&str, &Value)]) -> bool {
    HEADER_KEYS.contains(&key) || key == "message" || fields.iter().any(|(k, _)| *k == key)
}
