// The engine workload group (`--only engine`): keel on a Rivet Engine, RivetKit 2.3.19 on the
// same engine binary, and embedded keel beside them, measured in one run with the same client
// code and the same counter. Each round, for each server in turn (the order rotates by round):
// a fresh engine (bench/engine/harness.mjs; none for embedded), a fresh server child, then
//   1. cold start: spawn → the server's ready line (on the engine: its envoy accepted) → the
//      first `increment` on a new key answered (sent as soon as the ready line arrives: a
//      request the gateway gets before any envoy is in the pool waits 30 s and fails with
//      `guard.actor_ready_timeout`, for both peers);
//   2. first call to a new actor: `firstActors` new keys, one `increment` each, one at a time
//      (on the engine, the gateway's getOrCreate: create, allocate, start, call);
//   3. sequential: `seqCalls` increments on one key, one at a time, after 20 untimed ones;
//      p50/p99, and the server's and the engine's CPU per call over them; on the engine
//      then as many again by actor id (`/gateway/{id}/...`), which skips the key resolution,
//      and as many `getCount`s by id (nothing written: what a write costs the engine is the
//      difference);
//   4. throughput with 8 and with 64 actors (`--engine-actors`): wrk, one connection per actor
//      with one request in flight (http-wrk.mjs with wrk/counter.lua), `durationS` after a 1 s
//      warm-up, on actors created beforehand one at a time (create() below), with the
//      engine's CPU per call over the timed part;
//   5. wake: `wakeActors` `dozer`s, all created first (create(), one increment); then each is put to
//      sleep by `nap` (`c.sleep()`) and, once asleep (on the engine: its `sleep_ts` is set;
//      embedded: the probe's live count dropped), gets one timed increment, which wakes it.
// On the engine every call is `POST {guard}/gateway/{name}/action/{action}?rvt-namespace=default
// &rvt-method=getOrCreate&rvt-runner=default&rvt-key={key}` with `{"args":[...]}`: the gateway
// resolves the key on every call, as the curl of docs/engine.md does. Embedded keel gets
// `POST /v1/actors/{name}/actions/{action}` with `{"key":[key],"args":[...]}`. The client (this
// process and wrk) is never the server's process.
//
// What must stay true: every engine and server started here is stopped (and its data dir
// removed) whatever happened; every reply is checked (each increment's output is the count so
// far, every wake finds the state it slept with, wrk's per-key sequences and final counts), and
// a failed check marks the result failed (run.mjs then exits 1); every wait is bounded.

import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { runWrkCounter } from "../http-wrk.mjs";
import { benchDir } from "../run/paths.mjs";
import { median, round3 } from "../run/stats.mjs";
import { startEngine, stopEngine, until } from "./harness.mjs";

/** The servers of the group: which script, and whether it runs on an engine. */
export const ENGINE_KINDS = {
  "keel-engine": { script: "keel-engine.mjs", engine: true, keel: true },
  "rivetkit-engine": { script: "rivetkit-engine.mjs", engine: true, keel: false },
  "keel-embedded": { script: "keel-engine.mjs", engine: false, keel: true },
};

const STEP_MS = 60_000;

/** CPU ms (user + system) of process `pid` so far, from /proc (10 ms ticks). */
function cpuMsOf(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100;
}

/** Nearest-rank percentile of `xs` (ms), rounded. */
function pct(xs, p) {
  if (!xs.length) return null;
  const sorted = [...xs].sort((a, b) => a - b);
  return round3(sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]);
}

/** Starts the server child of `kind`; resolves once its ready line arrived, with the spawn time. */
async function startChild(kind, spec, engine) {
  const { script, keel } = ENGINE_KINDS[kind];
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), `keel-bench-${kind}-`));
  const env = { ...process.env, RUST_LOG: "warn" };
  for (const name of ["KEEL_BENCH_ENGINE", "KEEL_BENCH_PORT", "KEEL_ENGINE_ENDPOINT", "RIVET_ENDPOINT", "RIVET_ENGINE", "RIVET_TOKEN"]) delete env[name];
  if (engine) env.KEEL_BENCH_ENGINE = engine.url;
  if (keel) {
    env.NAPI_RS_NATIVE_LIBRARY_PATH = spec.addonPath;
    env.KEEL_BENCH_KEEL_DIR = spec.keelDir;
  } else delete env.NAPI_RS_NATIVE_LIBRARY_PATH;
  const spawnedAt = performance.now();
  const child = spawn(process.execPath, [path.join(benchDir, "servers", script), dataDir], { cwd: benchDir, env, stdio: ["pipe", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (d) => (stderr = (stderr + d).slice(-8000)));
  const exited = new Promise((resolve) => child.once("close", resolve));
  const server = { kind, child, dataDir, exited, spawnedAt, stderr: () => stderr };
  try {
    const ready = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${kind} not ready after ${STEP_MS} ms`)), STEP_MS);
      child.stdout.setEncoding("utf8").on("data", (d) => {
        stdout += d;
        const line = stdout.split("\n").find((l) => l.startsWith("{"));
        if (!line) return;
        clearTimeout(timer);
        resolve(JSON.parse(line));
      });
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`${kind} exited early (${code ?? signal})`));
      });
    });
    server.readyMs = performance.now() - spawnedAt;
    server.port = ready.port;
    server.probePort = ready.probePort ?? null;
  } catch (err) {
    await stopChild(server);
    err.message += `\n${kind} stderr:\n${stderr}`;
    throw err;
  }
  return server;
}

/** Closes the server's stdin (it shuts down), kills it after 30 s, removes its data dir. */
async function stopChild(server) {
  const { child } = server;
  if (child.exitCode === null && child.signalCode === null) {
    child.stdin.end();
    const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
    await server.exited;
    clearTimeout(timer);
  }
  fs.rmSync(server.dataDir, { recursive: true, force: true });
  return child.exitCode === 0;
}

/** How the client reaches actor `name`/`key` on this server: `{path(action), body(args)}`. */
function route(server, name, key) {
  if (ENGINE_KINDS[server.kind].engine) {
    const query = `rvt-namespace=default&rvt-method=getOrCreate&rvt-runner=default&rvt-key=${encodeURIComponent(key)}`;
    return { path: (action) => `/gateway/${name}/action/${action}?${query}`, body: (args) => ({ args }) };
  }
  return { path: (action) => `/v1/actors/${name}/actions/${action}`, body: (args) => ({ key: [key], args }) };
}

/** One call; resolves `{ms, status, output}` (output null unless a 200 with `{"output"}`). */
async function call(server, name, key, action, args = [], r = route(server, name, key)) {
  const start = performance.now();
  const res = await fetch(`http://127.0.0.1:${server.port}${r.path(action)}`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-rivet-encoding": "json" },
    body: JSON.stringify(r.body(args)),
    signal: AbortSignal.timeout(STEP_MS),
  });
  const text = await res.text();
  const ms = performance.now() - start;
  let output = null;
  try {
    output = res.status === 200 ? JSON.parse(text).output : null;
  } catch {}
  return { ms, status: res.status, output, text: res.status === 200 ? null : text.slice(0, 300) };
}

/** The engine's answers for a request it never delivered to an actor: safe to send again. */
const UNDELIVERED = ['"code":"route_resolve_query_timeout"', '"code":"actor_ready_timeout"'];

/**
 * The first call to a new actor: `call`, sent again (up to 4 times) while the engine answers
 * 5xx with one of UNDELIVERED. On 2 shared cores the engine's getOrCreate of a new key now and
 * then stalls until its 15 s route-resolution timeout, for keel and RivetKit alike (see
 * bench/README.md). Resolves the answering attempt with `timeouts`, the attempts before it.
 */
async function firstCall(server, name, key, action, args = []) {
  let timeouts = 0;
  for (;;) {
    const r = await call(server, name, key, action, args);
    if (r.status < 500 || !UNDELIVERED.some((code) => r.text?.includes(code)) || timeouts === 4) return { ...r, timeouts };
    timeouts++;
  }
}

/**
 * Creates actor `name`/`key` untimed before it is measured: on the engine with its API
 * (`PUT /actors`, get or create, waited on for up to 20 s), then
 * with a `getCount` through the route the measurement uses (firstCall). Resolves that reply.
 */
async function create(server, engine, name, key) {
  // Under load the engine also answers this with 500 `core.internal_error` now and then: up to
  // 2 tries, then the gateway call below (which creates it too) is left to do it.
  for (let attempt = 0; engine && attempt < 2; attempt++) {
    const res = await fetch(`${engine.url}/actors?namespace=default`, {
      method: "PUT",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name, key, runner_name_selector: "default", crash_policy: "sleep" }),
      signal: AbortSignal.timeout(20_000),
    }).catch(() => null);
    await res?.text().catch(() => {});
    if (res?.ok) break;
  }
  return firstCall(server, name, key, "getCount");
}

/** Resolves once the `dozer` `key` is asleep: the engine's `sleep_ts`, or embedded the probe. */
async function waitAsleep(server, engine, key, liveBefore) {
  if (engine) {
    await until(`dozer ${key} asleep in the engine`, STEP_MS, async () => {
      const res = await fetch(`${engine.url}/actors?namespace=default&name=dozer&key=${encodeURIComponent(key)}`);
      const { actors } = await res.json();
      return actors?.[0]?.sleep_ts ? true : undefined;
    });
  } else {
    await until(`dozer ${key} asleep`, STEP_MS, async () => ((await probeLive(server)) < liveBefore ? true : undefined));
  }
}

async function probeLive(server) {
  return (await (await fetch(`http://127.0.0.1:${server.probePort}/probe`)).json()).live;
}

/** One round of the group on a fresh engine (if any) and server of `kind`. */
export async function measureEngineKind(kind, opts, spec) {
  const needsEngine = ENGINE_KINDS[kind].engine;
  const engine = needsEngine ? await startEngine() : null;
  const failures = [];
  const check = (ok, what) => {
    if (!ok && failures.length < 20) failures.push(what);
  };
  let server;
  const result = { kind, client: "wrk" };
  try {
    server = await startChild(kind, spec, engine);
    // 1. Cold start: the first call is sent when the ready line arrives.
    const first = await firstCall(server, "counter", "cold", "increment", [1]);
    check(first.output === 1, `cold-start call: ${first.status} ${first.text ?? first.output}`);
    result.readyMs = round3(server.readyMs);
    result.coldStartMs = round3(performance.now() - server.spawnedAt);
    // Gateway timeouts of new actors over the whole round (each cost 15 s and was sent again).
    result.newActorTimeouts = first.timeouts;

    // 2. First call to a new actor, one key at a time.
    const firstCalls = [];
    for (let i = 0; i < opts.engineFirstActors; i++) {
      const r = await firstCall(server, "counter", `first-${i}`, "increment", [1]);
      check(r.output === 1, `first call first-${i}: ${r.status} ${r.text ?? r.output}`);
      // The answering attempt's time; the timed-out attempts before it are counted apart.
      firstCalls.push(r.ms);
      result.newActorTimeouts += r.timeouts;
    }
    result.firstCallMs = { p50: pct(firstCalls, 50), max: pct(firstCalls, 100), all: firstCalls.map(round3) };

    // 3. Sequential increments on one key.
    for (let i = 1; i <= 20; i++) {
      const r = await call(server, "counter", "seq", "increment", [1]);
      check(r.output === i, `sequential warm-up ${i}: ${r.status} ${r.text ?? r.output}`);
    }
    const seq = [];
    const cpu0 = { server: cpuMsOf(server.child.pid), engine: engine ? cpuMsOf(engine.child.pid) : null };
    const seqStart = performance.now();
    for (let i = 21; i < 21 + opts.engineSeqCalls; i++) {
      const r = await call(server, "counter", "seq", "increment", [1]);
      check(r.output === i, `sequential ${i}: ${r.status} ${r.text ?? r.output}`);
      seq.push(r.ms);
    }
    const seqElapsed = performance.now() - seqStart;
    const n = opts.engineSeqCalls;
    result.sequential = {
      calls: n,
      p50: pct(seq, 50),
      p99: pct(seq, 99),
      callsPerSec: round3((n / seqElapsed) * 1000),
      serverCpuUsPerCall: round3(((cpuMsOf(server.child.pid) - cpu0.server) / n) * 1000),
      engineCpuUsPerCall: engine ? round3(((cpuMsOf(engine.child.pid) - cpu0.engine) / n) * 1000) : null,
    };
    const count = await call(server, "counter", "seq", "getCount");
    check(count.output === 20 + n, `sequential getCount ${count.output}, expected ${20 + n}`);

    // 3b. On the engine, the same increments by actor id (`/gateway/{id}/...`, resolved once
    // with the engine's `GET /actors`): the gateway then skips resolving the key on every call,
    // which is about half of the engine's CPU per call (bench/README.md).
    if (engine) {
      const listed = await (await fetch(`${engine.url}/actors?namespace=default&name=counter&key=seq`, { signal: AbortSignal.timeout(STEP_MS) })).json();
      const id = (listed.actors ?? [listed.actor])[0]?.actor_id;
      check(typeof id === "string", `GET /actors for seq: ${JSON.stringify(listed).slice(0, 300)}`);
      const byId = { path: (action) => `/gateway/${id}/action/${action}`, body: (args) => ({ args }) };
      const ids = [];
      const cpu1 = { server: cpuMsOf(server.child.pid), engine: cpuMsOf(engine.child.pid) };
      for (let i = 21 + n; i < 21 + 2 * n; i++) {
        const r = await call(server, "counter", "seq", "increment", [1], byId);
        check(r.output === i, `sequential by id ${i}: ${r.status} ${r.text ?? r.output}`);
        ids.push(r.ms);
      }
      result.sequentialById = {
        calls: n,
        p50: pct(ids, 50),
        p99: pct(ids, 99),
        serverCpuUsPerCall: round3(((cpuMsOf(server.child.pid) - cpu1.server) / n) * 1000),
        engineCpuUsPerCall: round3(((cpuMsOf(engine.child.pid) - cpu1.engine) / n) * 1000),
      };
      // 3c. As many `getCount`s by id: a call that changes nothing, so keel sends the engine
      // no batch for it and RivetKit no save. The difference to 3b is what a write costs the
      // engine per call (keel: the commit's remote SQLite batch before the reply).
      const reads = [];
      const cpu2 = { server: cpuMsOf(server.child.pid), engine: cpuMsOf(engine.child.pid) };
      for (let i = 0; i < n; i++) {
        const r = await call(server, "counter", "seq", "getCount", [], byId);
        check(r.output === 20 + 2 * n, `read by id ${i}: ${r.status} ${r.text ?? r.output}`);
        reads.push(r.ms);
      }
      result.readsById = {
        calls: n,
        p50: pct(reads, 50),
        p99: pct(reads, 99),
        serverCpuUsPerCall: round3(((cpuMsOf(server.child.pid) - cpu2.server) / n) * 1000),
        engineCpuUsPerCall: round3(((cpuMsOf(engine.child.pid) - cpu2.engine) / n) * 1000),
      };
    }

    // 4. Throughput with 8 and 64 actors, under wrk.
    result.throughput = {};
    for (const actors of opts.engineActors) {
      try {
      // The actors are created first, one at a time and untimed (`getCount`, which the
      // gateway's getOrCreate creates), so that wrk's warm-up does not create 64 at once.
      for (let i = 0; i < actors; i++) {
        const made = await create(server, engine, "counter", `tp${actors}-${i}`);
        check(made.output === 0, `throughput ${actors} create tp${actors}-${i}: ${made.status} ${made.text ?? made.output}`);
        result.newActorTimeouts += made.timeouts;
      }
      const t = await runWrkCounter({
        kind,
        port: server.port,
        serverPid: server.child.pid,
        enginePid: engine?.child.pid ?? null,
        workload: `tp${actors}`,
        connections: actors,
        durationS: opts.durationS,
        routeFor: async (key) => route(server, "counter", key),
      });
      check(t.verify.ok && t.errors === 0, `throughput ${actors}: ${t.errors} errors, verify ${JSON.stringify(t.verify.mismatches)}`);
      result.throughput[actors] = { callsPerSec: t.callsPerSec, p50: t.latencyMs.p50, p99: t.latencyMs.p99, calls: t.calls, errors: t.errors, serverCpuUsPerCall: t.cpuUsPerCall.server, engineCpuUsPerCall: t.cpuUsPerCall.engine };
      } catch (err) {
        // A failed count is a failure of the round, but the wake figure is still measured.
        check(false, `throughput ${actors}: ${String(err.stack ?? err).slice(0, 1500)}`);
      }
    }
    // 5. Wake from sleep: every dozer is created first.
    const wakes = [];
    for (let i = 0; i < opts.engineWakeActors; i++) {
      const made = await create(server, engine, "dozer", `wake-${i}`);
      check(made.output === 0, `wake wake-${i} create: ${made.status} ${made.text ?? made.output}`);
      result.newActorTimeouts += made.timeouts;
      const one = await call(server, "dozer", `wake-${i}`, "increment", [1]);
      check(one.output === 1, `wake wake-${i} increment: ${one.status} ${one.text ?? one.output}`);
    }
    for (let i = 0; i < opts.engineWakeActors; i++) {
      const key = `wake-${i}`;
      const liveBefore = engine ? null : await probeLive(server);
      const nap = await call(server, "dozer", key, "nap");
      check(nap.output === 1, `wake ${key} nap: ${nap.status} ${nap.text ?? nap.output}`);
      await waitAsleep(server, engine, key, liveBefore);
      const woke = await call(server, "dozer", key, "increment", [1]);
      check(woke.output === 2, `wake ${key}: ${woke.status} ${woke.text ?? woke.output} (the state before the sleep is 1)`);
      wakes.push(woke.ms);
    }
    result.wakeMs = { p50: pct(wakes, 50), max: pct(wakes, 100), all: wakes.map(round3) };

  } catch (err) {
    failures.push(String(err.stack ?? err).slice(0, 2000) + (server ? `\nserver stderr:\n${server.stderr().slice(-2000)}` : "") + (engine ? `\nengine log:\n${engine.log().slice(-2000)}` : ""));
  } finally {
    if (server && !(await stopChild(server))) console.error(`warning: ${kind} did not shut down cleanly:\n${server.stderr().slice(-2000)}`);
    if (engine) await stopEngine(engine);
  }
  result.verify = { ok: failures.length === 0, failures };
  return result;
}

/** The rows of the engine table: [label, getter of a round's value], for the actor counts run. */
export function engineFigures(actorCounts) {
  return [
    ["cold start to first answered action, ms", (r) => r.coldStartMs],
    ["  of which until ready (envoy accepted), ms", (r) => r.readyMs],
    ["first call to a new actor, p50 ms", (r) => r.firstCallMs?.p50],
    ["new actors whose getOrCreate timed out (15 s, sent again)", (r) => r.newActorTimeouts],
    ["sequential increments, p50 ms", (r) => r.sequential?.p50],
    ["sequential increments, p99 ms", (r) => r.sequential?.p99],
    ["sequential, server CPU µs/call", (r) => r.sequential?.serverCpuUsPerCall],
    ["sequential, engine CPU µs/call", (r) => r.sequential?.engineCpuUsPerCall],
    ["sequential by actor id, p50 ms", (r) => r.sequentialById?.p50],
    ["sequential by actor id, p99 ms", (r) => r.sequentialById?.p99],
    ["sequential by actor id, engine CPU µs/call", (r) => r.sequentialById?.engineCpuUsPerCall],
    ["reads by actor id (getCount, nothing written), p50 ms", (r) => r.readsById?.p50],
    ["reads by actor id, engine CPU µs/call", (r) => r.readsById?.engineCpuUsPerCall],
    ["wake from sleep, p50 ms", (r) => r.wakeMs?.p50],
    ...actorCounts.flatMap((n) => [
      [`${n} actors (wrk), calls/s`, (r) => r.throughput?.[n]?.callsPerSec],
      [`${n} actors, p99 ms`, (r) => r.throughput?.[n]?.p99],
      [`${n} actors, engine CPU µs/call`, (r) => r.throughput?.[n]?.engineCpuUsPerCall],
    ]),
  ];
}

/** Medians over rounds of every figure per kind, and the keel-engine/rivetkit-engine ratios. */
export function summarizeEngine(rounds, actorCounts) {
  const rows = engineFigures(actorCounts).map(([label, get]) => {
    const values = {};
    for (const kind of Object.keys(ENGINE_KINDS)) {
      const xs = (rounds[kind] ?? []).map(get).filter((x) => typeof x === "number");
      values[kind] = xs.length ? round3(median(xs)) : null;
    }
    const k = values["keel-engine"];
    const rk = values["rivetkit-engine"];
    const ratio = k !== null && rk !== null && rk !== 0 ? round3(k / rk) : null;
    return { label, ...values, keelOverRivetkit: ratio };
  });
  return { rows, ok: Object.values(rounds).every((rs) => rs.every((r) => r.verify.ok)) };
}

/** Prints the engine table: one row per figure, medians over rounds, and the ratio. */
export function printEngineTable(summary, rounds) {
  const cell = (x) => (x === null || x === undefined ? "-" : String(x));
  const lines = [
    `\nEngine mode (medians over ${rounds} round(s); ratio keel/RivetKit, both on the engine: calls/s above 1x or latency below 1x means keel is ahead)`,
    "keel durable before reply (engine-acknowledged remote SQLite batch); RivetKit replies before saving (state written at most every 1 s); embedded keel: fsynced SQLite before reply",
    ["figure", "keel on engine", "RivetKit on engine", "keel/RivetKit", "keel embedded"].join(" | "),
  ];
  for (const row of summary.rows) {
    lines.push([row.label, cell(row["keel-engine"]), cell(row["rivetkit-engine"]), row.keelOverRivetkit === null ? "-" : `${row.keelOverRivetkit}x`, cell(row["keel-embedded"])].join(" | "));
  }
  console.log(lines.join("\n"));
}
