//! keel's metrics, kept as atomics and written as a Prometheus text page (format 0.0.4).
//!
//! Counters and histograms are updated where the work happens (an actor's action, the
//! writer's commit, the alarm timer) with relaxed atomic adds, so recording costs a few
//! nanoseconds and takes no lock. Gauges that describe the running runtime (awake actors,
//! pending schedules) are read from it when the page is rendered, so they can never drift
//! from the truth. One [`Metrics`] belongs to a registry and outlives its runtime, so its
//! counters stay monotonic for the life of the process.
//!
//! What must stay true:
//! - Names, types and labels are the ones documented in `docs/observability.md`.
//! - A histogram's `_bucket` series are cumulative, end with `le="+Inf"`, and that bucket
//!   equals `_count` within one rendering (all are derived from one read of the buckets).
//! - Nothing here holds user data: no keys, ids or payloads become labels.
//!
//! Why the page is written by hand rather than by `prometheus-client`: that crate writes only
//! OpenMetrics 1.0 text, as its documentation shows: a counter's `# TYPE` line names
//! the family without `_total` (`# TYPE keel_actions counter` above `keel_actions_total`),
//! the page ends in `# EOF`, and the media type is `application/openmetrics-text`. That would
//! change the documented page and its content type for every scraper. The gauges read from
//! the runtime at render time would also need custom collectors. [`Page`] is the forty lines
//! of the 0.0.4 format keel needs, and a render takes no lock on the recording path.

use std::fmt::Write as _;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// The media type of the page: Prometheus text exposition format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of a histogram's buckets, in seconds, ascending.
pub trait Buckets: Send + Sync + 'static {
    /// The bounds; a last `+Inf` bucket is implied.
    const BOUNDS: &'static [f64];
}

/// Buckets for user code run time: half a millisecond to a minute (the default action timeout).
#[derive(Debug)]
pub struct ActionBuckets;

impl Buckets for ActionBuckets {
    const BOUNDS: &'static [f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ];
}

/// Buckets for a group commit: a tenth of a millisecond (no fsync) to a few seconds (a
/// struggling disk).
#[derive(Debug)]
pub struct CommitBuckets;

impl Buckets for CommitBuckets {
    const BOUNDS: &'static [f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
}

/// A histogram of durations with fixed buckets. Each observation is two relaxed adds (its
/// bucket and the sum); the count and the cumulative buckets are derived when rendering.
pub struct Histogram<B: Buckets> {
    /// One counter per bound, then one for values above the last bound. Not cumulative.
    counts: Box<[AtomicU64]>,
    /// The sum of every observation, in nanoseconds (enough for 584 years of latency).
    sum_nanos: AtomicU64,
    buckets: PhantomData<B>,
}

impl<B: Buckets> Default for Histogram<B> {
    fn default() -> Self {
        Histogram {
            counts: (0..=B::BOUNDS.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            buckets: PhantomData,
        }
    }
}

impl<B: Buckets> std::fmt::Debug for Histogram<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snapshot = self.snapshot();
        f.debug_struct("Histogram")
            .field("count", &snapshot.count)
            .field("sum_seconds", &snapshot.sum_seconds)
            .finish()
    }
}

/// One consistent read of a histogram.
pub struct HistogramSnapshot {
    /// `(upper bound, cumulative count)` per bucket, without the `+Inf` bucket.
    pub buckets: Vec<(f64, u64)>,
    /// Every observation: the `+Inf` bucket.
    pub count: u64,
    /// The sum of the observations, in seconds.
    pub sum_seconds: f64,
}

impl<B: Buckets> Histogram<B> {
    /// Records one duration.
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let index = B::BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(B::BOUNDS.len());
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Reads the buckets once, cumulatively.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let mut buckets = Vec::with_capacity(B::BOUNDS.len());
        for (bound, count) in B::BOUNDS.iter().zip(self.counts.iter()) {
            running += count.load(Ordering::Relaxed);
            buckets.push((*bound, running));
        }
        running += self.counts[B::BOUNDS.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            count: running,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// How an action that reached an actor's instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionOutcome {
    /// It returned.
    Ok,
    /// It threw a `UserError`.
    UserError,
    /// It failed any other way (threw, or could not run).
    Error,
    /// It ran out of time.
    Timeout,
}

impl ActionOutcome {
    const ALL: [ActionOutcome; 4] = [
        ActionOutcome::Ok,
        ActionOutcome::UserError,
        ActionOutcome::Error,
        ActionOutcome::Timeout,
    ];

    /// The outcome of a finished call.
    pub fn of<T>(result: &Result<T>) -> ActionOutcome {
        match result {
            Ok(_) => ActionOutcome::Ok,
            Err(Error::User { .. }) => ActionOutcome::UserError,
            Err(Error::ActionTimedOut { .. }) => ActionOutcome::Timeout,
            Err(_) => ActionOutcome::Error,
        }
    }

    /// The `outcome` label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionOutcome::Ok => "ok",
            ActionOutcome::UserError => "user_error",
            ActionOutcome::Error => "error",
            ActionOutcome::Timeout => "timeout",
        }
    }
}

/// Where a registry is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ShutdownPhase {
    /// No shutdown has begun.
    Running = 0,
    /// The drain has begun: no new work; accepted work finishes and actors flush.
    Draining = 1,
    /// The drain ran out of time; what is left is being abandoned.
    Forced = 2,
    /// Every task has finished; the writer and the database are closing.
    Closing = 3,
    /// The shutdown is complete.
    Stopped = 4,
}

impl ShutdownPhase {
    const ALL: [ShutdownPhase; 5] = [
        ShutdownPhase::Running,
        ShutdownPhase::Draining,
        ShutdownPhase::Forced,
        ShutdownPhase::Closing,
        ShutdownPhase::Stopped,
    ];

    /// The `phase` label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownPhase::Running => "running",
            ShutdownPhase::Draining => "draining",
            ShutdownPhase::Forced => "forced",
            ShutdownPhase::Closing => "closing",
            ShutdownPhase::Stopped => "stopped",
        }
    }

    fn from_u8(value: u8) -> ShutdownPhase {
        Self::ALL
            .into_iter()
            .find(|phase| *phase as u8 == value)
            .unwrap_or(ShutdownPhase::Running)
    }
}

/// The gauges a running runtime answers when the page is rendered.
pub(crate) trait Gauges: Send + Sync {
    /// Actors whose instance is running now.
    fn awake_actors(&self) -> usize;
    /// Durable schedules waiting to fire.
    fn pending_schedules(&self) -> usize;
    /// Open connections of sleeping actors (hibernatable connections).
    fn hibernated_connections(&self) -> usize;
}

/// Counters the group-commit writer keeps, for tests and metrics. Kept here, with the other
/// counters, so that the page reads them without reaching up into storage.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub transactions: AtomicU64,
    /// Ops applied.
    pub ops: AtomicU64,
    /// Commits applied by their senders instead of the writer thread (see `storage/queue.rs`),
    /// counted before they are applied.
    pub inline: AtomicU64,
    /// Commits under `durability: "full"` sent to the writer thread only because the batch
    /// before them took longer than the inline bound (see `storage/queue.rs`): on a disk
    /// that flushes that slowly, every commit goes to the thread.
    pub slow: AtomicU64,
    /// How long each committed transaction took, fsync included.
    pub commit_seconds: Histogram<CommitBuckets>,
}

/// Everything keel counts, for one registry (or one runtime opened on its own).
#[derive(Default)]
pub struct Metrics {
    /// Actions that reached an instance, by [`ActionOutcome`] (in `ActionOutcome::ALL` order).
    actions: [Counter; 4],
    /// How long user code ran per action.
    action_seconds: Histogram<ActionBuckets>,
    /// Schedules handed to their actor by the alarm timer.
    schedules_fired: Counter,
    /// Runtimes built (serve starts and serverless builds, failed ones included).
    runtime_builds: Counter,
    /// Open actor connections (WebSocket).
    open_connections: AtomicI64,
    /// The current [`ShutdownPhase`].
    phase: AtomicU8,
    /// The runtime whose gauges the page shows; attached when it opens. Weak, so metrics
    /// never keep a drained runtime alive.
    gauges: Mutex<Option<Weak<dyn Gauges>>>,
    /// The writer's counters, kept after the runtime is gone so commits stay monotonic.
    writer: Mutex<Option<Arc<WriterStats>>>,
}

impl Metrics {
    /// Counts one action that reached an instance, and how long its user code ran.
    pub(crate) fn action_done<T>(&self, result: &Result<T>, elapsed: Duration) {
        let outcome = ActionOutcome::of(result);
        self.actions[outcome as usize].inc();
        self.action_seconds.observe(elapsed);
    }

    /// Counts one schedule handed to its actor.
    pub(crate) fn schedule_fired(&self) {
        self.schedules_fired.inc();
    }

    /// Counts one runtime build.
    pub(crate) fn runtime_built(&self) {
        self.runtime_builds.inc();
    }

    /// Counts one actor connection opening; pair every call with [`Metrics::connection_closed`].
    pub(crate) fn connection_opened(&self) {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one actor connection closing.
    pub(crate) fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Moves the shutdown phase forward; a phase never goes back.
    pub(crate) fn enter_phase(&self, phase: ShutdownPhase) {
        self.phase.fetch_max(phase as u8, Ordering::AcqRel);
    }

    /// Attaches the runtime whose gauges and writer the page shows.
    pub(crate) fn attach(&self, gauges: Weak<dyn Gauges>, writer: Arc<WriterStats>) {
        *self.gauges.lock() = Some(gauges);
        *self.writer.lock() = Some(writer);
    }

    /// How many actions ended with `outcome`.
    pub fn actions(&self, outcome: ActionOutcome) -> u64 {
        self.actions[outcome as usize].get()
    }

    /// How many runtimes were built.
    pub fn runtime_builds(&self) -> u64 {
        self.runtime_builds.get()
    }

    /// How many schedules were handed to their actors.
    pub fn schedules_fired(&self) -> u64 {
        self.schedules_fired.get()
    }

    /// The current shutdown phase.
    pub fn phase(&self) -> ShutdownPhase {
        ShutdownPhase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// The page, in Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let gauges = self.gauges.lock().as_ref().and_then(Weak::upgrade);
        let writer = self.writer.lock().clone();
        let mut page = Page(String::with_capacity(4096));

        let awake = gauges.as_ref().map_or(0, |gauges| gauges.awake_actors());
        page.header(
            "keel_actors_awake",
            "gauge",
            "Actors whose instance is running (awake) now.",
        );
        page.sample("keel_actors_awake", "", awake);

        page.header(
            "keel_actions_total",
            "counter",
            "Actions that reached an actor's instance, by outcome.",
        );
        for outcome in ActionOutcome::ALL {
            let labels = format!("outcome=\"{}\"", outcome.as_str());
            page.sample("keel_actions_total", &labels, self.actions(outcome));
        }

        page.histogram(
            "keel_action_duration_seconds",
            "How long user code ran per action, in seconds.",
            &self.action_seconds.snapshot(),
        );

        let (commits, commit_seconds) = match &writer {
            Some(stats) => (
                stats.transactions.load(Ordering::Relaxed),
                stats.commit_seconds.snapshot(),
            ),
            None => (0, Histogram::<CommitBuckets>::default().snapshot()),
        };
        page.header(
            "keel_commits_total",
            "counter",
            "Group commits to the database (one transaction carries many actions' writes).",
        );
        page.sample("keel_commits_total", "", commits);
        page.histogram(
            "keel_commit_duration_seconds",
            "How long one group commit took, fsync included, in seconds.",
            &commit_seconds,
        );

        page.header(
            "keel_connections_open",
            "gauge",
            "Open actor connections (keel protocol WebSockets admitted by their actor).",
        );
        page.sample(
            "keel_connections_open",
            "",
            self.open_connections.load(Ordering::Relaxed).max(0),
        );

        let hibernated = gauges
            .as_ref()
            .map_or(0, |gauges| gauges.hibernated_connections());
        page.header(
            "keel_connections_hibernated",
            "gauge",
            "Open connections whose actor sleeps (hibernatable connections).",
        );
        page.sample("keel_connections_hibernated", "", hibernated);

        let pending = gauges
            .as_ref()
            .map_or(0, |gauges| gauges.pending_schedules());
        page.header(
            "keel_schedules_pending",
            "gauge",
            "Durable schedules waiting to fire.",
        );
        page.sample("keel_schedules_pending", "", pending);
        page.header(
            "keel_schedules_fired_total",
            "counter",
            "Schedules that fell due and were handed to their actor (retries included).",
        );
        page.sample("keel_schedules_fired_total", "", self.schedules_fired());

        page.header(
            "keel_runtime_builds_total",
            "counter",
            "Runtimes built by the registry (serve starts and serverless builds).",
        );
        page.sample("keel_runtime_builds_total", "", self.runtime_builds());

        page.header(
            "keel_shutdown_phase",
            "gauge",
            "The registry's shutdown phase: 1 for the current phase, 0 for the others.",
        );
        let current = self.phase();
        for phase in ShutdownPhase::ALL {
            let labels = format!("phase=\"{}\"", phase.as_str());
            page.sample("keel_shutdown_phase", &labels, u8::from(phase == current));
        }
        page.0
    }
}

/// A page being written. Writing into a `String` cannot fail, so results are ignored.
struct Page(String);

impl Page {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    fn histogram(&mut self, name: &str, help: &str, snapshot: &HistogramSnapshot) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in &snapshot.buckets {
            // `Display` for f64 never uses an exponent, which the format requires of `le`.
            self.sample(&bucket, &format!("le=\"{bound}\""), count);
        }
        self.sample(&bucket, "le=\"+Inf\"", snapshot.count);
        self.sample(&format!("{name}_sum"), "", snapshot.sum_seconds);
        self.sample(&format!("{name}_count"), "", snapshot.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let histogram = Histogram::<ActionBuckets>::default();
        histogram.observe(Duration::from_micros(500));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(600));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 3);
        assert_eq!(snapshot.buckets[0], (0.0005, 1), "a bound is inclusive");
        assert_eq!(snapshot.buckets[2], (0.0025, 1));
        assert_eq!(snapshot.buckets[3], (0.005, 2));
        assert_eq!(
            snapshot.buckets.last().unwrap().1,
            2,
            "600 s is only in +Inf"
        );
        assert!((snapshot.sum_seconds - 600.0035).abs() < 1e-9);
    }

    #[test]
    fn outcomes_follow_the_error() {
        let user = Error::User {
            code: "x".into(),
            message: "x".into(),
            metadata: None,
        };
        assert_eq!(ActionOutcome::of(&Ok(())), ActionOutcome::Ok);
        assert_eq!(
            ActionOutcome::of::<()>(&Err(user)),
            ActionOutcome::UserError
        );
        assert_eq!(
            ActionOutcome::of::<()>(&Err(Error::ActionTimedOut { timeout_ms: 1 })),
            ActionOutcome::Timeout
        );
        assert_eq!(
            ActionOutcome::of::<()>(&Err(Error::ActorStopped)),
            ActionOutcome::Error
        );
    }

    #[test]
    fn the_phase_only_moves_forward() {
        let metrics = Metrics::default();
        assert_eq!(metrics.phase(), ShutdownPhase::Running);
        metrics.enter_phase(ShutdownPhase::Forced);
        metrics.enter_phase(ShutdownPhase::Draining);
        assert_eq!(metrics.phase(), ShutdownPhase::Forced);
        let page = metrics.render();
        assert!(page.contains("keel_shutdown_phase{phase=\"forced\"} 1\n"));
        assert!(page.contains("keel_shutdown_phase{phase=\"draining\"} 0\n"));
    }

    #[test]
    fn a_page_without_a_runtime_shows_zeros() {
        let page = Metrics::default().render();
        assert!(page.contains("keel_actors_awake 0\n"));
        assert!(page.contains("keel_commits_total 0\n"));
        assert!(page.contains("keel_commit_duration_seconds_bucket{le=\"+Inf\"} 0\n"));
        assert!(page.ends_with('\n'));
    }
}
