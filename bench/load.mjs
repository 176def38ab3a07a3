// Load generator for the bench, run by run.mjs as its own child process so that it never
// shares an event loop (or its pauses) with the server it measures.
//
// Usage: node load.mjs '<json config>'
//   config: { port, workload, timeCapMs, requestTimeoutMs, ...per-workload fields }
//   - "sequential" | "concurrent": { actors, maxCalls, durationMs, warmupCallsPerActor }
//   - "ws-sequential" | "ws-concurrent": the same, over one WebSocket connection per actor
//   - "http-sequential" | "http-concurrent" (and -relaxed): the first two, when wrk is missing
//   - "broadcast": { actors, connections, bursts, warmupBursts, payloadBytes, connectConcurrency }
//   - "many-actors": { actors, concurrency }: each actor created by one call; then server RSS
//   - `peer: "rivetkit"` sends the HTTP counter calls to the RivetKit peer's routes
//   - "wake":   { probePort, actors }                         (keel only, see lifecycle below)
//   - "memory": { probePort, actors, concurrency, warmupActors }
//   - "alarms": { actors, alarmsPerActor, leadMs, warmupAlarmsPerActor }
// Prints one JSON result line on stdout; progress and errors go to stderr.
//
// Every request goes to 127.0.0.1 only, and every loop is bounded both in calls and in time.

import http from "node:http";
import { readFileSync } from "node:fs";
import WebSocket from "ws";

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

/**
 * Per-actor bookkeeping. `acked` counts increments that got a 200: the durable count must equal
 * it at the end. `unknown` counts increments that failed without a reply, whose effect we can't
 * know; any of them makes the final check inconclusive instead of wrong.
 */
function newActor(i) {
  return { key: [`${config.workload}-${i}`], acked: 0, unknown: 0, outputMismatches: 0 };
}

/** An error the server answered (HTTP status or an error reply): nothing was committed. */
function answered(message) {
  const err = new Error(message);
  err.answered = true;
  return err;
}

/**
 * One call on `actor`: over its WebSocket connection if it has one (the ws-* workloads),
 * else over HTTP. Resolves the output; rejects with `err.answered` set if the server refused.
 */
async function callOn(actor, action, args) {
  if (actor.conn) return actor.conn.call(action, args);
  if (config.peer === "rivetkit") return callRivetkit(actor, action, args);
  const { status, body } = await post(`/v1/actors/counter/actions/${action}`, { key: actor.key, args });
  if (status !== 200) throw answered(`HTTP ${status}: ${JSON.stringify(body).slice(0, 200)}`);
  return body.output;
}

/**
 * The same call on the RivetKit peer (servers/rivetkit.mjs): the actor id of the key is asked
 * for once (`PUT /actors`, get or create) and kept, then the action goes to
 * `POST /gateway/{id}/action/{name}` with `{"args":[...]}`. RivetKit's own client asks for the
 * id before every action; the bench does it once per actor.
 */
async function callRivetkit(actor, action, args) {
  if (actor.rivetkitId === undefined) {
    const text = JSON.stringify({ name: "counter", key: actor.key[0], runner_name_selector: "default", crash_policy: "sleep" });
    const { status, body } = await request("PUT", config.port, "/actors", text);
    if (status !== 200) throw answered(`PUT /actors: HTTP ${status}: ${JSON.stringify(body).slice(0, 200)}`);
    actor.rivetkitId = body.actor.actor_id;
  }
  const { status, body } = await post(`/gateway/${encodeURIComponent(actor.rivetkitId)}/action/${action}`, { args });
  if (status !== 200) throw answered(`HTTP ${status}: ${JSON.stringify(body).slice(0, 200)}`);
  return body.output;
}

/**
 * Sends one increment and records it. With one request in flight per actor, the reply must be
 * exactly the number of increments acknowledged so far, so each reply is checked too.
 */
async function step(actor, errors) {
  try {
    const output = await callOn(actor, "increment", [1]);
    actor.acked += 1;
    if (output !== actor.acked) actor.outputMismatches += 1;
    return true;
  } catch (err) {
    // A refusal committed nothing; a lost socket or a timeout leaves the effect unknown.
    if (!err.answered) actor.unknown += 1;
    errors.push(String(err.message ?? err));
    return false;
  }
}

/**
 * CPU time used so far, in ms: this process's (`client`) and the server's (`server`, from
 * /proc/<serverPid>/stat, in clock ticks of 10 ms), so a workload can say where its time went.
 */
const CLK_TCK = 100; // USER_HZ, which /proc reports in; 100 on Linux/x86-64
function cpuNow() {
  const { user, system } = process.cpuUsage();
  let server = null;
  try {
    const stat = readFileSync(`/proc/${config.serverPid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    server = ((Number(fields[11]) + Number(fields[12])) * 1000) / CLK_TCK;
  } catch {
    // No pid given, or the server is gone: report the client's only.
  }
  return { client: (user + system) / 1000, server };
}

/** CPU ms used since `from` (a `cpuNow()`), each side divided by `per`. */
function cpuSince(from, per = 1) {
  const now = cpuNow();
  const div = (x) => (x === null ? null : round3(x / per));
  return { client: div(now.client - from.client), server: from.server === null || now.server === null ? null : div(now.server - from.server) };
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
  const overWs = config.workload.startsWith("ws-");
  if (overWs) {
    // One connection per actor, opened (and admitted) before anything is timed.
    await forEachConcurrently(actors.length, 16, async (i) => {
      actors[i].conn = await openConnection("counter", actors[i].key);
    });
  }

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
  const cpuStart = cpuNow();
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
  const cpuMs = cpuSince(cpuStart);

  // Correctness: the durable count of every actor must equal its acknowledged increments.
  const mismatches = [];
  for (const actor of actors) {
    const expected = actor.acked;
    const actual = await callOn(actor, "getCount", []).catch((err) => String(err.message ?? err));
    const consistent = actor.unknown === 0 ? actual === expected : actual >= expected && actual <= expected + actor.unknown;
    if (!consistent || actor.outputMismatches > 0) {
      mismatches.push({ key: actor.key, expected, actual, unknown: actor.unknown, outputMismatches: actor.outputMismatches });
    }
  }

  if (overWs) await closeAll(actors.map((a) => a.conn));

  const sorted = latencies.subarray(0, completed).sort();
  const sum = sorted.reduce((a, b) => a + b, 0);
  const result = {
    workload: config.workload,
    transport: overWs ? "ws" : "http",
    actors: config.actors,
    warmupCalls,
    calls: completed,
    errors: errors.length - warmupErrors,
    warmupErrors,
    firstErrors: errors.slice(0, 5),
    elapsedMs: round3(elapsedMs),
    callsPerSec: Math.round((completed / elapsedMs) * 1000 * 10) / 10,
    // CPU time of the timed phase, and per call in µs (ms per 1,000 calls).
    cpuMs,
    cpuUsPerCall: { client: round3((cpuMs.client / completed) * 1000), server: cpuMs.server === null ? null : round3((cpuMs.server / completed) * 1000) },
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

/**
 * `actors` distinct counters, each created by its first call (`increment` of 1, which must
 * answer 1), `concurrency` calls in flight. Timed from the first call to the last reply;
 * afterwards the server's RSS is read from /proc (no GC is forced: what a user would see).
 */
async function manyActors() {
  const errors = [];
  let wrong = 0;
  const cpuStart = cpuNow();
  const start = performance.now();
  await forEachConcurrently(config.actors, config.concurrency, async (i) => {
    const actor = newActor(i);
    try {
      const out = await callOn(actor, "increment", [1]);
      if (out !== 1) wrong += 1;
    } catch (err) {
      if (errors.length < 5) errors.push(String(err.message ?? err));
      wrong += 1;
    }
  });
  const elapsedMs = performance.now() - start;
  const cpuMs = cpuSince(cpuStart);
  const status = readFileSync(`/proc/${config.serverPid}/status`, "utf8");
  const kb = (field) => Number.parseInt(status.split("\n").find((l) => l.startsWith(`${field}:`))?.split(":")[1] ?? "NaN", 10);
  return {
    workload: "many-actors",
    actors: config.actors,
    concurrency: config.concurrency,
    elapsedMs: round3(elapsedMs),
    actorsPerSec: Math.round((config.actors / elapsedMs) * 1000 * 10) / 10,
    cpuMs,
    serverRssBytes: kb("VmRSS") * 1024,
    serverRssAnonBytes: kb("RssAnon") * 1024,
    errors: wrong,
    verify: { ok: wrong === 0, firstErrors: errors },
  };
}

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
// WebSocket workloads. The client is a raw `ws` socket speaking the JSON frames of keel's
// connection protocol (text frames), the same code against both servers, so the client's cost
// is the same for both.

/** The soft limit on open files of this process (each socket is one). */
function fdLimit() {
  const line = readFileSync("/proc/self/limits", "utf8")
    .split("\n")
    .find((l) => l.startsWith("Max open files"));
  return line ? Number(line.split(/\s{2,}/)[1]) : null;
}

/**
 * Opens a connection to the actor `name`/`key` and sends `init`; resolves once the server
 * answers `ready`. The connection has `call(action, args)`, which resolves the reply's output
 * or rejects (with `err.answered` set when the server replied with an error), and passes each
 * `event` frame to `onEvent(message, receivedAt)`.
 */
function openConnection(name, key, { subs = [], onEvent = null } = {}) {
  return new Promise((resolve, reject) => {
    const url = `ws://${HOST}:${config.port}/v1/actors/${encodeURIComponent(name)}/connect`;
    const ws = new WebSocket(url, { perMessageDeflate: false, handshakeTimeout: config.requestTimeoutMs });
    const pending = new Map();
    let nextId = 1;
    let ready = false;
    let closed = null;
    const conn = {
      ws,
      call(action, args = []) {
        if (closed) return Promise.reject(closed);
        return new Promise((res, rej) => {
          const id = nextId++;
          const timer = setTimeout(() => {
            pending.delete(id);
            rej(new Error(`${action} timed out after ${config.requestTimeoutMs} ms`));
          }, config.requestTimeoutMs);
          pending.set(id, { res, rej, timer });
          ws.send(JSON.stringify({ t: "call", id, action, args }));
        });
      },
    };
    ws.on("open", () => ws.send(JSON.stringify({ t: "init", key, params: null, subs })));
    ws.on("message", (data, isBinary) => {
      const receivedAt = performance.now();
      let msg;
      try {
        if (isBinary) throw new Error("a binary frame on a JSON connection");
        msg = JSON.parse(data.toString("utf8"));
      } catch (err) {
        ws.terminate();
        closed = err;
        return;
      }
      if (msg.t === "reply") {
        const call = pending.get(msg.id);
        if (!call) return;
        pending.delete(msg.id);
        clearTimeout(call.timer);
        if (msg.error) call.rej(answered(`${msg.error.group}.${msg.error.code}: ${msg.error.message}`));
        else call.res(msg.output);
      } else if (msg.t === "event") {
        onEvent?.(msg, receivedAt);
      } else if (msg.t === "ready") {
        ready = true;
        resolve(conn);
      } else if (msg.t === "error" && !ready) {
        reject(new Error(`connection refused: ${JSON.stringify(msg.error).slice(0, 200)}`));
      }
    });
    ws.on("error", (err) => {
      if (!ready) reject(err.code === "EMFILE" ? new Error(`out of file descriptors (limit ${fdLimit()}): ${err.message}`) : err);
    });
    ws.on("close", (code, reason) => {
      closed = new Error(`socket closed (${code} ${reason})`);
      if (!ready) reject(closed);
      for (const call of pending.values()) {
        clearTimeout(call.timer);
        call.rej(closed);
      }
      pending.clear();
    });
  });
}

/** Closes connections with a close handshake; stragglers are terminated after 5 s. */
async function closeAll(conns) {
  const open = conns.filter((c) => c && c.ws.readyState !== WebSocket.CLOSED);
  const done = Promise.all(open.map((c) => new Promise((resolve) => {
    c.ws.once("close", resolve);
    c.ws.close(1000);
  })));
  const timer = setTimeout(() => open.forEach((c) => c.ws.terminate()), 5000);
  await done;
  clearTimeout(timer);
}

/**
 * Broadcast fan-out. `connections` sockets spread evenly over `actors` rooms, all subscribed
 * to the room's event. A burst sends one `broadcast` action to every room (over the room's
 * first connection), as fast as the client can, and ends once every connection has received
 * that burst's event and every action its reply. Timed: from sending the burst's first action
 * to the last connection receiving its event (fan-out), and per connection from sending its
 * room's action to receiving the event (delivery). Bursts run one after another, after
 * `warmupBursts` untimed ones. Checks: each connection gets exactly its room's event once
 * per burst; each reply is the room's count so far; at the end each room's `sent` equals the
 * number of bursts.
 */
async function broadcast() {
  const rooms = config.actors;
  const perRoom = config.connections / rooms;
  const total = config.connections;
  if (!Number.isInteger(perRoom)) throw new Error("connections must be a multiple of actors");
  const EVENT = "tick";

  const errors = [];
  const problem = (text) => {
    if (errors.length < 1000) errors.push(text);
  };
  // Per connection: the burst it last received, and when.
  const lastBurst = new Int32Array(total).fill(-1);
  const sentAt = new Float64Array(rooms);
  let burst = -1;
  let received = 0;
  let allReceived = null;
  const onEvent = (index, room) => (msg, at) => {
    const data = msg.data;
    if (msg.event !== EVENT || data?.room !== room || data?.burst !== burst) {
      return problem(`connection ${index}: unexpected event ${JSON.stringify(msg).slice(0, 120)} in burst ${burst}`);
    }
    if (lastBurst[index] === burst) return problem(`connection ${index}: burst ${burst} received twice`);
    lastBurst[index] = burst;
    deliveries[deliveryCount++] = at - sentAt[room];
    lastArrival = Math.max(lastArrival, at);
    if (++received === total) allReceived?.();
  };
  let deliveries = new Float64Array(total);
  let deliveryCount = 0;
  let lastArrival = 0;

  // Open every connection, `connectConcurrency` handshakes at a time.
  const conns = new Array(total);
  const connectStart = performance.now();
  await forEachConcurrently(total, config.connectConcurrency, async (i) => {
    const room = Math.floor(i / perRoom);
    conns[i] = await openConnection("room", [`room-${room}`], { subs: [EVENT], onEvent: onEvent(i, room) });
  });
  const connectMs = performance.now() - connectStart;

  const pad = "x".repeat(Math.max(0, config.payloadBytes - JSON.stringify({ burst: 0, room: 0, pad: "" }).length));
  const payloadBytes = JSON.stringify({ burst: 0, room: 0, pad }).length;
  const replyTimes = [];
  let replyMismatches = 0;

  /** One burst; resolves `{fanoutMs}` once every event and every reply arrived. */
  async function runBurst(n, timed) {
    burst = n;
    received = 0;
    lastArrival = 0;
    if (timed === false) deliveryCount = 0;
    const everyEvent = new Promise((resolve) => (allReceived = resolve));
    const start = performance.now();
    const replies = [];
    for (let room = 0; room < rooms; room++) {
      sentAt[room] = performance.now();
      const t0 = sentAt[room];
      replies.push(
        conns[room * perRoom].call("broadcast", [{ burst: n, room, pad }]).then(
          (output) => {
            if (timed) replyTimes.push(performance.now() - t0);
            if (output !== n + 1) replyMismatches += 1;
          },
          (err) => problem(`room ${room}: broadcast failed: ${err.message}`),
        ),
      );
    }
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`burst ${n}: ${received} of ${total} events after ${config.requestTimeoutMs} ms`)), config.requestTimeoutMs);
    });
    try {
      await Promise.race([Promise.all([everyEvent, Promise.all(replies)]), timeout]);
    } finally {
      clearTimeout(timer);
    }
    return { fanoutMs: lastArrival - start };
  }

  for (let n = 0; n < config.warmupBursts; n++) await runBurst(n, false);
  deliveries = new Float64Array(total * config.bursts);
  deliveryCount = 0;
  const bursts = [];
  const cpuStart = cpuNow();
  for (let n = config.warmupBursts; n < config.warmupBursts + config.bursts; n++) bursts.push((await runBurst(n, true)).fanoutMs);
  const cpuMsPerBurst = cpuSince(cpuStart, config.bursts);

  // Every room counted every burst (keel: in its durable state; the baseline: in memory).
  const want = config.warmupBursts + config.bursts;
  let countMismatches = 0;
  for (let room = 0; room < rooms; room++) {
    const sent = await conns[room * perRoom].call("sent", []).catch((err) => String(err.message ?? err));
    if (sent !== want) {
      countMismatches += 1;
      problem(`room ${room}: sent ${JSON.stringify(sent)}, want ${want}`);
    }
  }
  await closeAll(conns);

  const fanout = Float64Array.from(bursts).sort();
  return {
    workload: "broadcast",
    rooms,
    connections: total,
    connectionsPerRoom: perRoom,
    payloadBytes,
    bursts: config.bursts,
    warmupBursts: config.warmupBursts,
    connectMs: round3(connectMs),
    fdLimit: fdLimit(),
    fanoutMs: {
      median: round3(percentile(fanout, 50)),
      min: round3(fanout[0]),
      max: round3(fanout[fanout.length - 1]),
      perBurst: bursts.map(round3),
    },
    eventsPerSec: Math.round((total / percentile(fanout, 50)) * 1000 * 10) / 10,
    // CPU per burst (both sides run on the same machine): which one bounds the fan-out.
    cpuMsPerBurst,
    deliveryMs: latencySummary(deliveries.subarray(0, deliveryCount)),
    replyMs: latencySummary(replyTimes),
    errors: errors.length,
    verify: {
      ok: errors.length === 0 && replyMismatches === 0 && countMismatches === 0 && deliveryCount === total * config.bursts,
      deliveries: deliveryCount,
      expectedDeliveries: total * config.bursts,
      replyMismatches,
      countMismatches,
      firstErrors: errors.slice(0, 5),
    },
  };
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const workload = {
    sequential: counterWorkload,
    concurrent: counterWorkload,
    "ws-sequential": counterWorkload,
    "ws-concurrent": counterWorkload,
    // run.mjs's http-* workloads, when wrk is missing.
    "http-sequential": counterWorkload,
    "http-concurrent": counterWorkload,
    "http-sequential-relaxed": counterWorkload,
    "http-concurrent-relaxed": counterWorkload,
    broadcast,
    "many-actors": manyActors,
    wake,
    memory,
    alarms,
  }[config.workload];
  if (!workload) throw new Error(`unknown workload ${config.workload}`);
  const result = await workload();
  agent.destroy();
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((err) => {
  console.error("load:", err);
  process.exit(1);
});
