// Load generator for the bench, run by run.mjs as its own child process so that it never
// shares an event loop (or its pauses) with the server it measures.
//
// Usage: node load.mjs '<json config>'
//   config: { port, workload, timeCapMs, requestTimeoutMs, ...per-workload fields }
//   - "sequential" | "concurrent": { actors, maxCalls, durationMs, warmupCallsPerActor }
//   - "wake":   { probePort, actors }                         (keel only, see lifecycle below)
//   - "memory": { probePort, actors, concurrency, warmupActors }
//   - "alarms": { actors, alarmsPerActor, leadMs, warmupAlarmsPerActor }
// Prints one JSON result line on stdout; progress and errors go to stderr.
//
// Every request goes to 127.0.0.1 only, and every loop is bounded both in calls and in time.

import http from "node:http";

const config = JSON.parse(process.argv[2]);
const HOST = "127.0.0.1";

// One socket per in-flight request: with keep-alive each actor loop reuses its own
// connection, so the figures measure request handling, not TCP handshakes.
const agent = new http.Agent({ keepAlive: true, maxSockets: config.concurrency ?? config.actors, noDelay: true });

/** POSTs a JSON body; resolves `{status, body}` or rejects on a network error or timeout. */
function post(path, payload) {
  return request("POST", config.port, path, JSON.stringify(payload));
}

/** One HTTP request to 127.0.0.1:`port`; resolves `{status, body}` with the body parsed as JSON. */
function request(method, port, path, text) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: HOST,
        port,
        method,
        path,
        agent,
        headers: text === undefined ? {} : { "content-type": "application/json", "content-length": Buffer.byteLength(text) },
        timeout: config.requestTimeoutMs,
      },
      (res) => {
        const chunks = [];
        res.on("data", (chunk) => chunks.push(chunk));
        res.on("end", () => {
          const raw = Buffer.concat(chunks).toString("utf8");
          let body;
          try {
            body = JSON.parse(raw);
          } catch {
            body = raw;
          }
          resolve({ status: res.statusCode, body });
        });
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new Error(`request timed out after ${config.requestTimeoutMs} ms`)));
    req.on("error", reject);
    req.end(text);
  });
}

/** Calls `action` on the actor `name`/`key`; resolves the output or rejects with the error. */
async function call(name, key, action, args = []) {
  const { status, body } = await post(`/v1/actors/${name}/actions/${action}`, { key, args });
  if (status !== 200) throw new Error(`${name}.${action} ${JSON.stringify(key)}: HTTP ${status}: ${JSON.stringify(body).slice(0, 200)}`);
  return body.output;
}

const increment = (key) => post("/v1/actors/counter/actions/increment", { key, args: [1] });
const getCount = (key) => post("/v1/actors/counter/actions/getCount", { key, args: [] });

/**
 * Per-actor bookkeeping. `acked` counts increments that got a 200: the durable count must equal
 * it at the end. `unknown` counts increments that failed without a reply, whose effect we can't
 * know; any of them makes the final check inconclusive instead of wrong.
 */
function newActor(i) {
  return { key: [`${config.workload}-${i}`], acked: 0, unknown: 0, outputMismatches: 0 };
}

/**
 * Sends one increment and records it. With one request in flight per actor, the reply must be
 * exactly the number of increments acknowledged so far, so each reply is checked too.
 */
async function step(actor, errors) {
  try {
    const { status, body } = await increment(actor.key);
    if (status !== 200) {
      // A rejection the server answered: nothing was committed.
      errors.push(`HTTP ${status}: ${JSON.stringify(body).slice(0, 200)}`);
      return false;
    }
    actor.acked += 1;
    if (body.output !== actor.acked) actor.outputMismatches += 1;
    return true;
  } catch (err) {
    actor.unknown += 1;
    errors.push(String(err.message ?? err));
    return false;
  }
}

/** Nearest-rank percentile of a sorted array. */
function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

const round3 = (x) => (x === null ? null : Math.round(x * 1000) / 1000);

async function counterWorkload() {
  const actors = Array.from({ length: config.actors }, (_, i) => newActor(i));
  const errors = [];

  // Warm-up: creates every actor (its first call pays for creation and the first insert),
  // opens the keep-alive sockets and lets V8 optimise the hot paths on both sides. These
  // calls are counted for the final check but not timed.
  await Promise.all(
    actors.map(async (actor) => {
      for (let i = 0; i < config.warmupCallsPerActor; i++) await step(actor, errors);
    }),
  );
  const warmupCalls = actors.reduce((n, a) => n + a.acked, 0);
  const warmupErrors = errors.length;

  // Measurement. Each actor has its own loop that awaits its own reply before the next call,
  // so exactly `actors` requests are in flight. Loops stop at the call budget or the deadline,
  // whichever comes first; requests already sent are allowed to finish.
  const latencies = new Float64Array(config.maxCalls);
  let issued = 0;
  let completed = 0;
  const start = performance.now();
  const deadline = start + config.durationMs;
  await Promise.all(
    actors.map(async (actor) => {
      while (issued < config.maxCalls && performance.now() < deadline) {
        issued += 1;
        const t0 = performance.now();
        const ok = await step(actor, errors);
        if (ok) latencies[completed++] = performance.now() - t0;
      }
    }),
  );
  const elapsedMs = performance.now() - start;

  // Correctness: the durable count of every actor must equal its acknowledged increments.
  const mismatches = [];
  for (const actor of actors) {
    const { status, body } = await getCount(actor.key);
    const expected = actor.acked;
    const actual = status === 200 ? body.output : `HTTP ${status}`;
    const consistent = actor.unknown === 0 ? actual === expected : actual >= expected && actual <= expected + actor.unknown;
    if (!consistent || actor.outputMismatches > 0) {
      mismatches.push({ key: actor.key, expected, actual, unknown: actor.unknown, outputMismatches: actor.outputMismatches });
    }
  }

  const sorted = latencies.subarray(0, completed).sort();
  const sum = sorted.reduce((a, b) => a + b, 0);
  const result = {
    workload: config.workload,
    actors: config.actors,
    warmupCalls,
    calls: completed,
    errors: errors.length - warmupErrors,
    warmupErrors,
    firstErrors: errors.slice(0, 5),
    elapsedMs: round3(elapsedMs),
    callsPerSec: Math.round((completed / elapsedMs) * 1000 * 10) / 10,
    latencyMs: {
      p50: round3(percentile(sorted, 50)),
      p99: round3(percentile(sorted, 99)),
      mean: round3(completed ? sum / completed : null),
      max: round3(percentile(sorted, 100)),
    },
    verify: {
      ok: mismatches.length === 0,
      actorsChecked: actors.length,
      ackedTotal: actors.reduce((n, a) => n + a.acked, 0),
      mismatches: mismatches.slice(0, 10),
    },
  };
  return result;
}

// A hard stop in case a server hangs beyond the per-request timeouts.
const hardStop = setTimeout(() => {
  console.error(`load: gave up after ${config.timeCapMs} ms`);
  process.exit(4);
}, config.timeCapMs);
hardStop.unref();

// ---------------------------------------------------------------------------------------------
// Life-cycle workloads (keel only; the actor types are in servers/lifecycle.mjs). `wake` and
// `memory` read the server's probe (servers/keel.mjs, KEEL_BENCH_PROBE=1): a separate listener
// that is not an actor, so asking it wakes nothing.

const sleepMs = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The server's probe (see servers/keel.mjs), after a full GC if `gc`. */
async function probe(gc = false) {
  const { status, body } = await request("GET", config.probePort, gc ? "/probe?gc=1" : "/probe");
  if (status !== 200) throw new Error(`probe: HTTP ${status}`);
  return body;
}

/** Polls the probe until no actor is awake; resolves how long that took. Bounded by `timeoutMs`. */
async function untilAllAsleep(timeoutMs = 60_000) {
  const start = performance.now();
  for (let polls = 0; ; polls++) {
    const { live } = await probe();
    if (live === 0) return performance.now() - start;
    if (performance.now() - start > timeoutMs) throw new Error(`${live} actors still awake after ${timeoutMs} ms`);
    await sleepMs(polls < 20 ? 10 : 50);
  }
}

/** Runs `fn(i)` for i in [0, count) with `concurrency` loops; every call is awaited. */
async function forEachConcurrently(count, concurrency, fn) {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, count) }, async () => {
      while (next < count) await fn(next++);
    }),
  );
}

function latencySummary(times) {
  const sorted = Float64Array.from(times).sort();
  return {
    count: sorted.length,
    p50: round3(percentile(sorted, 50)),
    p99: round3(percentile(sorted, 99)),
    mean: round3(sorted.length ? sorted.reduce((a, b) => a + b, 0) / sorted.length : null),
    max: round3(percentile(sorted, 100)),
  };
}

/**
 * Wake latency. Every call is one at a time, `touch` on a `napper` (a durable write, like the
 * counter's increment). Each actor is created by one untimed call; then every actor is put to
 * sleep (`nap`) and, once the probe says none is awake, each actor gets two timed calls back to
 * back: the first wakes it, the second finds it awake. Pairing them on the same actor at the
 * same moment keeps a noisy machine's drift out of the ratio. The outputs must count on across
 * the sleep (1, then 2 and 3), which checks that the state survived.
 */
async function wake() {
  const n = config.actors;
  const mismatches = [];
  let mismatchCount = 0;
  const expect = (key, got, want) => {
    if (got === want) return;
    mismatchCount += 1;
    if (mismatches.length < 10) mismatches.push({ key, got, want });
  };
  const timedTouch = async (key, want, into) => {
    const t0 = performance.now();
    const out = await call("napper", key, "touch");
    into.push(performance.now() - t0);
    expect(key, out, want);
  };

  // Warm-up: the same cycle on other actors, untimed, so both paths are compiled and the
  // socket is open before anything is timed.
  const warm = Math.min(100, n);
  for (let i = 0; i < warm; i++) await call("napper", [`warm-${i}`], "touch");
  for (let i = 0; i < warm; i++) await call("napper", [`warm-${i}`], "nap");
  await untilAllAsleep();
  for (let i = 0; i < warm; i++) {
    await call("napper", [`warm-${i}`], "touch");
    await call("napper", [`warm-${i}`], "touch");
  }

  for (let i = 0; i < n; i++) expect([`wake-${i}`], await call("napper", [`wake-${i}`], "touch"), 1);
  for (let i = 0; i < n; i++) await call("napper", [`wake-${i}`], "nap");
  const waitedMs = await untilAllAsleep();

  const asleep = [];
  const awake = [];
  for (let i = 0; i < n; i++) {
    await timedTouch([`wake-${i}`], 2, asleep);
    await timedTouch([`wake-${i}`], 3, awake);
  }

  return {
    workload: "wake",
    actors: n,
    awakeMs: latencySummary(awake),
    wakeMs: latencySummary(asleep),
    waitAllAsleepMs: round3(waitedMs),
    verify: { ok: mismatchCount === 0, mismatchCount, mismatches },
  };
}

/**
 * Memory per actor, from the server's RSS (after a full GC) at four points:
 *   base:    after a warm-up wave of `warmupActors` actors that woke and slept again, the
 *            same shape as the next wave, so V8's young generation and the allocators have
 *            already grown to what that traffic needs;
 *   asleep:  after `actors` more were created, touched and put to sleep, at most
 *            `concurrency` of them awake at a time (so what remains is the cost of sleeping);
 *   awake:   after another `actors` were created and touched, all of them still awake
 *            (`resident` sleeps after 10 minutes);
 *   napped:  after those went to sleep too (what the process gives back).
 */
async function memory() {
  const n = config.actors;
  const c = config.concurrency;
  const errors = [];
  const touchAndNap = (prefix) => async (i) => {
    const key = [`${prefix}-${i}`];
    const out = await call("resident", key, "touch");
    if (out !== 1) errors.push(`${key}: touch returned ${out}`);
    await call("resident", key, "nap");
  };

  await forEachConcurrently(config.warmupActors, c, touchAndNap("warm"));
  await untilAllAsleep();
  const base = await probe(true);

  await forEachConcurrently(n, c, touchAndNap("sleeper"));
  await untilAllAsleep();
  const asleep = await probe(true);

  await forEachConcurrently(n, c, async (i) => {
    const out = await call("resident", [`awake-${i}`], "touch");
    if (out !== 1) errors.push(`awake-${i}: touch returned ${out}`);
  });
  const awake = await probe(true);
  if (awake.live !== n) errors.push(`expected ${n} awake actors, the probe counted ${awake.live}`);

  await forEachConcurrently(n, c, (i) => call("resident", [`awake-${i}`], "nap"));
  await untilAllAsleep();
  const napped = await probe(true);

  const perActor = (to, from, field) => Math.round((to[field] - from[field]) / n);
  // Where the RSS went: V8's heap (used, and committed), the other anonymous memory (the Rust
  // engine, Node's own allocations) and mapped files.
  const breakdown = (to, from) => {
    const out = {};
    for (const field of ["rss", "rssAnon", "rssFile", "heapTotal", "heapUsed", "external"]) out[field] = perActor(to, from, field);
    out.anonOutsideV8Heap = Math.round((to.rssAnon - to.heapTotal - (from.rssAnon - from.heapTotal)) / n);
    return out;
  };
  return {
    workload: "memory",
    actors: n,
    gc: base.gc,
    probes: { base, asleep, awake, napped },
    bytesPerActor: {
      asleep: perActor(asleep, base, "rss"),
      awake: perActor(awake, asleep, "rss"),
      // What stays in the process after the awake ones slept too (allocator and V8 pools).
      napped: perActor(napped, asleep, "rss"),
    },
    breakdownPerActor: { asleep: breakdown(asleep, base), awake: breakdown(awake, asleep), napped: breakdown(napped, asleep) },
    errors: errors.length,
    verify: { ok: errors.length === 0 && base.gc, firstErrors: errors.slice(0, 5) },
  };
}

/** Sums `firedCount` over the timer actors: `{fired, firstAt, lastAt}` (min first, max last). */
async function firedTotals(keys) {
  const counts = await Promise.all(keys.map((key) => call("timer", key, "firedCount")));
  return {
    fired: counts.reduce((n, c) => n + c.fired, 0),
    firstAt: Math.min(...counts.map((c) => c.firstAt ?? Infinity)),
    lastAt: Math.max(...counts.map((c) => c.lastAt ?? -Infinity)),
    perActor: counts.map((c) => c.fired),
  };
}

/** Polls until `want` alarms fired in total; bounded by `timeoutMs`. */
async function untilFired(keys, want, timeoutMs) {
  const start = Date.now();
  for (;;) {
    const totals = await firedTotals(keys);
    if (totals.fired >= want || Date.now() - start > timeoutMs) return totals;
    await sleepMs(100);
  }
}

/**
 * Schedule throughput. Each of `actors` timer actors sets `alarmsPerActor` schedules in one
 * action, all due at the same epoch millisecond `leadMs` from now. The span runs from that due
 * time to the last `fired` run (its own Date.now(), noted in state, so the slow poll does not
 * blur it); alarms/s = alarms / span. A warm-up burst runs first, and afterwards the count must
 * be exact and stay so for a second (every alarm ran once).
 */
async function alarms() {
  const keys = Array.from({ length: config.actors }, (_, i) => [`timer-${i}`]);
  const perActor = config.alarmsPerActor;
  const total = perActor * keys.length;

  // Warm-up: creates the actors and runs a small burst through the same path.
  const warmDue = Date.now() + 300;
  await Promise.all(keys.map((key) => call("timer", key, "setManyAt", [config.warmupAlarmsPerActor, warmDue])));
  const warmWant = config.warmupAlarmsPerActor * keys.length;
  const warm = await untilFired(keys, warmWant, 60_000);
  if (warm.fired !== warmWant) throw new Error(`warm-up: ${warm.fired} of ${warmWant} alarms fired`);

  const setupStart = Date.now();
  const dueAt = setupStart + config.leadMs;
  await Promise.all(keys.map((key) => call("timer", key, "setManyAt", [perActor, dueAt])));
  const setupMs = Date.now() - setupStart;
  if (Date.now() >= dueAt) throw new Error(`setting ${total} schedules took ${setupMs} ms, past the ${config.leadMs} ms lead; raise --alarm-lead`);

  await sleepMs(dueAt - Date.now());
  const want = warmWant + total;
  const done = await untilFired(keys, want, config.timeCapMs - config.leadMs - 20_000);
  const seenAt = Date.now();
  await sleepMs(1000);
  const after = await firedTotals(keys);

  const spanMs = done.lastAt - dueAt;
  const ok = done.fired === want && after.fired === want;
  return {
    workload: "alarms",
    actors: keys.length,
    alarms: total,
    setupMs,
    leadMs: config.leadMs,
    firstLagMs: done.firstAt - dueAt,
    spanMs,
    alarmsPerSec: spanMs > 0 ? Math.round((total / spanMs) * 1000 * 10) / 10 : null,
    pollSawAllAfterMs: seenAt - dueAt,
    fired: after.fired - warmWant,
    verify: {
      ok,
      expected: total,
      firedAtFirstCheck: done.fired - warmWant,
      firedOneSecondLater: after.fired - warmWant,
      perActorMin: Math.min(...after.perActor) - config.warmupAlarmsPerActor,
      perActorMax: Math.max(...after.perActor) - config.warmupAlarmsPerActor,
    },
  };
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const workload = { sequential: counterWorkload, concurrent: counterWorkload, wake, memory, alarms }[config.workload];
  if (!workload) throw new Error(`unknown workload ${config.workload}`);
  const result = await workload();
  agent.destroy();
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((err) => {
  console.error("load:", err);
  process.exit(1);
});
