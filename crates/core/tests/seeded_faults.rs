//! Seeded fault injection: many random workloads against a real core, with a storage that
//! fails commits and crashes at the failpoints, and a host whose user code throws and hangs.
//!
//! Each seed drives a few actors of one type through a random mix of calls (appends to a
//! durable log, reads, KV puts, schedules, calls pipelined behind each other, calls whose
//! caller goes away), injected commit failures and failed WAL syncs, crashes at random
//! failpoints, graceful
//! restarts and jumps of (paused) time. A model of what each call was told checks, on every
//! seed:
//!
//! 1. no reply reports state that is not committed: the log a reply shows is in the database
//!    when the reply arrives;
//! 2. after a failed call the actor's state is the last committed state: the next read
//!    shows exactly what the database holds, and an op whose call failed never shows up;
//! 3. nothing acknowledged is lost across a crash: after every restart the database holds
//!    every acknowledged append and put;
//! 4. every acknowledged schedule fires at least once.
//!
//! `SEEDS` seeds run by default, spread over `THREADS` threads. A failure names its seed;
//! `KEEL_SEED=<n> cargo test -p keel-core --test seeded_faults` reruns just that one, and
//! `KEEL_SEEDS=<n>` runs the first n seeds instead of `SEEDS`. The workload, the faults and
//! the timing of calls follow from the seed; how the writer happens to batch commits does
//! not, so a rerun takes the same path up to that.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use keel_core::faults::{Failpoint, Fault, FaultInjector, Faults};
use keel_core::{
    ActionCall, ActionDone, ActorInfo, ActorType, ActorTypes, Durability, Effects, Encoding, Error,
    Host, KvWrite, Payload, Result, Runtime, RuntimeConfig, Schedule, ScheduleOp, StartRequest,
    StopReason, Target,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Seeds run by default.
const SEEDS: u64 = 1000;
/// Threads the seeds are spread over; each seed runs on its own single-threaded runtime.
const THREADS: u64 = 2;
/// The action timeout, in (paused) time.
const ACTION_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one seed may run in real time before it counts as hung; seeds take milliseconds.
const SEED_WATCHDOG: Duration = Duration::from_secs(60);
/// How long the end of a seed may advance time for the acknowledged schedules to fire.
const QUIESCE_STEPS: u32 = 400;

// ---------------------------------------------------------------------------------------
// The host: per-actor instances held in memory between calls, as the JS host holds them.

/// One live instance: the log as user code sees it, and the log last handed to core.
struct Instance {
    log: Vec<u64>,
    snapshot: Vec<u64>,
}

/// A host whose actors append op ids to a durable log. `throw` changes the instance and then
/// throws (the change is rolled back to the last state handed to core, as JS does); `hang`
/// changes the instance and never finishes.
#[derive(Default)]
struct SeededHost {
    instances: Mutex<HashMap<String, Instance>>,
    /// How many `hang` calls have changed their instance and begun to hang.
    hangs: AtomicU64,
    /// Notified (every waiter, no permit kept) each time `hangs` grows.
    hanging: Notify,
}

fn encode_log(log: &[u64]) -> Vec<u8> {
    serde_json::to_vec(log).unwrap()
}

fn decode_log(bytes: &[u8]) -> Vec<u64> {
    serde_json::from_slice(bytes).unwrap()
}

impl SeededHost {
    /// The output and effects of a call that leaves the instance as it is now.
    fn finish(instance: &mut Instance, mut effects: Effects) -> ActionDone {
        if instance.log != instance.snapshot {
            instance.snapshot = instance.log.clone();
            effects.state = Some(encode_log(&instance.log));
        }
        ActionDone {
            output: Payload::json(serde_json::to_string(&instance.log).unwrap()),
            effects,
        }
    }
}

#[async_trait]
impl Host for SeededHost {
    async fn start(&self, actor: &Arc<ActorInfo>, request: StartRequest) -> Result<Effects> {
        let created = request.state.is_none();
        let log = request.state.as_deref().map(decode_log).unwrap_or_default();
        self.instances.lock().insert(
            actor.id.to_string(),
            Instance {
                log: log.clone(),
                snapshot: log.clone(),
            },
        );
        Ok(Effects {
            state: created.then(|| encode_log(&log)),
            ..Effects::default()
        })
    }

    async fn action(&self, actor: &Arc<ActorInfo>, call: ActionCall) -> Result<ActionDone> {
        match self.run_action(actor, call) {
            Some(done) => done,
            None => {
                self.hangs.fetch_add(1, Ordering::AcqRel);
                self.hanging.notify_waiters();
                std::future::pending().await
            }
        }
    }

    async fn stop(&self, actor: &Arc<ActorInfo>, _reason: StopReason) -> Result<Effects> {
        self.instances.lock().remove(&*actor.id);
        Ok(Effects::default())
    }

    fn state_encoding(&self) -> Encoding {
        Encoding::Json
    }
}

impl SeededHost {
    /// Runs an action on the instance; `None` if it hangs (after changing the instance).
    fn run_action(&self, actor: &ActorInfo, call: ActionCall) -> Option<Result<ActionDone>> {
        let args: Vec<Value> = serde_json::from_slice(&call.args.bytes).unwrap();
        let op = args.first().and_then(Value::as_u64).unwrap_or(0);
        let mut instances = self.instances.lock();
        let instance = instances
            .get_mut(&*actor.id)
            .expect("the instance was started");
        Some(match call.action.as_str() {
            "append" => {
                instance.log.push(op);
                Ok(Self::finish(instance, Effects::default()))
            }
            "read" => Ok(Self::finish(instance, Effects::default())),
            "put" | "mark" => {
                let prefix = if call.action == "put" { "put" } else { "fired" };
                let kv = vec![KvWrite::Put {
                    key: format!("{prefix}{op}").into_bytes(),
                    value: op.to_string().into_bytes(),
                }];
                Ok(Self::finish(
                    instance,
                    Effects {
                        kv,
                        ..Effects::default()
                    },
                ))
            }
            "schedule" => {
                let schedule = Schedule {
                    id: format!("s{op}"),
                    at_ms: args[1].as_i64().unwrap(),
                    action: "mark".into(),
                    args: json!([op]).to_string().into_bytes(),
                };
                Ok(Self::finish(
                    instance,
                    Effects {
                        schedules: vec![ScheduleOp::Add(schedule)],
                        ..Effects::default()
                    },
                ))
            }
            "throw" => {
                instance.log.push(op);
                instance.log = instance.snapshot.clone();
                Err(Error::User {
                    code: "thrown".into(),
                    message: "user code threw".into(),
                    metadata: None,
                })
            }
            "hang" => {
                instance.log.push(op);
                return None;
            }
            other => panic!("unknown action {other}"),
        })
    }
}

fn types() -> Arc<ActorTypes> {
    let mut types = ActorTypes::default();
    let actions = ["append", "read", "put", "mark", "schedule", "throw", "hang"];
    types.add(ActorType::new("log", actions)).unwrap();
    Arc::new(types)
}

fn target(actor: usize) -> Target {
    Target::Key {
        name: "log".into(),
        key: vec![format!("a{actor}")],
        mode: keel_core::Resolve::GetOrCreate,
        input: None,
    }
}

/// What all seeds did, so the test can tell that the faults it is about happened at all.
#[derive(Debug, Default)]
struct Totals {
    seeds: u64,
    acked: u64,
    failed: u64,
    failed_commits: u64,
    failed_syncs: u64,
    crashes: HashMap<&'static str, u64>,
    timeouts: u64,
    schedules_fired: u64,
}

static TOTALS: Mutex<Option<Totals>> = Mutex::new(None);

fn count(f: impl FnOnce(&mut Totals)) {
    f(TOTALS.lock().get_or_insert_with(Totals::default));
}

// ---------------------------------------------------------------------------------------
// The storage faults: armed by the driver, consumed by the writer.

#[derive(Default)]
struct Plan {
    /// Fail this many more commits before their WAL write.
    fail: u32,
    /// Fail the next sync of the WAL. Never two in a row: a commit whose sync failed is
    /// followed at once by an empty one that makes its failure definite, and if that failed
    /// too the first one's outcome would be unknown, which the model does not track.
    fail_sync: bool,
    /// Crash at the `skip`-th next check of this failpoint.
    crash: Option<(Failpoint, u32)>,
}

#[derive(Default)]
struct SeededFaults {
    plan: Mutex<Plan>,
    /// Set once a crash was injected; cleared by the driver when it opens a new runtime.
    crashed: AtomicBool,
    /// Set while faults are off (the end of a seed).
    off: AtomicBool,
}

impl Faults for SeededFaults {
    fn check(&self, point: Failpoint) -> Fault {
        if self.off.load(Ordering::Acquire) {
            return Fault::Continue;
        }
        let mut plan = self.plan.lock();
        if let Some((at, skip)) = plan.crash {
            if at == point {
                if skip == 0 {
                    plan.crash = None;
                    count(|t| *t.crashes.entry(point_name(point)).or_default() += 1);
                    self.crashed.store(true, Ordering::Release);
                    return Fault::Crash;
                }
                plan.crash = Some((at, skip - 1));
            }
        }
        if point == Failpoint::AfterWriteBeforeSync && plan.fail_sync {
            plan.fail_sync = false;
            count(|t| t.failed_syncs += 1);
            return Fault::Fail;
        }
        if point == Failpoint::BeforeWalWrite && plan.fail > 0 {
            plan.fail -= 1;
            count(|t| t.failed_commits += 1);
            return Fault::Fail;
        }
        Fault::Continue
    }
}

fn point_name(point: Failpoint) -> &'static str {
    match point {
        Failpoint::BeforeWalWrite => "before_wal_write",
        Failpoint::AfterWriteBeforeSync => "after_write_before_sync",
        Failpoint::AfterCommitBeforeReply => "after_commit_before_reply",
    }
}

// ---------------------------------------------------------------------------------------
// The model: what each call was told.

/// What the caller of an op knows about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    /// Acknowledged: it must be durable.
    Acked,
    /// Failed: it must never take effect.
    Failed,
    /// Unknown (a crash, or the caller went away): it may or may not take effect.
    Maybe,
}

#[derive(Default)]
struct ActorModel {
    appends: HashMap<u64, Told>,
    puts: HashMap<u64, Told>,
    schedules: HashMap<u64, Told>,
}

/// What the database holds for one actor.
#[derive(Debug, Default)]
struct Durable {
    log: Vec<u64>,
    kv: HashSet<String>,
    schedules: HashSet<String>,
}

fn read_durable(conn: &rusqlite::Connection, actor: usize) -> Durable {
    let key = format!("a{actor}");
    let row: Option<(String, Option<Vec<u8>>)> = conn
        .query_row(
            "SELECT id, state FROM actors WHERE name = 'log' AND key = ?1",
            [&key],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .ok();
    let Some((id, state)) = row else {
        return Durable::default();
    };
    let strings = |sql: &str| -> HashSet<String> {
        let mut select = conn.prepare(sql).unwrap();
        let rows = select
            .query_map([&id], |row| row.get::<_, Vec<u8>>(0))
            .unwrap();
        rows.map(|bytes| String::from_utf8(bytes.unwrap()).unwrap())
            .collect()
    };
    Durable {
        log: state.as_deref().map(decode_log).unwrap_or_default(),
        kv: strings("SELECT key FROM kv WHERE actor_id = ?1"),
        schedules: strings("SELECT CAST(id AS BLOB) FROM schedules WHERE actor_id = ?1"),
    }
}

fn is_subset(small: &[u64], large: &[u64]) -> bool {
    let large: HashSet<_> = large.iter().collect();
    small.iter().all(|op| large.contains(op))
}

/// One seed's run: the runtime, the model and the checks.
struct Run {
    seed: u64,
    rng: StdRng,
    dir: tempfile::TempDir,
    durability: Durability,
    host: Arc<SeededHost>,
    faults: Arc<SeededFaults>,
    runtime: Option<Runtime>,
    /// A plain connection for reading what is durable, beside the runtime's own.
    reader: Option<rusqlite::Connection>,
    actors: Vec<ActorModel>,
    next_op: u64,
}

/// What a call came back with, reduced to what the model needs.
type Reply = std::result::Result<Option<Vec<u64>>, String>;

impl Run {
    fn new(seed: u64) -> Run {
        let mut rng = StdRng::seed_from_u64(seed);
        let actors = rng.random_range(1..=3);
        // tmpfs makes `synchronous=FULL` (and so the failpoint at the WAL sync) cheap.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let durability = if shm.is_dir() || rng.random_bool(0.1) {
            Durability::Full
        } else {
            Durability::Relaxed
        };
        Run {
            seed,
            rng,
            dir,
            durability,
            host: Arc::default(),
            faults: Arc::default(),
            runtime: None,
            reader: None,
            actors: (0..actors).map(|_| ActorModel::default()).collect(),
            next_op: 1,
        }
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("a runtime is open")
    }

    fn open(&mut self) {
        self.faults.crashed.store(false, Ordering::Release);
        *self.faults.plan.lock() = Plan::default();
        let config = RuntimeConfig {
            data_dir: self.dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            durability: self.durability,
            action_timeout: ACTION_TIMEOUT,
            hook_timeout: ACTION_TIMEOUT,
            faults: Some(FaultInjector(self.faults.clone())),
            ..RuntimeConfig::default()
        };
        let runtime = Runtime::open(
            config,
            types(),
            self.host.clone(),
            &CancellationToken::new(),
        )
        .unwrap_or_else(|err| panic!("seed {}: reopening failed: {err}", self.seed));
        self.runtime = Some(runtime);
        let path = self.dir.path().join(keel_core::store::DB_FILE);
        self.reader = Some(rusqlite::Connection::open(path).unwrap());
    }

    /// Drains the runtime (after a crash, an abandoned one whose writer is gone) and opens a
    /// new one on the same directory; then checks what survived.
    async fn restart(&mut self) {
        self.reader = None;
        if let Some(runtime) = self.runtime.take() {
            runtime.drain().await;
        }
        self.open();
        self.check_after_restart();
    }

    fn durable(&self, actor: usize) -> Durable {
        read_durable(self.reader.as_ref().unwrap(), actor)
    }

    /// Invariant 3, and the end of uncertainty: after a restart nothing is in flight, so an
    /// op whose outcome was unknown either took effect (and must stay) or never will.
    fn check_after_restart(&mut self) {
        for actor in 0..self.actors.len() {
            let durable = self.durable(actor);
            let seed = self.seed;
            let model = &mut self.actors[actor];
            let log: HashSet<u64> = durable.log.iter().copied().collect();
            for (op, told) in model.appends.iter_mut() {
                let present = log.contains(op);
                match told {
                    Told::Acked => assert!(
                        present,
                        "seed {seed}: acknowledged append {op} of a{actor} was lost: {:?}",
                        durable.log
                    ),
                    Told::Failed => assert!(
                        !present,
                        "seed {seed}: failed append {op} of a{actor} took effect: {:?}",
                        durable.log
                    ),
                    Told::Maybe => *told = if present { Told::Acked } else { Told::Failed },
                }
            }
            for op in &log {
                assert!(
                    model.appends.contains_key(op),
                    "seed {seed}: a{actor} holds op {op}, which was never an append"
                );
            }
            for (op, told) in model.puts.iter_mut() {
                let present = durable.kv.contains(&format!("put{op}"));
                match told {
                    Told::Acked => assert!(
                        present,
                        "seed {seed}: acknowledged put {op} of a{actor} was lost"
                    ),
                    Told::Failed => assert!(
                        !present,
                        "seed {seed}: failed put {op} of a{actor} took effect"
                    ),
                    Told::Maybe => *told = if present { Told::Acked } else { Told::Failed },
                }
            }
            for (op, told) in model.schedules.iter_mut() {
                let present = durable.schedules.contains(&format!("s{op}"))
                    || durable.kv.contains(&format!("fired{op}"));
                match told {
                    Told::Acked => assert!(
                        present,
                        "seed {seed}: acknowledged schedule {op} of a{actor} was lost"
                    ),
                    Told::Failed => assert!(
                        !present,
                        "seed {seed}: failed schedule {op} of a{actor} took effect"
                    ),
                    Told::Maybe => *told = if present { Told::Acked } else { Told::Failed },
                }
            }
        }
    }

    /// Checks a log a reply or the database showed: no op that failed, nothing that was
    /// never an append, and every append acknowledged before `acked_before` was taken.
    fn check_log(&self, actor: usize, log: &[u64], acked_before: &[u64], what: &str) {
        let seed = self.seed;
        let model = &self.actors[actor];
        for op in log {
            match model.appends.get(op) {
                Some(Told::Failed) => {
                    panic!("seed {seed}: {what} of a{actor} shows failed op {op}: {log:?}")
                }
                Some(_) => {}
                None => panic!("seed {seed}: {what} of a{actor} shows op {op}, never an append"),
            }
        }
        assert!(
            is_subset(acked_before, log),
            "seed {seed}: {what} of a{actor} lacks acknowledged ops: {log:?} vs {acked_before:?}"
        );
    }

    fn acked_appends(&self, actor: usize) -> Vec<u64> {
        let model = &self.actors[actor];
        model
            .appends
            .iter()
            .filter(|(_, told)| **told == Told::Acked)
            .map(|(op, _)| *op)
            .collect()
    }

    /// Invariant 1: a reply's log is durable when the reply arrives.
    fn check_reply(&self, actor: usize, log: &[u64], acked_before: &[u64]) {
        self.check_log(actor, log, acked_before, "a reply");
        let durable = self.durable(actor).log;
        assert!(
            is_subset(log, &durable),
            "seed {}: a reply of a{actor} reports uncommitted state: replied {log:?}, durable {durable:?}",
            self.seed
        );
    }

    /// Invariant 2: right after a failed call, a read shows exactly the committed state.
    async fn check_read_after_failure(&mut self, actor: usize) {
        let before = self.durable(actor).log;
        let Ok(Some(read)) = self.call(actor, "read", json!([0])).await else {
            // The read failed too (a commit it waited on failed, or a crash): nothing to see.
            return;
        };
        let after = self.durable(actor).log;
        assert!(
            is_subset(&before, &read) && is_subset(&read, &after),
            "seed {}: after a failed call a{actor} shows {read:?}, not its committed state {before:?}..{after:?}",
            self.seed
        );
        self.check_log(actor, &read, &[], "a read after a failure");
    }

    async fn call(&self, actor: usize, action: &str, args: Value) -> Reply {
        let result = self
            .runtime()
            .call(
                target(actor),
                action,
                Payload::json(args.to_string()),
                Encoding::Json,
            )
            .await;
        match result {
            Ok(output) => Ok(serde_json::from_slice::<Vec<u64>>(&output.bytes).ok()),
            Err(err) => Err(format!("{}.{}", err.group(), err.code())),
        }
    }

    fn new_op(&mut self) -> u64 {
        self.next_op += 1;
        self.next_op
    }

    /// Records what a call of `op` was told; an error is only a failure if no crash could
    /// have caused it.
    fn record(&mut self, actor: usize, kind: &str, op: u64, reply: &Reply) {
        let told = match reply {
            Ok(_) => Told::Acked,
            Err(_) if self.faults.crashed.load(Ordering::Acquire) => Told::Maybe,
            Err(_) => Told::Failed,
        };
        count(|t| match told {
            Told::Acked => t.acked += 1,
            Told::Failed => t.failed += 1,
            Told::Maybe => {}
        });
        if reply
            .as_ref()
            .err()
            .is_some_and(|e| e == "actor.action_timed_out")
        {
            count(|t| t.timeouts += 1);
        }
        let model = &mut self.actors[actor];
        let map = match kind {
            "append" | "throw" | "hang" => &mut model.appends,
            "put" => &mut model.puts,
            "schedule" => &mut model.schedules,
            other => unreachable!("no model for {other}"),
        };
        map.insert(op, told);
    }

    /// One call of an op-carrying action, checked.
    async fn single(&mut self, actor: usize, action: &'static str, extra: Option<Value>) {
        let op = self.new_op();
        let acked_before = self.acked_appends(actor);
        let args = match extra {
            Some(extra) => json!([op, extra]),
            None => json!([op]),
        };
        // Registered as unknown first, so a log that shows it mid-call is not "never an append".
        self.actors[actor].appends.entry(op).or_insert(Told::Maybe);
        let reply = if action == "hang" {
            let hangs = self.host.hangs.load(Ordering::Acquire);
            let call = self.call(actor, action, args);
            futures::pin_mut!(call);
            let reply = loop {
                let hanging = self.host.hanging.notified();
                futures::pin_mut!(hanging);
                hanging.as_mut().enable();
                if self.host.hangs.load(Ordering::Acquire) > hangs {
                    break None;
                }
                tokio::select! {
                    // The call failed before it reached user code (a crash, say).
                    reply = &mut call => break Some(reply),
                    // A hang began: look at the count again.
                    _ = &mut hanging => {}
                }
            };
            match reply {
                Some(reply) => reply,
                None => {
                    tokio::time::advance(ACTION_TIMEOUT).await;
                    call.await
                }
            }
        } else {
            self.call(actor, action, args).await
        };
        if !matches!(action, "append" | "throw" | "hang") {
            self.actors[actor].appends.remove(&op);
        }
        if let (Ok(Some(log)), "append") = (&reply, action) {
            self.check_reply(actor, log, &acked_before);
        }
        if matches!(action, "throw" | "hang") {
            assert!(reply.is_err(), "seed {}: {action} succeeded", self.seed);
        }
        self.record(actor, action, op, &reply);
        if reply.is_err() {
            self.check_read_after_failure(actor).await;
        }
    }

    /// Several appends to one actor at once: each runs on top of the ones before it, before
    /// they are durable.
    async fn burst(&mut self, actor: usize) {
        let count = self.rng.random_range(2..=5);
        let ops: Vec<u64> = (0..count).map(|_| self.new_op()).collect();
        for op in &ops {
            self.actors[actor].appends.insert(*op, Told::Maybe);
        }
        let acked_before = self.acked_appends(actor);
        let runtime = self.runtime();
        let calls = ops.iter().map(|op| {
            let args = json!([op]).to_string();
            async move {
                runtime
                    .call(target(actor), "append", Payload::json(args), Encoding::Json)
                    .await
            }
        });
        // Polled in order, so the calls reach the mailbox in order.
        let mut pending: Vec<_> = calls.map(Box::pin).collect();
        let mut replies: Vec<Option<Reply>> = vec![None; ops.len()];
        while replies.iter().any(Option::is_none) {
            let (index, result) = {
                let waiting = pending
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| replies[*i].is_none())
                    .map(|(i, call)| call.as_mut().map(move |result| (i, result)));
                futures::future::select_all(waiting).await.0
            };
            let reply = match result {
                Ok(output) => Ok(serde_json::from_slice::<Vec<u64>>(&output.bytes).ok()),
                Err(err) => Err(format!("{}.{}", err.group(), err.code())),
            };
            if let Ok(Some(log)) = &reply {
                self.check_reply(actor, log, &acked_before);
            }
            replies[index] = Some(reply);
        }
        drop(pending);
        let failed = replies.iter().any(|reply| matches!(reply, Some(Err(_))));
        for (op, reply) in ops.iter().zip(replies) {
            self.record(actor, "append", *op, &reply.unwrap());
        }
        if failed {
            self.check_read_after_failure(actor).await;
        }
    }

    /// An append whose caller goes away once it is queued, as when a client disconnects.
    fn abandoned(&mut self, actor: usize) {
        let op = self.new_op();
        self.actors[actor].appends.insert(op, Told::Maybe);
        let args = json!([op]).to_string();
        let call =
            self.runtime()
                .call(target(actor), "append", Payload::json(args), Encoding::Json);
        if let Some(result) = call.now_or_never() {
            if result.is_ok() {
                self.actors[actor].appends.insert(op, Told::Acked);
            }
        }
    }

    async fn step(&mut self) {
        let actor = self.rng.random_range(0..self.actors.len());
        match self.rng.random_range(0..100) {
            0..=29 => self.single(actor, "append", None).await,
            30..=37 => {
                let acked = self.acked_appends(actor);
                if let Ok(Some(log)) = self.call(actor, "read", json!([0])).await {
                    self.check_reply(actor, &log, &acked);
                }
            }
            38..=45 => self.single(actor, "put", None).await,
            46..=51 => {
                let at = self.runtime().now_ms() + self.rng.random_range(0..20_000);
                self.single(actor, "schedule", Some(json!(at))).await
            }
            52..=56 => self.single(actor, "throw", None).await,
            57..=59 => self.single(actor, "hang", None).await,
            60..=67 => self.burst(actor).await,
            68..=70 => self.abandoned(actor),
            71..=76 => self.faults.plan.lock().fail += self.rng.random_range(1..=3),
            77..=80 => self.faults.plan.lock().fail_sync = true,
            81..=84 => {
                let point = match self.rng.random_range(0..3) {
                    0 => Failpoint::BeforeWalWrite,
                    1 => Failpoint::AfterWriteBeforeSync,
                    _ => Failpoint::AfterCommitBeforeReply,
                };
                self.faults.plan.lock().crash = Some((point, self.rng.random_range(0..3)));
            }
            85..=87 => self.restart().await,
            _ => {
                let jump = Duration::from_millis(self.rng.random_range(0..40_000));
                tokio::time::advance(jump).await;
                settle().await;
            }
        }
        if self.faults.crashed.load(Ordering::Acquire) {
            self.restart().await;
        }
    }

    /// Faults off; time moves on until every acknowledged schedule has fired (invariant 4),
    /// first in the running runtime (a schedule whose run failed to commit is offered again
    /// without a restart), then after a clean restart, which settles the unknown ones.
    async fn quiesce(&mut self) {
        self.faults.off.store(true, Ordering::Release);
        self.fire_acknowledged("before a restart").await;
        self.restart().await;
        self.fire_acknowledged("after a restart").await;
        for (actor, model) in self.actors.iter().enumerate() {
            let durable = read_durable(self.reader.as_ref().unwrap(), actor);
            let fired = model
                .schedules
                .iter()
                .filter(|(op, _)| durable.kv.contains(&format!("fired{op}")))
                .count() as u64;
            count(|t| t.schedules_fired += fired);
            for (op, told) in &model.schedules {
                if *told == Told::Failed {
                    assert!(
                        !durable.kv.contains(&format!("fired{op}")),
                        "seed {}: failed schedule {op} of a{actor} fired",
                        self.seed
                    );
                }
            }
        }
        self.reader = None;
        self.runtime.take().unwrap().drain().await;
    }

    /// Advances time until every acknowledged schedule has fired.
    async fn fire_acknowledged(&self, when: &str) {
        for _ in 0..QUIESCE_STEPS {
            if self.unfired().await.is_empty() {
                return;
            }
            tokio::time::advance(Duration::from_secs(2)).await;
            settle().await;
        }
        let unfired = self.unfired().await;
        assert!(
            unfired.is_empty(),
            "seed {}: acknowledged schedules never fired {when}: {unfired:?}",
            self.seed
        );
    }

    /// Acknowledged schedules whose run has not committed, as (actor, op).
    async fn unfired(&self) -> Vec<(usize, u64)> {
        let mut unfired = Vec::new();
        for (actor, model) in self.actors.iter().enumerate() {
            let acked: Vec<u64> = model
                .schedules
                .iter()
                .filter(|(_, told)| **told == Told::Acked)
                .map(|(op, _)| *op)
                .collect();
            if acked.is_empty() {
                continue;
            }
            let info = self.runtime().resolve(target(actor)).await.unwrap();
            let keys = acked
                .iter()
                .map(|op| format!("fired{op}").into_bytes())
                .collect();
            let values = self.runtime().kv_get(&info.id, keys).await.unwrap();
            for (op, value) in acked.iter().zip(values) {
                if value.is_none() {
                    unfired.push((actor, *op));
                }
            }
        }
        unfired
    }
}

/// Whether the seeds ran with relaxed durability, which syncs no commit (no tmpfs here).
fn durability_is_relaxed() -> bool {
    !Path::new("/dev/shm").is_dir()
}

/// Lets every ready task run, giving the writer thread a moment, without moving the clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn run_seed(seed: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut run = Run::new(seed);
        run.open();
        let steps = run.rng.random_range(10..60);
        for _ in 0..steps {
            run.step().await;
        }
        run.quiesce().await;
    });
    count(|t| t.seeds += 1);
}

/// Runs one seed on its own thread; `false` if it failed. A seed that runs for longer than
/// `SEED_WATCHDOG` in real time is reported as hung instead of stalling the whole test.
fn run_watched(seed: u64) -> bool {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ok = std::panic::catch_unwind(|| run_seed(seed)).is_ok();
        // The watchdog may have given up on this seed already.
        let _ = done.send(ok);
    });
    match finished.recv_timeout(SEED_WATCHDOG) {
        Ok(ok) => ok,
        Err(_) => {
            eprintln!("seed {seed} hung for {SEED_WATCHDOG:?}");
            false
        }
    }
}

#[test]
fn random_workloads_with_faults_keep_every_invariant() {
    let seeds: Vec<u64> = match std::env::var("KEEL_SEED") {
        Ok(seed) => vec![seed.parse().expect("KEEL_SEED is a number")],
        Err(_) => {
            let count = std::env::var("KEEL_SEEDS")
                .ok()
                .map(|n| n.parse().expect("KEEL_SEEDS is a number"))
                .unwrap_or(SEEDS);
            (0..count).collect()
        }
    };
    let failed = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let seeds: Vec<u64> = seeds
                .iter()
                .copied()
                .filter(|seed| seed % THREADS == thread)
                .collect();
            let failed = failed.clone();
            std::thread::spawn(move || {
                for seed in seeds {
                    if std::env::var_os("KEEL_SEED_PROGRESS").is_some() {
                        eprintln!("seed {seed}");
                    }
                    if !run_watched(seed) {
                        failed.lock().push(seed);
                        return;
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let failed = failed.lock();
    assert!(
        failed.is_empty(),
        "seeds {failed:?} failed; rerun one with KEEL_SEED=<seed> cargo test -p keel-core --test seeded_faults"
    );
    let totals = TOTALS.lock().take().unwrap_or_default();
    eprintln!("{totals:?}");
    // Over the full run every kind of fault must actually have happened.
    if seeds.len() as u64 >= SEEDS {
        assert!(totals.failed_commits > 0 && totals.timeouts > 0 && totals.schedules_fired > 0);
        assert!(
            totals.failed_syncs > 0 || durability_is_relaxed(),
            "{totals:?}"
        );
        for point in [
            Failpoint::BeforeWalWrite,
            Failpoint::AfterWriteBeforeSync,
            Failpoint::AfterCommitBeforeReply,
        ] {
            assert!(
                totals
                    .crashes
                    .get(point_name(point))
                    .is_some_and(|n| *n > 0),
                "no crash at {point:?}: {totals:?}"
            );
        }
    }
}
