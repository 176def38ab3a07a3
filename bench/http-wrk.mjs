// The HTTP counter workloads driven by wrk (a C load generator), so that the client is not
// what limits the figures. run.mjs starts the server; this module runs wrk against it with
// wrk/counter.lua and checks the durable counts afterwards. Every target is 127.0.0.1.
//
// The shape is the JS generator's (load/counter.mjs, counterWorkload): `connections` keys and
// connections, one request in flight on each connection, every request an `increment` of 1. A
// short untimed wrk run warms up the same keys first; then the counts are read. By default wrk
// runs one thread per connection and counter.lua gives each thread its key: in the timed run
// each key's replies must count up by one from its first (which must be that count + 1, or + 2
// when a warm-up request still in flight landed after the read), and afterwards every key's
// durable count must be the start plus the replies (plus at most one request per connection
// still in flight when wrk stopped, whose effect is unknown). With `spread` (the
// many-connection http-* workloads) wrk runs one thread per core and spread.lua sends each
// thread's requests to its keys in turn; a reply cannot be matched to its key then, so the
// keys are checked together: every reply a count, and the durable counts grown by exactly
// the replies (plus the requests in flight at the stop). One thread per connection made wrk
// the larger part of the load on this 2-core machine (bench/README.md, "The client's share at
// 64 connections"); the engine workloads keep it, as there the engine is the load.
//
// The servers' routes (the same action either way):
//   keel, baseline: POST /v1/actors/counter/actions/increment  {"key":[k],"args":[1]}
//   rivetkit:       POST /gateway/{actorId}/action/increment    {"args":[1]}, with the actor
//                   id of each key resolved once beforehand (`PUT /actors`, untimed). RivetKit's
//                   own client asks for the id again before every action; the bench does not.

import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { rssOf } from "./figures.mjs";

const benchDir = path.dirname(fileURLToPath(import.meta.url));
const SCRIPT = path.join(benchDir, "wrk", "counter.lua");
const SPREAD_SCRIPT = path.join(benchDir, "wrk", "spread.lua");

/** The wrk threads that drive `connections` connections with spread.lua: one per core. */
const spreadThreads = (connections) => Math.min(connections, os.availableParallelism());
const HOST = "127.0.0.1";

/**
 * Finds wrk, installing the Debian package when it is missing and this process is root
 * (`apt-get install -y wrk`, with `apt-get update` first if that fails). Returns
 * `{available, version, note}`; `note` says why the JS generator is used instead.
 */
export function ensureWrk() {
  const probe = () => {
    const res = spawnSync("wrk", ["-v"], { encoding: "utf8" });
    if (res.error) return null;
    // "wrk debian/4.1.0-3+b2 [epoll] Copyright ...": keep the name and version.
    return (res.stdout + res.stderr).split("\n")[0].split(" [")[0].trim();
  };
  let version = probe();
  if (version) return { available: true, version, note: null };
  if (process.getuid?.() !== 0) {
    const note = "wrk is not installed (`sudo apt-get install -y wrk`); the HTTP workloads use the JS load generator instead";
    console.error(`warning: ${note}`);
    return { available: false, version: null, note };
  }
  const apt = (...args) => {
    console.error(`$ apt-get ${args.join(" ")}`);
    return spawnSync("apt-get", args, { stdio: ["ignore", "ignore", "inherit"], env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" } }).status === 0;
  };
  if (!apt("install", "-y", "wrk")) {
    apt("update");
    apt("install", "-y", "wrk");
  }
  version = probe();
  if (version) return { available: true, version, note: null };
  const note = "`apt-get install -y wrk` failed; the HTTP workloads use the JS load generator instead";
  console.error(`warning: ${note}`);
  return { available: false, version: null, note };
}

/** One untimed JSON request to the server; resolves the parsed body or throws on a non-2xx. */
async function send(port, method, urlPath, body) {
  const res = await fetch(`http://${HOST}:${port}${urlPath}`, {
    method,
    headers: { "content-type": "application/json", "x-rivet-encoding": "json" },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${urlPath}: HTTP ${res.status}: ${text.slice(0, 200)}`);
  return JSON.parse(text);
}

/**
 * How to reach the counter for `key` on a server of `kind`: `{path(action), body(args)}`.
 * For RivetKit this resolves (creating if need be) the actor id first.
 */
export async function counterRoute(kind, port, key) {
  if (kind !== "rivetkit") {
    return {
      path: (action) => `/v1/actors/counter/actions/${action}`,
      body: (args) => ({ key: [key], args }),
    };
  }
  const { actor } = await send(port, "PUT", "/actors", { name: "counter", key, runner_name_selector: "default", crash_policy: "sleep" });
  return {
    path: (action) => `/gateway/${encodeURIComponent(actor.actor_id)}/action/${action}`,
    body: (args) => ({ args }),
  };
}

/** CPU ms (user + system) the process `pid` has used, from /proc (10 ms ticks). */
function cpuMsOf(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100;
}

/**
 * Runs wrk once with a plan (one `{path, body, start}` per connection); resolves its result.
 * With `spread`, wrk runs one thread per core over all the connections (spread.lua), else one
 * thread per connection (counter.lua).
 */
function wrk(port, plan, durationS, spread) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "keel-bench-wrk-"));
  const planFile = path.join(dir, "plan.tsv");
  fs.writeFileSync(planFile, plan.map((p) => `${p.path}\t${JSON.stringify(p.body)}\t${p.start}`).join("\n") + "\n");
  const threads = spread ? spreadThreads(plan.length) : plan.length;
  const script = spread ? SPREAD_SCRIPT : SCRIPT;
  const args = ["-t", String(threads), "-c", String(plan.length), "-d", `${durationS}s`, "--timeout", "30s", "-s", script, `http://${HOST}:${port}/`];
  return new Promise((resolve, reject) => {
    const env = { ...process.env, KEEL_BENCH_WRK_PLAN: planFile, KEEL_BENCH_WRK_THREADS: String(threads) };
    const child = spawn("wrk", args, { env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.setEncoding("utf8").on("data", (d) => (out += d));
    child.stderr.setEncoding("utf8").on("data", (d) => (err = (err + d).slice(-4000)));
    // wrk stops itself after durationS; this is only the backstop.
    const timer = setTimeout(() => child.kill("SIGKILL"), (durationS + 60) * 1000);
    child.on("error", reject);
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      fs.rmSync(dir, { recursive: true, force: true });
      const line = out.split("\n").find((l) => l.startsWith("WRK_RESULT "));
      if (code !== 0 || !line) return reject(new Error(`wrk ${args.join(" ")} failed (${code ?? signal}):\n${out}\n${err}`));
      resolve(JSON.parse(line.slice("WRK_RESULT ".length)));
    });
  });
}

/**
 * The counts of every key (before and after the timed part), read concurrently. A read changes
 * nothing, so one a Rivet Engine answers with a 5xx of its own (on a loaded engine its gateway
 * now and then times out subscribing to, or waking, one of 64 actors read at once) is read
 * again, up to 5 times, 250 ms apart.
 */
const countsOf = (port, routes) =>
  Promise.all(
    routes.map(async (r) => {
      for (let attempt = 1; ; attempt++) {
        try {
          return (await send(port, "POST", r.path("getCount"), r.body([]))).output;
        } catch (err) {
          if (attempt >= 5 || !/: HTTP 5\d\d: /.test(err.message)) throw err;
          await new Promise((resolve) => setTimeout(resolve, 250));
        }
      }
    }),
  );

/**
 * counter.lua's check, key by key: each key's replies counted up by one from its first, and its
 * durable count is its start plus its replies.
 */
function keyMismatches(keys, starts, ends, timed) {
  const mismatches = [];
  timed.threads.forEach((t, i) => {
    // A warm-up request in flight when `starts` was read may have landed after it.
    const baseOk = t.ok === 0 || t.base === starts[i] || t.base === starts[i] + 1;
    const expected = (t.ok === 0 ? starts[i] : t.base) + t.ok;
    // wrk stops with one request per connection possibly sent and not answered.
    if (!baseOk || ends[i] < expected || ends[i] > expected + 1 || t.mismatches > 0) {
      mismatches.push({ key: keys[i], start: starts[i], base: t.base, acked: t.ok, actual: ends[i], outputMismatches: t.mismatches });
    }
  });
  return mismatches;
}

/**
 * spread.lua's check, the keys together (a reply is not matched to its key): every reply had a
 * count, no key went down, and the durable counts grew by exactly the replies, plus at most one
 * request per connection still in flight when wrk stopped.
 */
function spreadMismatches(keys, starts, ends, timed) {
  const acked = timed.threads.reduce((n, t) => n + t.ok, 0);
  const grown = ends.reduce((n, end, i) => n + end - starts[i], 0);
  const outputMismatches = timed.threads.reduce((n, t) => n + t.mismatches, 0);
  const shrunk = keys.filter((_, i) => ends[i] < starts[i]);
  if (grown >= acked && grown <= acked + keys.length && outputMismatches === 0 && shrunk.length === 0) return [];
  return [{ keys: keys.length, acked, grown, outputMismatches, shrunk: shrunk.slice(0, 5) }];
}

const round3 = (x) => (x === null || x === undefined ? null : Math.round(x * 1000) / 1000);

/**
 * One HTTP counter workload under wrk against a started server. Resolves a result with the
 * fields run.mjs summarises for the JS generator's workloads (callsPerSec, latencyMs, calls,
 * errors, warmupErrors, cpuUsPerCall, verify), plus wrk's own totals. `routeFor(key)` resolves
 * `{path(action), body(args)}` for a key; by default the server's own counter route
 * (counterRoute), the engine workloads pass the gateway's (bench/engine/workloads.mjs).
 */
export async function runWrkCounter({ kind, port, serverPid, enginePid = null, workload, connections, durationS, warmupS = 1, spread = false, routeFor = (key) => counterRoute(kind, port, key) }) {
  const keys = Array.from({ length: connections }, (_, i) => `${workload}-${i}`);
  const routes = await Promise.all(keys.map((key) => routeFor(key)));
  const planWith = (starts) => routes.map((r, i) => ({ path: r.path("increment"), body: r.body([1]), start: starts[i] }));

  // Warm-up on the same keys (creates the actors, opens the connections, warms the JITs).
  const warm = await wrk(port, planWith(keys.map(() => 0)), warmupS, spread);
  const starts = await countsOf(port, routes);

  const cpuStart = cpuMsOf(serverPid);
  const engineCpuStart = enginePid === null ? null : cpuMsOf(enginePid);
  const timed = await wrk(port, planWith(starts), durationS, spread);
  const cpuMs = cpuMsOf(serverPid) - cpuStart;
  const engineCpuMs = enginePid === null ? null : cpuMsOf(enginePid) - engineCpuStart;

  const ends = await countsOf(port, routes);
  const mismatches = spread ? spreadMismatches(keys, starts, ends, timed) : keyMismatches(keys, starts, ends, timed);
  const wrkErrors = (r) => Object.values(r.errors).reduce((a, b) => a + b, 0) + r.threads.reduce((n, t) => n + t.refused, 0);
  const calls = timed.threads.reduce((n, t) => n + t.ok, 0);
  const elapsedMs = timed.durationUs / 1000;
  return {
    workload,
    client: "wrk",
    transport: "http",
    actors: connections,
    calls,
    errors: wrkErrors(timed),
    warmupErrors: wrkErrors(warm),
    warmupCalls: warm.requests,
    elapsedMs: round3(elapsedMs),
    callsPerSec: Math.round((calls / elapsedMs) * 1000 * 10) / 10,
    cpuMs: { server: cpuMs, client: null, engine: engineCpuMs },
    cpuUsPerCall: {
      server: round3((cpuMs / calls) * 1000),
      client: null,
      engine: engineCpuMs === null ? null : round3((engineCpuMs / calls) * 1000),
    },
    latencyMs: {
      p50: round3(timed.latencyUs.p50 / 1000),
      p99: round3(timed.latencyUs.p99 / 1000),
      mean: round3(timed.latencyUs.mean / 1000),
      max: round3(timed.latencyUs.max / 1000),
    },
    wrk: { errors: timed.errors, requests: timed.requests, warmupErrors: warm.errors },
    verify: { ok: mismatches.length === 0, actorsChecked: keys.length, ackedTotal: calls, mismatches: mismatches.slice(0, 10) },
  };
}

/**
 * The many-actors workload under wrk (wrk/many.lua) against a started server: `actors` new
 * counters over `connections` connections (one wrk thread each), each created by its first
 * call (an `increment` of 1, which must answer 1; RivetKit: `PUT /actors`, then the action).
 * Timed from wrk's spawn to the last thread's last reply (so wrk's own start-up and the
 * connects are in it); afterwards the server's RSS is read from /proc (no GC is forced: what
 * a user would see). Resolves the fields of the JS generator's many-actors result.
 */
export async function runWrkManyActors({ kind, port, serverPid, actors, connections = 64, timeCapS = 300 }) {
  // Threads 1..extra create one actor more, so that exactly `actors` are created.
  const per = Math.floor(actors / connections);
  const extra = actors % connections;
  const args = ["-t", String(connections), "-c", String(connections), "-d", `${timeCapS}s`, "--timeout", "30s", "-s", path.join(benchDir, "wrk", "many.lua"), `http://${HOST}:${port}/`];
  const env = { ...process.env, KEEL_BENCH_MANY_KIND: kind, KEEL_BENCH_MANY_PREFIX: `many-${Date.now()}`, KEEL_BENCH_MANY_PER: String(per), KEEL_BENCH_MANY_EXTRA: String(extra) };
  const cpuStart = cpuMsOf(serverPid);
  const t0 = performance.now();
  const { result, elapsedMs } = await new Promise((resolve, reject) => {
    const child = spawn("wrk", args, { env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    let finished = 0;
    let elapsed = null;
    child.stdout.setEncoding("utf8").on("data", (d) => (out += d));
    child.stderr.setEncoding("utf8").on("data", (d) => {
      finished += (d.match(/^MANY_DONE /gm) ?? []).length;
      err = (err + d.replace(/^MANY_DONE \d+\n/gm, "")).slice(-4000);
      if (finished === connections && elapsed === null) {
        elapsed = performance.now() - t0;
        child.kill("SIGINT");
      }
    });
    const timer = setTimeout(() => child.kill("SIGKILL"), (timeCapS + 60) * 1000);
    child.on("error", reject);
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      const line = out.split("\n").find((l) => l.startsWith("WRK_RESULT "));
      if (!line) return reject(new Error(`wrk ${args.join(" ")} failed (${code ?? signal}):\n${out}\n${err}`));
      resolve({ result: JSON.parse(line.slice("WRK_RESULT ".length)), elapsedMs: elapsed ?? performance.now() - t0 });
    });
  });
  const cpuMs = cpuMsOf(serverPid) - cpuStart;
  const { rss, rssAnon } = rssOf(serverPid);
  const ok = result.threads.reduce((n, t) => n + t.ok, 0);
  const wrong = actors - ok;
  const wrkErrors = Object.values(result.errors).reduce((a, b) => a + b, 0);
  return {
    workload: "many-actors",
    client: "wrk",
    actors,
    concurrency: connections,
    elapsedMs: round3(elapsedMs),
    actorsPerSec: Math.round((actors / elapsedMs) * 1000 * 10) / 10,
    cpuMs: { server: cpuMs, client: null },
    serverCpuUsPerActor: round3((cpuMs / actors) * 1000),
    serverRssBytes: rss,
    serverRssAnonBytes: rssAnon,
    errors: wrong + wrkErrors,
    verify: { ok: wrong === 0 && wrkErrors === 0, answeredOne: ok, wrkErrors: result.errors },
  };
}
