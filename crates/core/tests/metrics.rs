//! The `/metrics` page against a real runtime and registry, read by a strict parser of the
//! Prometheus text format (0.0.4) while actions, commits, schedules, builds and a shutdown
//! move its numbers.

mod common;

use common::{eventually, handle, request};

use std::collections::BTreeMap;
use std::time::Duration;

use common::{call, counter, CounterHost};
use keel_core::metrics::ActionOutcome;
use keel_core::{ActorType, Registry, Runtime, RuntimeConfig};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------
// A strict reader of the Prometheus text exposition format, version 0.0.4.

#[derive(Debug)]
struct Family {
    kind: String,
    samples: Vec<Sample>,
}

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

fn parse_value(text: &str) -> f64 {
    match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => {
            assert!(
                text.chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')),
                "not a number: {text:?}"
            );
            text.parse()
                .unwrap_or_else(|_| panic!("not a number: {text:?}"))
        }
    }
}

/// Parses `{name="value",...}` starting at `rest`, returning the labels and what follows.
fn parse_labels(mut rest: &str) -> (Vec<(String, String)>, &str) {
    let mut labels = Vec::new();
    rest = rest.strip_prefix('{').unwrap();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after);
        }
        let eq = rest.find('=').expect("a label needs =");
        let name = &rest[..eq];
        assert!(is_label_name(name), "bad label name {name:?}");
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .expect("label values are quoted");
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next().expect("an unterminated label value");
            match c {
                '"' => break i,
                '\\' => match chars.next().expect("a dangling escape").1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    other => panic!("bad escape \\{other}"),
                },
                '\n' => panic!("a raw newline in a label value"),
                c => value.push(c),
            }
        };
        assert!(
            labels.iter().all(|(n, _)| n != name),
            "label {name} repeated"
        );
        labels.push((name.to_string(), value));
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else {
            assert!(rest.starts_with('}'), "labels must be separated by commas");
        }
    }
}

/// Parses a whole page, checking the format's rules and keel's conventions, and checks every
/// histogram for consistency.
fn parse_page(page: &str) -> BTreeMap<String, Family> {
    assert!(page.ends_with('\n'), "the page ends with a newline");
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut helped = Vec::new();
    let mut current: Option<String> = None;
    let mut series = std::collections::HashSet::new();
    for line in page.lines() {
        assert!(!line.is_empty(), "no empty lines");
        assert!(!line.ends_with(' '), "no trailing space: {line:?}");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a text");
            assert!(is_metric_name(name) && !help.is_empty(), "{line}");
            assert!(!helped.contains(&name.to_string()), "HELP twice for {name}");
            helped.push(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(
                matches!(
                    kind,
                    "counter" | "gauge" | "histogram" | "summary" | "untyped"
                ),
                "{line}"
            );
            assert!(
                helped.last().map(String::as_str) == Some(name),
                "HELP before TYPE: {line}"
            );
            assert!(!families.contains_key(name), "TYPE twice for {name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counters end in _total: {name}");
            }
            families.insert(
                name.to_string(),
                Family {
                    kind: kind.to_string(),
                    samples: Vec::new(),
                },
            );
            current = Some(name.to_string());
            continue;
        }
        assert!(!line.starts_with('#'), "an unknown comment: {line}");
        let name_end = line.find(['{', ' ']).expect("a sample has a value");
        let name = &line[..name_end];
        assert!(is_metric_name(name), "bad metric name in {line:?}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..])
        } else {
            (Vec::new(), &line[name_end..])
        };
        let rest = rest.strip_prefix(' ').expect("one space before the value");
        let mut parts = rest.split(' ');
        let value = parse_value(parts.next().unwrap());
        if let Some(timestamp) = parts.next() {
            timestamp.parse::<i64>().expect("a timestamp is an integer");
        }
        assert!(parts.next().is_none(), "junk after the value: {line}");
        let family_name = current.clone().expect("samples follow a TYPE line");
        let family = families.get_mut(&family_name).unwrap();
        let expected: &[String] = &match family.kind.as_str() {
            "histogram" => vec![
                format!("{family_name}_bucket"),
                format!("{family_name}_sum"),
                format!("{family_name}_count"),
            ],
            _ => vec![family_name.clone()],
        };
        assert!(
            expected.iter().any(|n| n == name),
            "{name} outside its family {family_name}"
        );
        let mut key: Vec<_> = labels.clone();
        key.sort();
        assert!(
            series.insert((name.to_string(), key)),
            "series repeated: {line}"
        );
        family.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    for (name, family) in &families {
        assert!(!family.samples.is_empty(), "{name} has no samples");
        if family.kind == "histogram" {
            check_histogram(name, family);
        }
        if family.kind == "counter" {
            assert!(family.samples.iter().all(|s| s.value >= 0.0), "{name}");
        }
    }
    families
}

fn check_histogram(name: &str, family: &Family) {
    let without_le = |sample: &Sample| -> Vec<(String, String)> {
        let mut labels: Vec<_> = sample
            .labels
            .iter()
            .filter(|(n, _)| n != "le")
            .cloned()
            .collect();
        labels.sort();
        labels
    };
    let mut groups: BTreeMap<Vec<(String, String)>, Vec<&Sample>> = BTreeMap::new();
    for sample in &family.samples {
        groups.entry(without_le(sample)).or_default().push(sample);
    }
    for (labels, samples) in groups {
        let buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.name.ends_with("_bucket"))
            .map(|s| {
                let le = &s
                    .labels
                    .iter()
                    .find(|(n, _)| n == "le")
                    .expect("a bucket has le")
                    .1;
                (parse_value(le), s.value)
            })
            .collect();
        assert!(buckets.len() >= 2, "{name}{labels:?} has buckets");
        assert!(
            buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{name}{labels:?}: bounds ascend and counts are cumulative: {buckets:?}"
        );
        let last = buckets.last().unwrap();
        assert_eq!(last.0, f64::INFINITY, "{name}: the last bucket is +Inf");
        let one = |suffix: &str| {
            let found: Vec<_> = samples
                .iter()
                .filter(|s| s.name.ends_with(suffix))
                .collect();
            assert_eq!(found.len(), 1, "{name}{labels:?} has one {suffix}");
            found[0].value
        };
        let count = one("_count");
        let sum = one("_sum");
        assert_eq!(last.1, count, "{name}: +Inf equals _count");
        assert_eq!(count.fract(), 0.0, "{name}: _count is whole");
        assert!(
            sum >= 0.0 && (count > 0.0 || sum == 0.0),
            "{name}: sum {sum}"
        );
    }
}

/// The value of one series; `labels` as `name="value"` pairs.
fn value(families: &BTreeMap<String, Family>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let family_name = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| {
            name.strip_suffix(suffix)
                .filter(|base| families.get(*base).is_some_and(|f| f.kind == "histogram"))
        })
        .unwrap_or(name);
    let family = families
        .get(family_name)
        .unwrap_or_else(|| panic!("no family {family_name}"));
    family
        .samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(n, v)| s.labels.iter().any(|(ln, lv)| ln == n && lv == v))
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .value
}

#[test]
fn the_parser_refuses_what_the_format_does_not_allow() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 2\n";
    parse_page(good);
    for bad in [
        "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 2",
        "# TYPE a_total counter\na_total 2\n",
        "# HELP a_total A.\n# TYPE a_total counter\na_total{x=1} 2\n",
        "# HELP a_total A.\n# TYPE a_total counter\nb_total 2\n",
        "# HELP a A.\n# TYPE a counter\na 2\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
    ] {
        let refused = std::panic::catch_unwind(|| parse_page(bad)).is_err();
        assert!(refused, "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

async fn metrics(runtime: &Runtime) -> BTreeMap<String, Family> {
    let (status, headers, body) = handle(runtime, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    parse_page(&body)
}

/// One HTTP/1.1 request over a fresh TCP connection: status, lower-cased headers, body.
// ---------------------------------------------------------------------------------------
// Metrics.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_page_parses_and_its_counters_move() {
    let dir = tempfile::tempdir().unwrap();
    let host = CounterHost::new();
    let config = RuntimeConfig {
        action_timeout: Duration::from_millis(100),
        ..common::config(dir.path())
    };
    let runtime = Runtime::open(
        config,
        common::types(),
        host.clone(),
        &CancellationToken::new(),
    )
    .unwrap();

    let before = metrics(&runtime).await;
    for outcome in ["ok", "user_error", "error", "timeout"] {
        assert_eq!(
            value(&before, "keel_actions_total", &[("outcome", outcome)]),
            0.0
        );
    }
    assert_eq!(value(&before, "keel_actors_awake", &[]), 0.0);
    assert_eq!(value(&before, "keel_connections_open", &[]), 0.0);
    assert_eq!(
        value(&before, "keel_shutdown_phase", &[("phase", "running")]),
        1.0
    );
    assert_eq!(before["keel_actors_awake"].kind, "gauge");
    assert_eq!(before["keel_action_duration_seconds"].kind, "histogram");

    call(&runtime, counter("a"), "increment", "[1]")
        .await
        .unwrap();
    call(&runtime, counter("b"), "increment", "[2]")
        .await
        .unwrap();
    call(&runtime, counter("a"), "fail", "[]")
        .await
        .unwrap_err();
    *host.flaky_failures.lock() = 1;
    call(&runtime, counter("a"), "flaky", "[]")
        .await
        .unwrap_err();
    // `block` waits for a permit that never comes, so it times out however loaded the
    // machine is.
    let timed_out = call(&runtime, counter("b"), "block", "[]")
        .await
        .unwrap_err();
    assert_eq!(timed_out.code(), "action_timed_out");
    let far = keel_core::writer::now_ms() + 3_600_000;
    call(
        &runtime,
        counter("a"),
        "schedule",
        &format!(r#"["later", {far}, "append", 1]"#),
    )
    .await
    .unwrap();
    call(
        &runtime,
        counter("a"),
        "schedule",
        r#"["now", 0, "append", 7]"#,
    )
    .await
    .unwrap();
    // The schedule fires on the alarm timer's own task; wait until it was handed to the
    // actor and ran. Its commit may still be on its way to disk then.
    eventually("the due schedule runs", || {
        runtime.metrics().schedules_fired() == 1
            && runtime.metrics().actions(ActionOutcome::Ok) == 5
    })
    .await;
    // A call to the same actor runs after the scheduled run and its reply waits for every
    // earlier commit, so once it is back nothing is in flight and every number is settled.
    assert_eq!(
        call(&runtime, counter("a"), "seen", "[]").await.unwrap(),
        "[7]",
        "the scheduled append committed"
    );

    let after = metrics(&runtime).await;
    let actions = |outcome| value(&after, "keel_actions_total", &[("outcome", outcome)]);
    // increment ×2, schedule ×2, the scheduled append and seen; fail; flaky; block.
    assert_eq!(actions("ok"), 6.0, "{:?}", host.log.lock());
    assert_eq!(actions("user_error"), 1.0);
    assert_eq!(actions("error"), 1.0);
    assert_eq!(actions("timeout"), 1.0);
    assert_eq!(
        value(&after, "keel_action_duration_seconds_count", &[]),
        9.0
    );
    assert!(
        value(&after, "keel_action_duration_seconds_sum", &[]) >= 0.1,
        "the timed-out action ran for its whole timeout"
    );
    assert_eq!(value(&after, "keel_actors_awake", &[]), 2.0);
    assert_eq!(value(&after, "keel_schedules_fired_total", &[]), 1.0);
    assert_eq!(value(&after, "keel_schedules_pending", &[]), 1.0);
    let commits = value(&after, "keel_commits_total", &[]);
    // Each awaited write commits on its own: the two new actors' rows, their first state
    // with the first increment (which may share a commit), the two schedules and the run.
    assert!(commits >= 7.0, "every state change committed: {commits}");
    assert_eq!(
        value(&after, "keel_commit_duration_seconds_count", &[]),
        commits,
        "one latency per commit"
    );
    assert_eq!(
        commits,
        runtime
            .writer_stats()
            .transactions
            .load(std::sync::atomic::Ordering::Relaxed) as f64
    );

    runtime.drain().await;
    let page = runtime.metrics().render();
    let drained = parse_page(&page);
    assert_eq!(
        value(&drained, "keel_shutdown_phase", &[("phase", "stopped")]),
        1.0
    );
    assert_eq!(
        value(&drained, "keel_shutdown_phase", &[("phase", "running")]),
        0.0
    );
    assert!(
        value(&drained, "keel_commits_total", &[]) >= commits,
        "counters survive the drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_counts_its_builds_and_shows_its_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new(CounterHost::new());
    registry
        .register(ActorType::new("counter", common::ACTIONS.iter().copied()))
        .unwrap();
    let page = parse_page(&registry.metrics().render());
    assert_eq!(value(&page, "keel_runtime_builds_total", &[]), 0.0);

    let config = common::config(dir.path());
    let response = registry
        .handle(
            &config,
            request(
                "POST",
                "/v1/actors/counter/actions/increment",
                &[("content-type", "application/json")],
                r#"{"key":["x"],"args":[3]}"#,
            ),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = registry
        .handle(&config, request("GET", "/metrics", &[], ""))
        .await
        .unwrap();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let page = parse_page(std::str::from_utf8(&body).unwrap());
    assert_eq!(value(&page, "keel_runtime_builds_total", &[]), 1.0);
    assert_eq!(
        value(&page, "keel_actions_total", &[("outcome", "ok")]),
        1.0
    );
    assert_eq!(value(&page, "keel_actors_awake", &[]), 1.0);

    registry.shutdown().await;
    let page = parse_page(&registry.metrics().render());
    for (phase, expected) in [("running", 0.0), ("draining", 0.0), ("stopped", 1.0)] {
        assert_eq!(
            value(&page, "keel_shutdown_phase", &[("phase", phase)]),
            expected
        );
    }
    assert_eq!(
        value(&page, "keel_actors_awake", &[]),
        0.0,
        "the runtime is gone"
    );
    assert_eq!(
        value(&page, "keel_actions_total", &[("outcome", "ok")]),
        1.0
    );
    assert_eq!(registry.build_count(), 1);
}
