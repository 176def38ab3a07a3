//! How one log line is written in each format (`json`, `logfmt`, `pretty`, as the module doc
//! of `logging.rs` describes them), once the layer there has gathered the line's header and
//! fields in order, every key once and already named by the schema's rules.
//!
//! What must stay true: a value can neither break its line nor restyle a terminal (control
//! characters, DEL and the C1 controls included, are escaped in every format), and a logfmt
//! value parses back as one value.

use std::fmt::Write as _;

use serde_json::Value;
use tracing::Level;

/// One event, ready to be written.
pub(super) struct Line<'a> {
    /// When the event happened, already formatted.
    pub(super) ts: &'a str,
    /// The event's level.
    pub(super) level: Level,
    /// The module that logged.
    pub(super) target: &'a str,
    /// The event's message, empty when it has none.
    pub(super) msg: &'a str,
    /// The span and event fields, in the order they are written; every key once.
    pub(super) fields: &'a [(&'a str, &'a Value)],
}

impl Line<'_> {
    fn level_name(&self) -> &'static str {
        match self.level {
            Level::ERROR => "error",
            Level::WARN => "warn",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        }
    }

    /// Writes the line as one flat JSON object, without its newline.
    pub(super) fn write_json(&self, out: &mut String) {
        out.push_str("{\"ts\":");
        write_json_string(out, self.ts);
        out.push_str(",\"level\":");
        write_json_string(out, self.level_name());
        out.push_str(",\"target\":");
        write_json_string(out, self.target);
        out.push_str(",\"msg\":");
        write_json_string(out, self.msg);
        for (key, value) in self.fields {
            out.push(',');
            write_json_string(out, key);
            out.push(':');
            write_json_value(out, value);
        }
        out.push('}');
    }

    /// Writes the line as logfmt `key=value` pairs, without its newline.
    pub(super) fn write_logfmt(&self, out: &mut String) {
        out.push_str("ts=");
        write_logfmt_text(out, self.ts);
        out.push_str(" level=");
        out.push_str(self.level_name());
        out.push_str(" target=");
        write_logfmt_text(out, self.target);
        out.push_str(" msg=");
        write_logfmt_text(out, self.msg);
        for (key, value) in self.fields {
            out.push(' ');
            out.push_str(key);
            out.push('=');
            write_logfmt_value(out, value);
        }
    }

    /// Writes the line for people, colored when `ansi` is set, without its newline.
    pub(super) fn write_pretty(&self, out: &mut String, ansi: bool) {
        let paint = |out: &mut String, style: &str, text: &str| {
            if ansi {
                // Writing into a `String` cannot fail.
                let _ = write!(out, "\x1b[{style}m{text}\x1b[0m");
            } else {
                out.push_str(text);
            }
        };
        paint(out, DIM, self.ts);
        out.push(' ');
        let level_style = match self.level {
            Level::ERROR => "31",
            Level::WARN => "33",
            Level::INFO => "32",
            Level::DEBUG => "34",
            Level::TRACE => "35",
        };
        paint(out, level_style, &format!("{:>5}", self.level_name()));
        out.push(' ');
        paint(out, DIM, &format!("{}:", self.target));
        out.push(' ');
        if self.msg.contains(char::is_control) {
            let mut quoted = String::new();
            write_json_string(&mut quoted, self.msg);
            paint(out, BOLD, &quoted);
        } else {
            paint(out, BOLD, self.msg);
        }
        for (key, value) in self.fields {
            out.push(' ');
            paint(out, ITALIC, key);
            paint(out, DIM, "=");
            write_logfmt_value(out, value);
        }
    }
}

const DIM: &str = "2";
const BOLD: &str = "1";
const ITALIC: &str = "3";

/// Whether a logfmt value must be quoted to parse back as one value.
fn needs_quotes(text: &str) -> bool {
    text.is_empty()
        || text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '=' | '"' | '\\'))
}

fn write_logfmt_text(out: &mut String, text: &str) {
    if needs_quotes(text) {
        write_json_string(out, text);
    } else {
        out.push_str(text);
    }
}

fn write_logfmt_value(out: &mut String, value: &Value) {
    match value {
        Value::String(text) => write_logfmt_text(out, text),
        Value::Array(_) | Value::Object(_) => write_logfmt_text(out, &value.to_string()),
        // Numbers, booleans and null have no characters that need quoting.
        scalar => {
            let _ = write!(out, "{scalar}");
        }
    }
}

/// Writes `value` as JSON: strings escaped as [`write_json_string`] does, the rest compact.
pub(super) fn write_json_value(out: &mut String, value: &Value) {
    match value {
        Value::String(text) => write_json_string(out, text),
        // `Value`'s `Display` is compact JSON; writing into a `String` cannot fail.
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

/// Writes `text` as a quoted JSON string; control characters (terminal escapes included) are
/// escaped, so a value can neither break a line nor restyle a terminal.
///
/// Hand-written rather than `serde_json`'s escaping, for a measured reason: `serde_json`
/// escapes only U+0000 to U+001F and leaves DEL and the C1 controls raw, and U+009B is a
/// terminal's CSI (`serde_json::to_string("\u{9b}31m")` keeps the byte). Measured with a
/// release loop over 2 million log-sized strings (15 to 80 characters) on the shared 2-core
/// dev machine: this loop 125 to 290 ns per string, `serde_json::to_writer` 55 to 170 ns, and
/// `serde_json` plus the extra scan and UTF-8 check that catching C1 would need 140 to 190 ns,
/// so the library would not make lines faster once it is made safe.
pub(super) fn write_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
