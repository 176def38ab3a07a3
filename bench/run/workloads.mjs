// What runs: the workload names by family, each family's workload definitions (built from the
// options), and one measurement of a workload on one server: a fresh server child, the load
// generator (load.mjs) or wrk (http-wrk.mjs) against it, then the server stopped.
//
// What must stay true: every measurement starts its own server on a new data dir and stops it
// afterwards, whatever happened; the fields handed to load.mjs are the ones its workloads read
// (see its usage comment), and every workload is bounded in calls and in time (`timeCapMs`).
// The life-cycle workloads run on keel only, with the probe and --expose-gc.

import { runWrkCounter, runWrkManyActors } from "../http-wrk.mjs";
import { spawnSync } from "node:child_process";
import path from "node:path";
import { runLoad, startServer, stopServer } from "./children.mjs";
import { benchDir } from "./paths.mjs";

// Calls on the counter, keel vs the baseline: over HTTP, then over WebSocket connections.
export const COUNTER_WORKLOADS = ["sequential", "concurrent", "ws-sequential", "ws-concurrent"];
// Event fan-out over WebSocket connections, keel vs the baseline.
export const FANOUT_WORKLOADS = ["broadcast"];
export const LIFECYCLE_WORKLOADS = ["wake", "memory", "alarms"];
// The counter over HTTP driven by wrk, in full and relaxed durability, keel vs the baseline
// (and the peers given with --peers).
export const HTTP_WORKLOADS = ["http-sequential", "http-concurrent", "http-sequential-relaxed", "http-concurrent-relaxed"];
// Start-up figures: spawn to first reply, idle RSS, 10,000 actors created (and the peers').
export const FIGURE_WORKLOADS = ["cold-start", "idle-rss", "many-actors"];
export const PEERS = ["rivetkit"];
// Server memory per open WebSocket, keel (both socket kinds) vs the baseline (sockets.mjs).
export const SOCKET_WORKLOADS = ["sockets"];
// Standalone scripts run once as a child each (rounds inside), keel vs its own baseline:
// db.mjs (`c.db` insert + indexed select vs better-sqlite3) and actor-calls.mjs (`c.client()`
// in process vs a plain HTTP call to keel). See runScript.
export const SCRIPT_WORKLOADS = ["db", "actor-calls"];
// Opt-in, run only when `--only` names them: `engine`, keel and RivetKit 2.3.19 on a Rivet Engine
// with embedded keel beside (bench/engine/workloads.mjs); it needs the engine binary.
export const OPT_IN_WORKLOADS = ["engine"];
// The default of `--only`.
export const ALL_WORKLOADS = [...COUNTER_WORKLOADS, ...FANOUT_WORKLOADS, ...LIFECYCLE_WORKLOADS, ...HTTP_WORKLOADS, ...FIGURE_WORKLOADS, ...SOCKET_WORKLOADS, ...SCRIPT_WORKLOADS];

/** The workloads of latest.json's `workloads`: the counter, fan-out and life-cycle ones selected. */
export function workloads(opts) {
  return [...counterWorkloads(opts), ...fanoutWorkloads(opts), ...lifecycleWorkloads(opts)];
}

/** The counter workloads selected, over HTTP and over WebSocket (see load/counter.mjs). */
export function counterWorkloads(opts) {
  const all = [
    {
      // One client, one actor, one request at a time: the latency of a single durable call.
      name: "sequential",
      actors: 1,
      maxCalls: opts.seqCalls,
      durationMs: 120_000, // only a bound; the call count ends it
      warmupCallsPerActor: 100,
    },
    {
      // Many actors, one request in flight each: what group commit across actors buys.
      name: "concurrent",
      actors: opts.concurrency,
      maxCalls: opts.maxCalls,
      durationMs: opts.durationS * 1000,
      warmupCallsPerActor: 10,
    },
    {
      // The same two over WebSocket: one connection per actor, JSON frames, one call in flight.
      name: "ws-sequential",
      actors: 1,
      maxCalls: opts.seqCalls,
      durationMs: 120_000,
      warmupCallsPerActor: 100,
    },
    {
      name: "ws-concurrent",
      actors: opts.concurrency,
      maxCalls: opts.maxCalls,
      durationMs: opts.durationS * 1000,
      warmupCallsPerActor: 10,
    },
  ];
  return all.filter((w) => opts.only.includes(w.name));
}

/** Event fan-out over WebSocket connections (see load/broadcast.mjs). */
export function fanoutWorkloads(opts) {
  const all = [
    {
      name: "broadcast",
      actors: opts.fanoutActors,
      connections: opts.fanoutConns,
      bursts: opts.fanoutBursts,
      warmupBursts: 2,
      payloadBytes: opts.fanoutPayload,
      connectConcurrency: 50,
      timeCapMs: 300_000,
    },
  ];
  return all.filter((w) => opts.only.includes(w.name));
}

/** keel-only workloads: the server runs with its probe and --expose-gc (see load/lifecycle.mjs). */
export function lifecycleWorkloads(opts) {
  const all = [
    {
      // One call at a time to an awake actor, then to each of them asleep (which wakes it).
      name: "wake",
      actors: opts.wakeActors,
      timeCapMs: 300_000,
    },
    {
      // RSS after a full GC, over waves of actors asleep and awake.
      name: "memory",
      actors: opts.memActors,
      concurrency: 64,
      warmupActors: opts.memActors,
      timeCapMs: 300_000,
    },
    {
      // One burst of schedules all due at the same millisecond.
      name: "alarms",
      actors: opts.alarmActors,
      alarmsPerActor: opts.alarms / opts.alarmActors,
      warmupAlarmsPerActor: 50,
      leadMs: opts.alarmLeadMs,
      timeCapMs: opts.alarmLeadMs + 300_000,
    },
  ];
  return all.filter((w) => opts.only.includes(w.name));
}

/** The counter over HTTP under wrk, in both durabilities (see http-wrk.mjs). */
export function httpWorkloads(opts) {
  const all = HTTP_WORKLOADS.map((name) => ({
    name,
    durability: name.endsWith("-relaxed") ? "relaxed" : "full",
    // Sequential: one connection, one key (`-t1 -c1`); concurrent: one per actor.
    actors: name.startsWith("http-sequential") ? 1 : opts.concurrency,
    durationS: opts.durationS,
  }));
  return all.filter((w) => opts.only.includes(w.name));
}

/**
 * One counter, broadcast or life-cycle workload on a fresh server of `kind`, driven by load.mjs.
 * `spec` is the keel tree under test (see startServer).
 */
export async function measure(kind, workload, spec) {
  const lifecycle = LIFECYCLE_WORKLOADS.includes(workload.name);
  const server = await startServer(kind, spec, { probe: lifecycle });
  let result;
  try {
    result = await runLoad(
      lifecycle || FANOUT_WORKLOADS.includes(workload.name)
        ? { ...workload, workload: workload.name, port: server.port, probePort: server.probePort, serverPid: server.child.pid, requestTimeoutMs: 30_000 }
        : {
            port: server.port,
            serverPid: server.child.pid,
            workload: workload.name,
            actors: workload.actors,
            maxCalls: workload.maxCalls,
            durationMs: workload.durationMs,
            warmupCallsPerActor: workload.warmupCallsPerActor,
            requestTimeoutMs: 30_000,
            timeCapMs: workload.durationMs + 120_000,
          },
    );
  } finally {
    const clean = await stopServer(server);
    if (!clean) console.error(`warning: ${kind} server did not shut down cleanly:\n${server.out.stderr}`);
  }
  return result;
}

/** One http-* workload on a fresh server: wrk when there is one, else the JS generator. */
export async function measureHttp(kind, workload, wrk, spec) {
  const server = await startServer(kind, spec, { durability: workload.durability });
  try {
    if (wrk.available) {
      // Many connections are driven by one wrk thread per core (spread.lua): with one thread
      // per connection wrk took most of the machine (bench/README.md).
      const spread = workload.actors > 1;
      return await runWrkCounter({ kind, port: server.port, serverPid: server.child.pid, workload: workload.name, connections: workload.actors, durationS: workload.durationS, spread });
    }
    const result = await runLoad({
      port: server.port,
      serverPid: server.child.pid,
      workload: workload.name,
      peer: kind === "rivetkit" ? "rivetkit" : undefined,
      actors: workload.actors,
      maxCalls: 1_000_000,
      durationMs: workload.durationS * 1000,
      warmupCallsPerActor: workload.actors === 1 ? 100 : 10,
      requestTimeoutMs: 30_000,
      timeCapMs: workload.durationS * 1000 + 120_000,
    });
    return { ...result, client: "js" };
  } finally {
    const clean = await stopServer(server);
    if (!clean) console.error(`warning: ${kind} server did not shut down cleanly:\n${server.out.stderr}`);
  }
}

/**
 * 10,000 actors created by one call each, 64 in flight: under wrk when there is one
 * (wrk/many.lua), else the JS generator (load/counter.mjs, manyActors).
 */
export async function measureManyActors(kind, opts, spec, wrk) {
  const server = await startServer(kind, spec);
  try {
    if (wrk.available) {
      return await runWrkManyActors({ kind, port: server.port, serverPid: server.child.pid, actors: opts.manyActors, connections: 64, timeCapS: 300 });
    }
    const result = await runLoad({
      port: server.port,
      serverPid: server.child.pid,
      workload: "many-actors",
      peer: kind === "rivetkit" ? "rivetkit" : undefined,
      actors: opts.manyActors,
      concurrency: 64,
      requestTimeoutMs: 30_000,
      timeCapMs: 300_000,
    });
    return { ...result, client: "js" };
  } finally {
    const clean = await stopServer(server);
    if (!clean) console.error(`warning: ${kind} server did not shut down cleanly:\n${server.out.stderr}`);
  }
}

/**
 * One of SCRIPT_WORKLOADS: `bench/<name>.mjs --json` as a child on the keel tree under test
 * (KEEL_DIR; the script refuses a debug addon itself), with --rounds and, for db, --duration
 * as its seconds per workload. Returns its report with `verified` set from its exit status.
 */
export function runScript(name, opts, spec) {
  const args = [path.join(benchDir, `${name}.mjs`), "--json", "--rounds", String(opts.rounds)];
  if (name === "db") args.push("--seconds", String(opts.durationS));
  const env = { ...process.env, KEEL_DIR: spec.keelDir };
  delete env.NAPI_RS_NATIVE_LIBRARY_PATH;
  const child = spawnSync(process.execPath, args, { cwd: benchDir, env, encoding: "utf8", timeout: 900_000, maxBuffer: 64 << 20 });
  const line = child.stdout.trim().split("\n").pop();
  let report;
  try {
    report = JSON.parse(line);
  } catch {
    throw new Error(`${name}.mjs printed no report (status ${child.status}${child.signal ? `, ${child.signal}` : ""}):\n${child.stderr.slice(-4000)}`);
  }
  return { ...report, verified: child.status === 0 && report.ok !== false, stderr: child.status === 0 ? undefined : child.stderr.slice(-4000) };
}
