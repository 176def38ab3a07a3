// The life-cycle workloads (keel only; the actor types are in servers/lifecycle.mjs): wake
// latency, memory per actor asleep and awake, and schedule throughput. `wake` and `memory`
// read the server's probe (servers/keel.mjs, KEEL_BENCH_PROBE=1): a separate listener that is
// not an actor, so asking it wakes nothing.
//
// What must stay true: every wait (all asleep, all alarms fired) is bounded; each workload
// checks the state it relies on (counts survive a sleep, the probe counts the awake actors,
// every alarm runs exactly once) and reports a failed check in `verify`.

import { config } from "./config.mjs";
import { call, request } from "./http.mjs";
import { forEachConcurrently, latencySummary, round3, sleepMs } from "./measure.mjs";

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

/**
 * Wake latency. Every call is one at a time, `touch` on a `napper` (a durable write, like the
 * counter's increment). Each actor is created by one untimed call; then every actor is put to
 * sleep (`nap`) and, once the probe says none is awake, each actor gets two timed calls back to
 * back: the first wakes it, the second finds it awake. Pairing them on the same actor at the
 * same moment keeps a noisy machine's drift out of the ratio. The outputs must count on across
 * the sleep (1, then 2 and 3), which checks that the state survived.
 */
export async function wake() {
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
export async function memory() {
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
    for (const field of ["rss", "rssAnon", "rssFile", "heapTotal", "heapUsed", "newSpace", "external"]) out[field] = perActor(to, from, field);
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
      // The same, less what V8's young generation grew by over the wave: it grows (up to 16
      // MB per semi-space) under the wave's traffic whatever the number of actors, and may
      // finish growing in this wave rather than in the warm-up.
      asleepBesidesYoung: Math.round((asleep.rss - asleep.newSpace - (base.rss - base.newSpace)) / n),
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
export async function alarms() {
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
