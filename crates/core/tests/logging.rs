//! keel's log lines through a real subscriber into memory: the flat schema, span fields from
//! instrumented tasks, filtering, logfmt quoting, lines from user code, and a quiet runtime at
//! the default level.

mod common;

use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;

use keel_core::logging::{self, LogFormat, LogLayer};
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use tracing::{debug, debug_span, error_span, info, warn, Instrument, Level};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Everything written to it, kept in memory.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().clone()).unwrap()
    }

    /// The lines written so far, each checked to end with exactly one newline.
    fn lines(&self) -> Vec<String> {
        let text = self.text();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "a partial line: {text:?}"
        );
        text.lines().map(str::to_string).collect()
    }

    fn json_lines(&self) -> Vec<Map<String, Value>> {
        self.lines()
            .iter()
            .map(|line| match serde_json::from_str(line) {
                Ok(Value::Object(object)) => object,
                other => panic!("not a JSON object: {line:?} ({other:?})"),
            })
            .collect()
    }
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for CaptureWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = CaptureWriter;

    fn make_writer(&'a self) -> CaptureWriter {
        CaptureWriter(self.0.clone())
    }
}

/// keel's subscriber, as `init` builds it, writing `format` lines into memory.
fn capture(
    filter: &str,
    format: LogFormat,
) -> (impl tracing::Subscriber + Send + Sync + 'static, Capture) {
    let out = Capture::default();
    let subscriber = logging::subscriber(filter, LogLayer::new(format, out.clone())).unwrap();
    (subscriber, out)
}

/// The positions of `"key":` in a raw JSON line, in the order the keys are expected.
fn assert_key_order(line: &str, keys: &[&str]) {
    let positions: Vec<usize> = keys
        .iter()
        .map(|key| {
            line.find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} missing from {line}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|pair| pair[0] < pair[1]),
        "keys out of order in {line}"
    );
}

fn assert_rfc3339_utc(ts: &str) {
    let bytes = ts.as_bytes();
    let digits =
        |range: std::ops::Range<usize>| range.into_iter().all(|i| bytes[i].is_ascii_digit());
    assert_eq!(ts.len(), 27, "{ts}");
    assert!(digits(0..4) && digits(5..7) && digits(8..10), "{ts}");
    assert!(
        digits(11..13) && digits(14..16) && digits(17..19) && digits(20..26),
        "{ts}"
    );
    assert_eq!(
        (bytes[4], bytes[7], bytes[10], bytes[13], bytes[16], bytes[19], bytes[26]),
        (b'-', b'-', b'T', b':', b':', b'.', b'Z'),
        "{ts}"
    );
}

fn keys(object: &Map<String, Value>) -> BTreeSet<String> {
    object.keys().cloned().collect()
}

/// A logfmt line as its pairs, in order: bare values end at a space, quoted ones take the
/// JSON escapes.
fn parse_logfmt(line: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = line.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        assert!(
            !key.is_empty() && !key.contains(' '),
            "bad key {key:?} in {line}"
        );
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next().expect("an unterminated quoted value") {
                    '"' => break,
                    '\\' => match chars.next().expect("a dangling escape") {
                        'n' => value.push('\n'),
                        'r' => value.push('\r'),
                        't' => value.push('\t'),
                        'u' => {
                            let hex: String = chars.by_ref().take(4).collect();
                            value.push(
                                char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap(),
                            );
                        }
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            match chars.next() {
                None | Some(' ') => {}
                Some(other) => panic!("{other:?} after a quoted value in {line}"),
            }
        } else {
            value = chars.by_ref().take_while(|&c| c != ' ').collect();
        }
        pairs.push((key, value));
    }
    pairs
}

/// What a JSON value looks like once logfmt has written it and the parser has read it back.
fn as_logfmt_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn actor_span(id: &str) -> tracing::Span {
    error_span!("actor", actor_id = id, name = "counter", key = "k1")
}

#[test]
fn json_lines_are_flat_with_every_span_field_once() {
    let (subscriber, out) = capture("trace", LogFormat::Json);
    tracing::subscriber::with_default(subscriber, || {
        let _actor = actor_span("a1").entered();
        let _action = debug_span!("action", action = "increment").entered();
        warn!(
            call = "action",
            timeout_ms = 5000u64,
            ok = true,
            ratio = 0.5,
            "user code timed out"
        );
        warn!(actor_id = "shadow", action = %"inner", "repeats span fields");
        info!(list = ?vec![1, 2], shown = %"display", delta = -3i64, "values");
        debug!(n = 1);
    });

    let lines = out.lines();
    let objects = out.json_lines();
    assert_eq!(objects.len(), 4, "{lines:?}");
    for (line, object) in lines.iter().zip(&objects) {
        assert_key_order(
            line,
            &[
                "ts", "level", "target", "msg", "actor_id", "name", "key", "action",
            ],
        );
        assert_eq!(line.matches("\"actor_id\"").count(), 1, "{line}");
        for key in ["name", "key", "action"] {
            assert_eq!(line.matches(&format!("\"{key}\":")).count(), 1, "{line}");
        }
        assert_rfc3339_utc(object["ts"].as_str().unwrap());
        assert_eq!(object["target"], "logging");
        assert_eq!(object["name"], "counter");
        assert!(
            object.values().all(|v| !v.is_object() && !v.is_array()),
            "nested in {line}"
        );
    }

    let timed_out = &objects[0];
    assert_eq!(timed_out["level"], "warn");
    assert_eq!(timed_out["msg"], "user code timed out");
    assert_eq!(timed_out["actor_id"], "a1");
    assert_eq!(timed_out["action"], "increment");
    assert_eq!(timed_out["timeout_ms"], json!(5000));
    assert_eq!(timed_out["ok"], json!(true));
    assert_eq!(timed_out["ratio"], json!(0.5));
    assert_key_order(&lines[0], &["action", "call", "timeout_ms", "ok", "ratio"]);

    // The event's value wins, in the span field's place.
    let repeated = &objects[1];
    assert_eq!(repeated["actor_id"], "shadow");
    assert_eq!(repeated["action"], "inner");
    assert_eq!(repeated.len(), 8, "{}", lines[1]);

    let values = &objects[2];
    assert_eq!(values["level"], "info");
    assert_eq!(values["list"], "[1, 2]");
    assert_eq!(values["shown"], "display");
    assert_eq!(values["delta"], json!(-3));

    // An event without a message still has `msg`.
    assert_eq!(objects[3]["msg"], "");
    assert_eq!(objects[3]["level"], "debug");
}

#[tokio::test]
async fn tasks_instrumented_with_the_actor_span_carry_its_identity() {
    let (subscriber, out) = capture("debug", LogFormat::Json);
    let _default = tracing::subscriber::set_default(subscriber);

    let task = async {
        tokio::task::yield_now().await;
        debug!("inside the task");
        // A task spawned from inside inherits the span when instrumented with it.
        tokio::spawn(async { warn!("inside a child task") }.in_current_span())
            .await
            .unwrap();
    };
    tokio::spawn(task.instrument(actor_span("a2")))
        .await
        .unwrap();
    warn!("outside any actor");

    let objects = out.json_lines();
    assert_eq!(objects.len(), 3, "{:?}", out.lines());
    for object in &objects[..2] {
        assert_eq!(object["actor_id"], "a2");
        assert_eq!(object["name"], "counter");
        assert_eq!(object["key"], "k1");
    }
    assert_eq!(objects[1]["msg"], "inside a child task");
    assert!(!objects[2].contains_key("actor_id"));
}

#[test]
fn a_warn_filter_keeps_the_actor_identity_and_drops_info() {
    let (subscriber, out) = capture("warn", LogFormat::Json);
    tracing::subscriber::with_default(subscriber, || {
        let _actor = actor_span("a3").entered();
        info!("filtered out");
        warn!("kept");
        // The action span is debug, so under `warn` it is disabled and adds nothing.
        let _action = debug_span!("action", action = "increment").entered();
        debug!("filtered out too");
        warn!("kept in an action");
    });

    let objects = out.json_lines();
    let msgs: Vec<_> = objects.iter().map(|o| o["msg"].as_str().unwrap()).collect();
    assert_eq!(msgs, ["kept", "kept in an action"]);
    for object in &objects {
        assert_eq!(object["level"], "warn");
        assert_eq!(object["actor_id"], "a3");
        assert_eq!(object["name"], "counter");
        assert_eq!(object["key"], "k1");
        assert!(!object.contains_key("action"));
    }
}

#[test]
fn malformed_settings_are_clear_errors() {
    let err = LogFormat::parse("xml").unwrap_err();
    assert!(
        matches!(err, keel_core::Error::InvalidConfig { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("\"xml\"") && message.contains("pretty, json or logfmt"),
        "{message}"
    );
    assert_eq!(LogFormat::parse(" JSON ").unwrap(), LogFormat::Json);
    assert_eq!("logfmt".parse::<LogFormat>().unwrap(), LogFormat::Logfmt);
    assert_eq!(
        LogFormat::parse(LogFormat::Pretty.as_str()).unwrap(),
        LogFormat::Pretty
    );
    assert_eq!(LogFormat::default_for(true), LogFormat::Pretty);
    assert_eq!(LogFormat::default_for(false), LogFormat::Logfmt);

    let err = logging::filter("keel_core=loud").unwrap_err();
    assert!(err.to_string().contains("keel_core=loud"), "{err}");
    logging::filter("keel_core=debug,hyper=warn").unwrap();
    logging::filter("").unwrap();
}

/// Writes the same events as JSON and logfmt through one registry (two layers sharing the
/// span fields) and returns both.
fn json_and_logfmt(events: impl FnOnce()) -> (Capture, Capture) {
    let json = Capture::default();
    let logfmt = Capture::default();
    let subscriber = tracing_subscriber::registry()
        .with(LogLayer::new(LogFormat::Json, json.clone()))
        .with(LogLayer::new(LogFormat::Logfmt, logfmt.clone()));
    tracing::subscriber::with_default(subscriber, events);
    (json, logfmt)
}

/// Checks that each logfmt line reads back as the JSON line of the same event: same keys in
/// the same order, same values (but for `ts`: each layer reads the clock itself).
fn assert_same_lines(json: &Capture, logfmt: &Capture) {
    let objects = json.json_lines();
    let json_lines = json.lines();
    let logfmt_lines = logfmt.lines();
    assert_eq!(objects.len(), logfmt_lines.len());
    for ((object, json_line), logfmt_line) in objects.iter().zip(&json_lines).zip(&logfmt_lines) {
        let pairs = parse_logfmt(logfmt_line);
        let logfmt_keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        let mut json_keys: Vec<&str> = object.keys().map(String::as_str).collect();
        json_keys.sort_by_key(|key| json_line.find(&format!("\"{key}\":")).unwrap());
        assert_eq!(logfmt_keys, json_keys, "{logfmt_line}");
        for (key, value) in pairs.iter().filter(|(key, _)| key != "ts") {
            assert_eq!(
                *value,
                as_logfmt_text(&object[key]),
                "{key} in {logfmt_line}"
            );
        }
    }
}

#[test]
fn logfmt_reads_back_as_the_json_line() {
    let (json, logfmt) = json_and_logfmt(|| {
        let _actor = actor_span("a4").entered();
        let _action = debug_span!("action", action = "increment").entered();
        warn!(
            plain = "word",
            spaces = "two words",
            quote = "say \"hi\"",
            equals = "a=b",
            newline = "line one\nline two",
            empty = "",
            backslash = "C:\\dir",
            escape = "\u{1b}[31mred",
            count = 3,
            ok = false,
            "a message with spaces"
        );
    });
    assert_same_lines(&json, &logfmt);

    let line = &logfmt.lines()[0];
    assert!(line.starts_with("ts="), "{line}");
    for expected in [
        " level=warn target=logging msg=\"a message with spaces\" actor_id=a4 name=counter key=k1 action=increment plain=word ",
        " spaces=\"two words\" ",
        r#" quote="say \"hi\"" "#,
        r#" equals="a=b" "#,
        r#" newline="line one\nline two" "#,
        r#" empty="" "#,
        r#" backslash="C:\\dir" "#,
        r#" escape="\u001b[31mred" "#,
        " count=3 ok=false",
    ] {
        assert!(line.contains(expected), "{expected:?} not in {line}");
    }
    assert!(!line.contains('\u{1b}'));
}

#[test]
fn lines_from_user_code_have_the_shape_of_rust_lines() {
    let user_fields = vec![
        ("user".to_string(), json!("bob smith")),
        ("count".to_string(), json!(3)),
        ("nested".to_string(), json!({ "a": [1, "two"] })),
    ];
    let (json, logfmt) = json_and_logfmt(|| {
        let _actor = actor_span("a5").entered();
        let _action = debug_span!("action", action = "increment").entered();
        warn!("from rust");
        logging::emit(Level::WARN, "from js", &user_fields);
        logging::emit(Level::INFO, "no fields", &[]);
        logging::emit(
            Level::ERROR,
            "awkward names",
            &[
                ("actor_id".to_string(), json!("spoofed")),
                ("msg".to_string(), json!("not the message")),
                ("has space".to_string(), json!(1)),
                ("user".to_string(), json!("first")),
                ("user".to_string(), json!("second")),
            ],
        );
    });
    assert_same_lines(&json, &logfmt);

    let objects = json.json_lines();
    let rust = &objects[0];
    let js = &objects[1];
    let mut expected = keys(rust);
    expected.extend(["user", "count", "nested"].map(String::from));
    assert_eq!(keys(js), expected);
    assert_eq!(js["target"], logging::JS_TARGET);
    assert_eq!(js["msg"], "from js");
    assert_eq!(js["actor_id"], "a5");
    assert_eq!(js["action"], "increment");
    assert_eq!(js["user"], "bob smith");
    assert_eq!(js["count"], json!(3));
    assert_eq!(js["nested"], json!({ "a": [1, "two"] }));
    assert_key_order(
        &json.lines()[1],
        &["msg", "actor_id", "action", "user", "count", "nested"],
    );

    // Logfmt key sets match too, with the user's fields on top of the Rust line's.
    let logfmt_lines = logfmt.lines();
    let logfmt_keys = |line: &str| -> BTreeSet<String> {
        parse_logfmt(line).into_iter().map(|(k, _)| k).collect()
    };
    let mut expected = logfmt_keys(&logfmt_lines[0]);
    expected.extend(["user", "count", "nested"].map(String::from));
    assert_eq!(logfmt_keys(&logfmt_lines[1]), expected);
    assert!(
        logfmt_lines[1].contains(r#" nested="{\"a\":[1,\"two\"]}""#),
        "{}",
        logfmt_lines[1]
    );

    assert_eq!(keys(&objects[2]), keys(rust));
    assert_eq!(objects[2]["level"], "info");

    let awkward = &objects[3];
    let awkward_line = &json.lines()[3];
    assert_eq!(awkward["actor_id"], "a5");
    assert_eq!(awkward["field.actor_id"], "spoofed");
    assert_eq!(awkward["msg"], "awkward names");
    assert_eq!(awkward["field.msg"], "not the message");
    assert_eq!(awkward["has_space"], json!(1));
    assert_eq!(awkward["user"], "second");
    for key in ["actor_id", "msg", "user"] {
        assert_eq!(
            awkward_line.matches(&format!("\"{key}\"")).count(),
            1,
            "{awkward_line}"
        );
    }
}

#[test]
fn user_fields_never_replace_keel_keys_in_any_format() {
    // What `c.log.info("charge failed", { ...userError, message, actor_id, ... })` sends.
    let encoded = r#"{"name":"UserError","key":"declined","code":"card","actor_id":"spoofed","action":"other","level":"fatal","message":"user text","target":"elsewhere","ts":"yesterday","msg":"not the message","field.name":"already prefixed","amount":3}"#;
    let pretty = Capture::default();
    let (json, logfmt) = {
        let json = Capture::default();
        let logfmt = Capture::default();
        let subscriber = tracing_subscriber::registry()
            .with(LogLayer::new(LogFormat::Json, json.clone()))
            .with(LogLayer::new(LogFormat::Logfmt, logfmt.clone()))
            .with(LogLayer::new(LogFormat::Pretty, pretty.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let _actor = actor_span("a9").entered();
            let _action = debug_span!("action", action = "charge").entered();
            logging::emit_json(Level::WARN, "charge failed", Some(encoded));
        });
        (json, logfmt)
    };
    assert_same_lines(&json, &logfmt);

    let line = &json.lines()[0];
    let object = &json.json_lines()[0];
    // keel's keys keep keel's values, in keel's places.
    assert_key_order(
        line,
        &[
            "ts", "level", "target", "msg", "actor_id", "name", "key", "action",
        ],
    );
    assert_eq!(object["level"], "warn");
    assert_eq!(object["target"], logging::JS_TARGET);
    assert_eq!(object["msg"], "charge failed");
    assert_eq!(object["actor_id"], "a9");
    assert_eq!(object["name"], "counter");
    assert_eq!(object["key"], "k1");
    assert_eq!(object["action"], "charge");
    assert_rfc3339_utc(object["ts"].as_str().unwrap());
    // The user's values are all there, under `field.` names, in the user's order; a name that
    // is no keel key (`code`, `amount`) is kept as it is.
    // `field.name` is the user's own key, so the renamed `name` takes one more prefix.
    let renamed = [
        ("field.field.name", json!("UserError")),
        ("field.key", json!("declined")),
        ("code", json!("card")),
        ("field.actor_id", json!("spoofed")),
        ("field.action", json!("other")),
        ("field.level", json!("fatal")),
        ("field.message", json!("user text")),
        ("field.target", json!("elsewhere")),
        ("field.ts", json!("yesterday")),
        ("field.msg", json!("not the message")),
        ("field.name", json!("already prefixed")),
        ("amount", json!(3)),
    ];
    for (key, value) in &renamed {
        assert_eq!(object.get(*key), Some(value), "{key} in {line}");
    }
    assert_eq!(object.len(), 8 + renamed.len(), "{line}");
    let mut order = vec!["action"];
    order.extend(renamed.iter().map(|(key, _)| *key));
    assert_key_order(line, &order);

    // Pretty shows the same pairs after `target: msg`.
    let pretty_line = &pretty.lines()[0];
    let (_, pairs) = pretty_line
        .split_once("keel::js: charge failed ")
        .unwrap_or_else(|| panic!("{pretty_line}"));
    let pretty_keys: Vec<String> = parse_logfmt(pairs).into_iter().map(|(k, _)| k).collect();
    let mut expected = vec!["actor_id", "name", "key"];
    expected.extend(&order);
    assert_eq!(pretty_keys, expected, "{pretty_line}");
    assert!(
        pretty_line.contains(" name=counter key=k1 action=charge "),
        "{pretty_line}"
    );
}

#[test]
fn user_lines_obey_the_filter() {
    let (subscriber, out) = capture("warn,keel::js=error", LogFormat::Json);
    tracing::subscriber::with_default(subscriber, || {
        logging::emit(Level::WARN, "dropped by the keel::js directive", &[]);
        logging::emit(Level::ERROR, "kept", &[("n".to_string(), json!(1))]);
    });
    let objects = out.json_lines();
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0]["msg"], "kept");
    assert_eq!(objects[0]["n"], json!(1));
}

#[test]
fn pre_encoded_user_fields_make_the_same_line_as_decoded_ones() {
    let (json, logfmt) = json_and_logfmt(|| {
        let _actor = actor_span("a7").entered();
        logging::emit(
            Level::WARN,
            "from js",
            &[
                ("n".to_string(), json!(2)),
                ("who".to_string(), json!("ann")),
            ],
        );
        logging::emit_json(Level::WARN, "from js", Some(r#"{"n":2,"who":"ann"}"#));
        logging::emit_json(Level::WARN, "no fields", None);
        logging::emit_json(Level::WARN, "not an object", Some("[1,2]"));
    });
    assert_same_lines(&json, &logfmt);
    let objects = json.json_lines();
    let without_ts = |object: &Map<String, Value>| {
        let mut object = object.clone();
        object.remove("ts");
        object
    };
    assert_eq!(without_ts(&objects[0]), without_ts(&objects[1]));
    assert_eq!(
        keys(&objects[2]),
        ["ts", "level", "target", "msg", "actor_id", "name", "key"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    assert_eq!(objects[3]["keel.fields"], "[1,2]");
}

#[test]
fn user_line_checks_follow_the_filter_inside_the_span() {
    let (subscriber, _out) = capture("warn,[actor{name=counter}]=debug", LogFormat::Json);
    tracing::subscriber::with_default(subscriber, || {
        assert!(logging::js_enabled(Level::WARN));
        assert!(
            !logging::js_enabled(Level::DEBUG),
            "outside the actor's span"
        );
        let _actor = actor_span("a8").entered();
        assert!(logging::js_enabled(Level::DEBUG), "inside the actor's span");
        assert!(!logging::js_enabled(Level::TRACE));
    });
}

#[test]
fn settings_given_in_code_win_and_must_be_well_formed() {
    let (settings, problems) =
        logging::LogSettings::resolve(Some("debug,keel::js=warn"), Some("json")).unwrap();
    assert_eq!(settings.directives, "debug,keel::js=warn");
    assert_eq!(settings.format, LogFormat::Json);
    assert!(problems.is_empty());
    for (level, format) in [(Some("[unclosed"), None), (None, Some("xml"))] {
        let err = logging::LogSettings::resolve(level, format).unwrap_err();
        assert_eq!(err.code(), "invalid_config", "{err}");
    }
}

#[test]
fn pretty_lines_show_span_fields_and_color_only_when_asked() {
    let plain = Capture::default();
    let colored = Capture::default();
    let subscriber = tracing_subscriber::registry()
        .with(LogLayer::new(LogFormat::Pretty, plain.clone()))
        .with(LogLayer::new(LogFormat::Pretty, colored.clone()).with_ansi(true));
    tracing::subscriber::with_default(subscriber, || {
        let _actor = actor_span("a6").entered();
        warn!(error = "it broke", "stopping the actor failed");
    });

    let line = &plain.lines()[0];
    assert!(!line.contains('\u{1b}'), "{line}");
    assert!(line.ends_with(
        "  warn logging: stopping the actor failed actor_id=a6 name=counter key=k1 error=\"it broke\""
    ), "{line}");
    assert_rfc3339_utc(&line[..27]);
    let colored = colored.lines();
    assert!(colored[0].contains("\u{1b}["), "{}", colored[0]);
    assert!(colored[0].contains("stopping the actor failed"));
}

/// A full action round trip against the real runtime emits no `info` line at the default
/// filter, while `trace` shows the actor's lines with its identity. The subscriber is global
/// (this is the only test that sets one) so that lines from the writer thread count too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_round_trip_is_quiet_at_info() {
    let at_info = Capture::default();
    let at_trace = Capture::default();
    let subscriber = tracing_subscriber::registry()
        .with(LogLayer::new(LogFormat::Json, at_info.clone()).with_filter(EnvFilter::new("info")))
        .with(
            LogLayer::new(LogFormat::Json, at_trace.clone())
                .with_filter(EnvFilter::new("keel_core=trace")),
        );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let runtime = common::open(dir.path(), common::CounterHost::new());
    common::call(&runtime, common::counter("quiet"), "increment", "[1]")
        .await
        .unwrap();
    common::call(&runtime, common::counter("quiet"), "fail", "[]")
        .await
        .unwrap_err();
    runtime.drain().await;

    assert_eq!(at_info.lines(), Vec::<String>::new());
    let objects = at_trace.json_lines();
    let actor_lines: Vec<_> = objects
        .iter()
        .filter(|o| {
            o["target"]
                .as_str()
                .unwrap()
                .starts_with("keel_core::actor")
        })
        .collect();
    assert!(!actor_lines.is_empty(), "{:?}", at_trace.lines());
    for object in &actor_lines {
        assert_eq!(object["name"], "counter", "{object:?}");
        assert_eq!(object["key"], "quiet", "{object:?}");
        assert!(object["actor_id"].is_string(), "{object:?}");
    }
    let failed = objects
        .iter()
        .find(|o| o["msg"] == "action failed")
        .expect("the failing action is logged at debug");
    assert_eq!(failed["action"], "fail");
    assert!(objects.iter().all(|o| o["level"] != "info"));
}
