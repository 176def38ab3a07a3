#!/usr/bin/env node
// `npm run bench`: keel vs a plain node:http + ws + better-sqlite3 server, same HTTP and
// WebSocket protocol, same durability promise (reply after an fsynced commit). See
// bench/README.md.
//
// Steps: install bench deps if needed, build the release addon (`npm run build`, what
// `npm install` runs), then for each workload start a
// fresh server child (keel, then the baseline), drive it from a separate load-generator child,
// verify the durable counts, and print/write the figures. The life-cycle workloads (wake,
// memory, alarms) run on keel only. The ws-* workloads are sequential and concurrent again,
// over WebSocket connections; broadcast measures event fan-out to 1,000 connections.
//
// Options:
//   --keel-dir PATH      benchmark the keel tree at PATH (its dist/ and its own release
//                        `<binaryName>.<platform>.node`, built there beforehand with
//                        `npm run build`); implies --no-build. Default: this repo.
//   --no-build           use this repo's addon and dist/ as they are instead of running
//                        `npm run build` (still refused if the addon is a debug build)
//   --only LIST          run only these workloads (comma-separated, from sequential,
//                        concurrent,ws-sequential,ws-concurrent,broadcast,wake,memory,alarms,
//                        http-sequential,http-concurrent,http-sequential-relaxed,
//                        http-concurrent-relaxed,cold-start,idle-rss,many-actors,sockets)
//   --rounds N           repeat every measurement N times and report medians (default 3)
//   --seq-calls N        calls in the sequential workload (default 2000)
//   --concurrency N      actors (= requests in flight) in the concurrent workload (default 64)
//   --duration S         length of the concurrent workload in seconds (default 5)
//   --max-calls N        call budget of the concurrent workload (default 250000)
//   --wake-actors N      actors woken (one call each) in the wake workload (default 1000)
//   --mem-actors N       actors per wave in the memory workload (default 10000)
//   --alarms N           schedules fired in one burst in the alarms workload (default 20000)
//   --alarm-actors N     actors sharing that burst (default 20)
//   --alarm-lead MS      time between setting the schedules and their due time (default 3000)
//   --fanout-conns N     connections in the broadcast workload (default 1000)
//   --fanout-actors N    rooms (actors) they are spread over (default 100)
//   --fanout-bursts N    timed bursts of one broadcast per room (default 10)
//   --fanout-payload N   approximate event payload, in bytes of JSON (default 100)
//   --peers LIST         also run the peers in LIST (comma-separated; only `rivetkit`) on the
//                        http-* workloads and the start-up figures
//   --many-actors N      actors created and called once each in many-actors (default 10000)
//   --cold-rounds N      spawns timed by cold-start and measured by idle-rss (default 5)
//
// The http-* workloads drive HTTP with wrk (installed with apt-get when missing and root; else
// the JS generator, noted in the table), in `full` and `relaxed` durability; see http-wrk.mjs.
// cold-start, idle-rss and many-actors are the start-up figures (see figures.mjs).
//   --socket-conns N     sockets per server in the sockets workload (default 10000)
//   --socket-actors N    actors they are spread over (default 1000)

import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { coldStart, idleRss } from "./figures.mjs";
import { ensureWrk, runWrkCounter } from "./http-wrk.mjs";
import { printSocketsTable, socketsWorkload } from "./sockets.mjs";

const benchDir = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(benchDir, "..");
const resultsDir = path.join(benchDir, "results");

// The keel tree under test and the addon its servers load; main() sets them from --keel-dir.
let keelDir = repoRoot;
let addonPath = null;

// Calls on the counter, keel vs the baseline: over HTTP, then over WebSocket connections.
const COUNTER_WORKLOADS = ["sequential", "concurrent", "ws-sequential", "ws-concurrent"];
// Event fan-out over WebSocket connections, keel vs the baseline.
const FANOUT_WORKLOADS = ["broadcast"];
const LIFECYCLE_WORKLOADS = ["wake", "memory", "alarms"];
// The counter over HTTP driven by wrk, in full and relaxed durability, keel vs the baseline
// (and the peers given with --peers).
const HTTP_WORKLOADS = ["http-sequential", "http-concurrent", "http-sequential-relaxed", "http-concurrent-relaxed"];
// Start-up figures: spawn to first reply, idle RSS, 10,000 actors created (and the peers').
const FIGURE_WORKLOADS = ["cold-start", "idle-rss", "many-actors"];
const PEERS = ["rivetkit"];
// Server memory per open WebSocket, keel (both socket kinds) vs the baseline (sockets.mjs).
const SOCKET_WORKLOADS = ["sockets"];
const ALL_WORKLOADS = [...COUNTER_WORKLOADS, ...FANOUT_WORKLOADS, ...LIFECYCLE_WORKLOADS, ...HTTP_WORKLOADS, ...FIGURE_WORKLOADS, ...SOCKET_WORKLOADS];

// ---------------------------------------------------------------------------------------------
// Options

function parseArgs(argv) {
  const opts = {
    build: true,
    keelDir: null,
    only: ALL_WORKLOADS,
    rounds: 3,
    seqCalls: 2000,
    concurrency: 64,
    durationS: 5,
    maxCalls: 250_000,
    wakeActors: 1000,
    memActors: 10_000,
    alarms: 20_000,
    alarmActors: 20,
    alarmLeadMs: 3000,
    fanoutConns: 1000,
    fanoutActors: 100,
    fanoutBursts: 10,
    fanoutPayload: 100,
    peers: [],
    manyActors: 10_000,
    coldRounds: 5,
    socketConns: 10_000,
    socketActors: 1000,
  };
  const numeric = {
    "--rounds": "rounds",
    "--seq-calls": "seqCalls",
    "--concurrency": "concurrency",
    "--duration": "durationS",
    "--max-calls": "maxCalls",
    "--wake-actors": "wakeActors",
    "--mem-actors": "memActors",
    "--alarms": "alarms",
    "--alarm-actors": "alarmActors",
    "--alarm-lead": "alarmLeadMs",
    "--fanout-conns": "fanoutConns",
    "--fanout-actors": "fanoutActors",
    "--fanout-bursts": "fanoutBursts",
    "--fanout-payload": "fanoutPayload",
    "--many-actors": "manyActors",
    "--cold-rounds": "coldRounds",
    "--socket-conns": "socketConns",
    "--socket-actors": "socketActors",
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--no-build") opts.build = false;
    else if (arg === "--keel-dir") {
      if (!argv[i + 1]) throw new Error("--keel-dir needs a path");
      opts.keelDir = path.resolve(argv[++i]);
      opts.build = false;
    } else if (arg === "--only") {
      const names = (argv[++i] ?? "").split(",").filter(Boolean);
      const known = ALL_WORKLOADS;
      const unknown = names.filter((n) => !known.includes(n));
      if (!names.length || unknown.length) throw new Error(`--only takes a comma-separated list from ${known.join(",")}`);
      opts.only = names;
    } else if (arg === "--peers") {
      const names = (argv[++i] ?? "").split(",").filter(Boolean);
      if (!names.length || names.some((n) => !PEERS.includes(n))) throw new Error(`--peers takes a comma-separated list from ${PEERS.join(",")}`);
      opts.peers = names;
    } else if (arg in numeric) {
      const value = Number(argv[++i]);
      if (!(value > 0)) throw new Error(`${arg} needs a positive number`);
      opts[numeric[arg]] = value;
    } else throw new Error(`unknown option ${arg} (see the top of bench/run.mjs)`);
  }
  // Everything is bounded: cap the knobs so a typo can't start an hour-long run.
  opts.durationS = Math.min(opts.durationS, 60);
  opts.rounds = Math.min(Math.floor(opts.rounds), 10);
  opts.concurrency = Math.min(Math.floor(opts.concurrency), 1024);
  opts.wakeActors = Math.min(Math.floor(opts.wakeActors), 20_000);
  opts.memActors = Math.min(Math.floor(opts.memActors), 100_000);
  opts.alarmActors = Math.min(Math.floor(opts.alarmActors), 1000);
  opts.alarms = Math.min(Math.floor(opts.alarms / opts.alarmActors) * opts.alarmActors, 1_000_000);
  opts.alarmLeadMs = Math.min(opts.alarmLeadMs, 60_000);
  if (opts.alarms < opts.alarmActors) throw new Error("--alarms must be at least --alarm-actors");
  opts.fanoutActors = Math.min(Math.floor(opts.fanoutActors), 1000);
  opts.fanoutConns = Math.min(Math.floor(opts.fanoutConns / opts.fanoutActors) * opts.fanoutActors, 10_000);
  opts.fanoutBursts = Math.min(Math.floor(opts.fanoutBursts), 1000);
  opts.fanoutPayload = Math.min(Math.floor(opts.fanoutPayload), 65_536);
  opts.manyActors = Math.min(Math.floor(opts.manyActors), 100_000);
  opts.coldRounds = Math.min(Math.floor(opts.coldRounds), 20);
  if (opts.fanoutConns < opts.fanoutActors) throw new Error("--fanout-conns must be at least --fanout-actors");
  opts.socketActors = Math.min(Math.floor(opts.socketActors), 5000);
  opts.socketConns = Math.min(Math.floor(opts.socketConns / opts.socketActors) * opts.socketActors, 15_000);
  if (opts.socketConns < opts.socketActors) throw new Error("--socket-conns must be at least --socket-actors");
  return opts;
}

// ---------------------------------------------------------------------------------------------
// Setup: dependencies and the release addon

function run(cmd, args, options = {}) {
  console.error(`$ ${cmd} ${args.join(" ")}`);
  const res = spawnSync(cmd, args, { stdio: "inherit", ...options });
  if (res.error) throw res.error;
  if (res.status !== 0) throw new Error(`${cmd} ${args.join(" ")} exited with ${res.status}`);
}

/** Whether bench/'s own dependencies are installed: better-sqlite3 (built), ws and rivetkit. */
function canLoadDeps() {
  const res = spawnSync(process.execPath, ["-e", "new (require('better-sqlite3'))(':memory:').close(); require('ws'); require.resolve('rivetkit'); require.resolve('@hono/node-server')"], {
    cwd: benchDir,
    stdio: "ignore",
  });
  return res.status === 0;
}

function ensureDeps() {
  if (fs.existsSync(path.join(benchDir, "node_modules")) && canLoadDeps()) return;
  // better-sqlite3 compiles SQLite from source here (its prebuilt download is unreachable);
  // bench/package.json's allowScripts entry is what lets npm run that build.
  run("npm", ["install", "--prefix", "bench", "--no-audit", "--no-fund"], { cwd: repoRoot });
  if (!canLoadDeps()) {
    throw new Error("better-sqlite3, ws or rivetkit still does not load; try `npm rebuild better-sqlite3 --prefix bench`");
  }
}

function addonInfo() {
  const stat = fs.statSync(addonPath);
  // Built in that tree (by `npm run build` above for this repo), from that tree's sources.
  return { path: addonPath, profile: "release", bytes: stat.size, builtFrom: { mtime: stat.mtime.toISOString(), ...gitInfo() } };
}

function checkRootBuilt() {
  for (const file of ["dist/index.js", "index.js"]) {
    if (!fs.existsSync(path.join(keelDir, file))) {
      throw new Error(
        keelDir === repoRoot
          ? `${file} is missing at the repo root: run \`npm install\` there first`
          : `${file} is missing in ${keelDir}: run \`npm run build\` there first`,
      );
    }
  }
}

/**
 * The release addon of a keel tree: napi names it `<napi.binaryName>.<platform>.node`, next to
 * the tree's index.js. A debug build (`npm run build:debug`) has the same name, so refuse one
 * that carries DWARF debug info: the release profile has none, and the debug profile keeps
 * line tables.
 */
function treeAddon(dir) {
  const binaryName = JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8")).napi?.binaryName ?? "keel";
  const candidates = fs.readdirSync(dir).filter((f) => f.startsWith(`${binaryName}.`) && f.endsWith(".node"));
  if (candidates.length !== 1) {
    throw new Error(`expected one ${binaryName}.<platform>.node in ${dir}, found ${candidates.length ? candidates.join(", ") : "none"}; build it there with \`npm run build\``);
  }
  const file = path.join(dir, candidates[0]);
  if (fs.readFileSync(file).includes(".debug_info\0")) {
    throw new Error(`${file} has debug info, so it is not a release build; rebuild it with \`npm run build\``);
  }
  return file;
}

function gitInfo() {
  const git = (...args) => spawnSync("git", args, { cwd: keelDir, encoding: "utf8" }).stdout ?? "";
  return {
    commit: git("rev-parse", "HEAD").trim(),
    // Uncommitted engine changes are compiled into the addon too; record that they existed.
    dirtyEngineFiles: git("status", "--porcelain", "--", "crates", "src", "ts", "Cargo.toml", "Cargo.lock")
      .split("\n")
      .filter(Boolean),
  };
}

/** The soft limit on open files (from /proc/self/limits; children inherit it). */
function openFilesLimit() {
  try {
    const line = fs.readFileSync("/proc/self/limits", "utf8").split("\n").find((l) => l.startsWith("Max open files"));
    return line ? Number(line.split(/\s{2,}/)[1]) : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------
// Disk context: both servers are bound by fsync latency, so record it next to the figures.

function probeDisk() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "keel-bench-fsync-"));
  try {
    const TMPFS_MAGIC = 0x01021994;
    const tmpfs = fs.statfsSync(dir).type === TMPFS_MAGIC;
    const fd = fs.openSync(path.join(dir, "probe"), "w");
    const block = Buffer.alloc(4096, 1);
    const times = [];
    for (let i = 0; i < 100; i++) {
      const t0 = performance.now();
      fs.writeSync(fd, block);
      fs.fdatasyncSync(fd);
      times.push(performance.now() - t0);
    }
    fs.closeSync(fd);
    times.sort((a, b) => a - b);
    return {
      dataDirParent: os.tmpdir(),
      tmpfs,
      writeFdatasyncMs: { p50: round3(times[49]), p99: round3(times[98]) },
    };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// Children

const round3 = (x) => (x === null || x === undefined ? null : Math.round(x * 1000) / 1000);

/** Collects a child's output, keeping only the tail of stderr for error messages. */
function collect(child) {
  const out = { stdout: "", stderr: "" };
  child.stdout.setEncoding("utf8").on("data", (d) => (out.stdout += d));
  child.stderr.setEncoding("utf8").on("data", (d) => (out.stderr = (out.stderr + d).slice(-8000)));
  return out;
}

function exited(child, timeoutMs) {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve(true);
    const timer = setTimeout(() => resolve(false), timeoutMs);
    child.once("exit", () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

/** Starts a server child on a fresh data dir and waits for its ready line. */
async function startServer(kind, { probe = false, durability = null } = {}) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), `keel-bench-${kind}-`));
  const env = { ...process.env };
  delete env.KEEL_BENCH_PROBE;
  delete env.KEEL_BENCH_DURABILITY;
  if (durability) env.KEEL_BENCH_DURABILITY = durability;
  if (kind === "keel") {
    env.NAPI_RS_NATIVE_LIBRARY_PATH = addonPath;
    env.KEEL_BENCH_KEEL_DIR = keelDir;
    // The life-cycle workloads read memory and the awake count from the server's probe.
    if (probe) env.KEEL_BENCH_PROBE = "1";
  } else delete env.NAPI_RS_NATIVE_LIBRARY_PATH;
  const nodeArgs = probe ? ["--expose-gc"] : [];
  const child = spawn(process.execPath, [...nodeArgs, path.join(benchDir, "servers", `${kind}.mjs`), dataDir], {
    cwd: benchDir,
    env,
    stdio: ["pipe", "pipe", "pipe"],
  });
  const out = collect(child);
  const ready = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${kind} server not ready after 60 s`)), 60_000);
    const onData = () => {
      const line = out.stdout.split("\n").find((l) => l.startsWith("{"));
      if (!line) return;
      clearTimeout(timer);
      child.stdout.off("data", onData);
      resolve(JSON.parse(line));
    };
    child.stdout.on("data", onData);
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${kind} server exited early (${code ?? signal}):\n${out.stderr}`));
    });
  }).catch(async (err) => {
    child.kill("SIGKILL");
    fs.rmSync(dataDir, { recursive: true, force: true });
    throw err;
  });
  return { kind, child, out, dataDir, port: ready.port, probePort: ready.probePort ?? null };
}

/** Asks a server to shut down (by closing its stdin) and removes its data dir. */
async function stopServer(server) {
  server.child.stdin.end();
  let clean = await exited(server.child, 30_000);
  if (!clean) {
    console.error(`${server.kind} server did not stop within 30 s; killing pid ${server.child.pid}`);
    server.child.kill("SIGKILL");
    await exited(server.child, 5_000);
  }
  fs.rmSync(server.dataDir, { recursive: true, force: true });
  return clean && server.child.exitCode === 0;
}

/** Runs the load generator child against a port and returns its JSON result. */
async function runLoad(config) {
  const child = spawn(process.execPath, [path.join(benchDir, "load.mjs"), JSON.stringify(config)], {
    cwd: benchDir,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const out = collect(child);
  // The generator stops itself at timeCapMs; this is only the backstop.
  if (!(await exited(child, config.timeCapMs + 15_000))) {
    child.kill("SIGKILL");
    throw new Error(`load generator hung (pid ${child.pid})`);
  }
  if (child.exitCode !== 0) throw new Error(`load generator failed (${child.exitCode}):\n${out.stderr}`);
  return JSON.parse(out.stdout.trim().split("\n").pop());
}

// ---------------------------------------------------------------------------------------------
// Workloads

function workloads(opts) {
  return [...counterWorkloads(opts), ...fanoutWorkloads(opts), ...lifecycleWorkloads(opts)];
}

function counterWorkloads(opts) {
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

/** Event fan-out over WebSocket connections (see load.mjs, `broadcast`). */
function fanoutWorkloads(opts) {
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

/** keel-only workloads: the server runs with its probe and --expose-gc (see load.mjs). */
function lifecycleWorkloads(opts) {
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

async function measure(kind, workload) {
  const lifecycle = LIFECYCLE_WORKLOADS.includes(workload.name);
  const server = await startServer(kind, { probe: lifecycle });
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

/** The counter over HTTP under wrk, in both durabilities (see http-wrk.mjs). */
function httpWorkloads(opts) {
  const all = HTTP_WORKLOADS.map((name) => ({
    name,
    durability: name.endsWith("-relaxed") ? "relaxed" : "full",
    // Sequential: one connection, one key (`-t1 -c1`); concurrent: one per actor.
    actors: name.startsWith("http-sequential") ? 1 : opts.concurrency,
    durationS: opts.durationS,
  }));
  return all.filter((w) => opts.only.includes(w.name));
}

/** One http-* workload on a fresh server: wrk when there is one, else the JS generator. */
async function measureHttp(kind, workload, wrk) {
  const server = await startServer(kind, { durability: workload.durability });
  try {
    if (wrk.available) {
      return await runWrkCounter({ kind, port: server.port, serverPid: server.child.pid, workload: workload.name, connections: workload.actors, durationS: workload.durationS });
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

/** 10,000 actors created by one call each, 64 in flight (load.mjs, many-actors). */
async function measureManyActors(kind, opts) {
  const server = await startServer(kind);
  try {
    return await runLoad({
      port: server.port,
      serverPid: server.child.pid,
      workload: "many-actors",
      peer: kind === "rivetkit" ? "rivetkit" : undefined,
      actors: opts.manyActors,
      concurrency: 64,
      requestTimeoutMs: 30_000,
      timeCapMs: 300_000,
    });
  } finally {
    const clean = await stopServer(server);
    if (!clean) console.error(`warning: ${kind} server did not shut down cleanly:\n${server.out.stderr}`);
  }
}

/** keel/other ratios of the figures of one http-* workload. */
function httpRatios(keel, other) {
  return { callsPerSec: round3(keel.callsPerSec / other.callsPerSec), p50Ms: round3(keel.p50Ms / other.p50Ms), p99Ms: round3(keel.p99Ms / other.p99Ms) };
}

function printHttpTable(summary, wrk) {
  const rows = [["workload", "server", "client", "calls/s", "p50 ms", "p99 ms", "server CPU µs/call", "calls", "errors", "verified"]];
  for (const name of HTTP_WORKLOADS) {
    const w = summary[name];
    if (!w) continue;
    for (const kind of Object.keys(w.servers)) {
      const s = w.servers[kind];
      rows.push([name, kind, s.client, s.callsPerSec.toFixed(1), s.p50Ms.toFixed(3), s.p99Ms.toFixed(3), s.cpuUsPerCall.server.toFixed(0), String(s.calls), String(s.errors), s.verified ? "yes" : "NO"]);
    }
    for (const [other, r] of Object.entries(w.ratio)) {
      rows.push([name, `keel/${other}`, "", `${r.callsPerSec.toFixed(2)}x`, `${r.p50Ms.toFixed(2)}x`, `${r.p99Ms.toFixed(2)}x`, "", "", "", ""]);
    }
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
  const line = (row) => row.map((cell, i) => (i < 3 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join("  ");
  console.log(line(rows[0]));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const row of rows.slice(1)) console.log(line(row));
  console.log(
    `http-*: ${wrk.available ? `${wrk.version}, one thread and one connection per key` : `JS load generator (${wrk.note})`}; ` +
      "-relaxed = keel `durability: \"relaxed\"`, baseline synchronous=NORMAL. RivetKit has no such setting: it replies before writing state " +
      "(saved at most every 10 s, written and renamed without fsync), in both rows.",
  );
}

/** Medians of the start-up figures for each server, and the goals they are held to. */
function summarizeFigures(raw, summary) {
  const out = {};
  const kinds = (name) => Object.keys(raw[name] ?? {});
  if (raw["cold-start"]) out.coldStart = Object.fromEntries(kinds("cold-start").map((k) => [k, raw["cold-start"][k][0]]));
  if (raw["idle-rss"]) out.idleRss = Object.fromEntries(kinds("idle-rss").map((k) => [k, raw["idle-rss"][k][0]]));
  if (raw["many-actors"]) {
    out.manyActors = Object.fromEntries(
      kinds("many-actors").map((k) => {
        const rounds = raw["many-actors"][k];
        return [k, {
          actors: rounds[0].actors,
          elapsedMs: rounds[0].elapsedMs,
          serverRssBytes: rounds[0].serverRssBytes,
          errors: rounds.reduce((n, r) => n + r.errors, 0),
          verified: rounds.every((r) => r.verify.ok),
        }];
      }),
    );
  }
  if (summary.memory) out.memoryBytesPerActor = summary.memory.bytesPerActor;
  out.goals = { coldStartMs: 150, manyActorsMs: 2000, manyActorsRssMB: 150, idleRssMB: 60 };
  return out;
}

function printFiguresTable(f) {
  const mb = (b) => (b / 1048576).toFixed(1);
  const kinds = ["keel", "baseline", ...PEERS].filter((k) => f.coldStart?.[k] || f.idleRss?.[k] || f.manyActors?.[k]);
  const rows = [["figure", "goal (keel)", ...kinds, ...kinds.filter((k) => k !== "keel").map((k) => `keel/${k}`), "keel meets goal"]];
  const add = (label, goal, pick, fmt, meets) => {
    const values = kinds.map((k) => pick(k));
    if (values[0] === undefined) return;
    const ratios = kinds.slice(1).map((_, i) => (values[i + 1] === undefined ? "" : `${(values[0] / values[i + 1]).toFixed(2)}x`));
    rows.push([label, goal, ...values.map((v) => (v === undefined ? "" : fmt(v))), ...ratios, meets === null ? "" : meets(values[0]) ? "yes" : "NO"]);
  };
  const g = f.goals;
  add("cold start ms (spawn to first reply)", `< ${g.coldStartMs}`, (k) => f.coldStart?.[k]?.ms, (v) => v.toFixed(1), (v) => v < g.coldStartMs);
  add(`idle RSS MB (no actors)`, `< ${g.idleRssMB}`, (k) => f.idleRss?.[k]?.rssBytes, mb, (v) => v / 1048576 < g.idleRssMB);
  // The goals are for 10,000 actors; another --many-actors count is shown without them.
  const n = f.manyActors?.keel?.actors ?? 10_000;
  const held = n === 10_000;
  add(`${n} actors created+called, ms`, held ? `< ${g.manyActorsMs}` : "", (k) => f.manyActors?.[k]?.elapsedMs, (v) => v.toFixed(0), held ? (v) => v < g.manyActorsMs : null);
  add(`RSS MB after ${n} actors`, held ? `< ${g.manyActorsRssMB}` : "", (k) => f.manyActors?.[k]?.serverRssBytes, mb, held ? (v) => v / 1048576 < g.manyActorsRssMB : null);
  if (f.memoryBytesPerActor) {
    add("RSS bytes/actor, awake", "", (k) => (k === "keel" ? f.memoryBytesPerActor.awake : undefined), String, null);
    add("RSS bytes/actor, asleep", "", (k) => (k === "keel" ? f.memoryBytesPerActor.asleep : undefined), String, null);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
  const line = (row) => row.map((cell, i) => (i < 1 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join("  ");
  console.log(line(rows[0]));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const row of rows.slice(1)) console.log(line(row));
  console.log(
    "start-up: keel runs the README counter; medians over the spawns (cold start, idle RSS); one run of the actors on each server. Ratios are keel/peer, below 1x " +
      "means keel is faster or smaller. RivetKit needs two requests to create and call an actor (PUT /actors, then the action); keel and the baseline one. " +
      "bytes/actor come from the memory workload (keel only).",
  );
}

// ---------------------------------------------------------------------------------------------
// Reporting

function describeLifecycle(r) {
  if (r.workload === "wake") {
    return `awake p50 ${r.awakeMs.p50} ms p99 ${r.awakeMs.p99} ms; asleep p50 ${r.wakeMs.p50} ms p99 ${r.wakeMs.p99} ms; ${r.actors} actors all asleep after ${r.waitAllAsleepMs} ms`;
  }
  if (r.workload === "memory") {
    const mib = (b) => (b / 1048576).toFixed(1);
    const p = r.probes;
    return `RSS MiB base ${mib(p.base.rss)}, +${r.actors} asleep ${mib(p.asleep.rss)}, +${r.actors} awake ${mib(p.awake.rss)}, all asleep ${mib(p.napped.rss)}; bytes/actor awake ${r.bytesPerActor.awake}, asleep ${r.bytesPerActor.asleep}`;
  }
  return `${r.alarms} alarms: set in ${r.setupMs} ms, first ${r.firstLagMs} ms after due, last ${r.spanMs} ms after due: ${r.alarmsPerSec} alarms/s; fired ${r.fired}`;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
};

/** Medians over rounds of each figure (for one round, the figures themselves). */
function summarize(rounds) {
  return {
    callsPerSec: round3(median(rounds.map((r) => r.callsPerSec))),
    // The spread across rounds: on a shared machine it says how far to trust the median.
    callsPerSecRange: [Math.min(...rounds.map((r) => r.callsPerSec)), Math.max(...rounds.map((r) => r.callsPerSec))],
    p50Ms: round3(median(rounds.map((r) => r.latencyMs.p50))),
    p99Ms: round3(median(rounds.map((r) => r.latencyMs.p99))),
    // CPU per call in µs, the server's and the load generator's (same machine, 10 ms ticks).
    cpuUsPerCall: {
      server: round3(median(rounds.map((r) => r.cpuUsPerCall?.server ?? NaN))),
      client: round3(median(rounds.map((r) => r.cpuUsPerCall?.client ?? NaN))),
    },
    calls: rounds.reduce((n, r) => n + r.calls, 0),
    errors: rounds.reduce((n, r) => n + r.errors + r.warmupErrors, 0),
    verified: rounds.every((r) => r.verify.ok),
  };
}

/** Medians over rounds of the broadcast figures of one server. */
function summarizeFanout(rounds) {
  const med = (pick) => round3(median(rounds.map(pick)));
  const fanouts = rounds.map((r) => r.fanoutMs.median);
  return {
    rooms: rounds[0].rooms,
    connections: rounds[0].connections,
    payloadBytes: rounds[0].payloadBytes,
    burstsPerRound: rounds[0].bursts,
    fanoutMs: med((r) => r.fanoutMs.median),
    fanoutMsRange: [Math.min(...fanouts), Math.max(...fanouts)],
    eventsPerSec: med((r) => r.eventsPerSec),
    deliveryP50Ms: med((r) => r.deliveryMs.p50),
    deliveryP99Ms: med((r) => r.deliveryMs.p99),
    replyP50Ms: med((r) => r.replyMs.p50),
    replyP99Ms: med((r) => r.replyMs.p99),
    connectMs: med((r) => r.connectMs),
    cpuMsPerBurst: { client: med((r) => r.cpuMsPerBurst.client), server: med((r) => r.cpuMsPerBurst.server ?? NaN) },
    errors: rounds.reduce((n, r) => n + r.errors, 0),
    verified: rounds.every((r) => r.verify.ok),
  };
}

function describeFanout(r) {
  return (
    `${r.connections} connections over ${r.rooms} rooms opened in ${r.connectMs} ms; fan-out median ${r.fanoutMs.median} ms ` +
    `(${r.fanoutMs.min}..${r.fanoutMs.max}) over ${r.bursts} bursts; delivery p50 ${r.deliveryMs.p50} ms p99 ${r.deliveryMs.p99} ms; ` +
    `reply p99 ${r.replyMs.p99} ms; ${r.errors} errors`
  );
}

function printFanoutTable(summary) {
  const rows = [["workload", "server", "fan-out ms", "events/s", "delivery p50 ms", "delivery p99 ms", "CPU ms/burst srv+client", "connect ms", "errors", "verified"]];
  for (const name of FANOUT_WORKLOADS) {
    const w = summary[name];
    if (!w) continue;
    for (const kind of ["keel", "baseline"]) {
      const s = w[kind];
      const cpu = `${s.cpuMsPerBurst.server.toFixed(0)}+${s.cpuMsPerBurst.client.toFixed(0)}`;
      rows.push([name, kind, s.fanoutMs.toFixed(3), s.eventsPerSec.toFixed(0), s.deliveryP50Ms.toFixed(3), s.deliveryP99Ms.toFixed(3), cpu, s.connectMs.toFixed(0), String(s.errors), s.verified ? "yes" : "NO"]);
    }
    const r = w.ratio;
    rows.push([name, "keel/baseline", `${r.fanoutMs.toFixed(2)}x`, "", `${r.deliveryP50Ms.toFixed(2)}x`, `${r.deliveryP99Ms.toFixed(2)}x`, "", "", "", ""]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
  const line = (row) => row.map((cell, i) => (i < 2 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join("  ");
  console.log(line(rows[0]));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const row of rows.slice(1)) console.log(line(row));
  const b = summary.broadcast.keel;
  console.log(
    `broadcast: ${b.connections} connections, ${b.connections / b.rooms} per room, one action per room per burst, ~${b.payloadBytes}-byte payload; ` +
      "fan-out = first action sent to last event received (median burst); delivery = action sent to event received, per connection; ratio below 1x means keel delivers sooner.",
  );
  console.log("NOTE: the baseline does no durable write; keel does one commit per action (the room counts its broadcasts in durable state) and sends the events after it.");
}

/** Medians over rounds of the life-cycle figures, with their ratios. */
function summarizeLifecycle(name, rounds, summary) {
  const med = (pick) => round3(median(rounds.map(pick)));
  const verified = rounds.every((r) => r.verify.ok);
  if (name === "wake") {
    const awake = { p50Ms: med((r) => r.awakeMs.p50), p99Ms: med((r) => r.awakeMs.p99) };
    const wake = { p50Ms: med((r) => r.wakeMs.p50), p99Ms: med((r) => r.wakeMs.p99) };
    return {
      actors: rounds[0].actors,
      awake,
      wake,
      ratio: { p50Ms: round3(wake.p50Ms / awake.p50Ms), p99Ms: round3(wake.p99Ms / awake.p99Ms) },
      waitAllAsleepMs: med((r) => r.waitAllAsleepMs),
      verified,
    };
  }
  if (name === "memory") {
    return {
      actors: rounds[0].actors,
      bytesPerActor: {
        awake: Math.round(median(rounds.map((r) => r.bytesPerActor.awake))),
        asleep: Math.round(median(rounds.map((r) => r.bytesPerActor.asleep))),
        napped: Math.round(median(rounds.map((r) => r.bytesPerActor.napped))),
      },
      bytesPerActorRange: {
        awake: [Math.min(...rounds.map((r) => r.bytesPerActor.awake)), Math.max(...rounds.map((r) => r.bytesPerActor.awake))],
        asleep: [Math.min(...rounds.map((r) => r.bytesPerActor.asleep)), Math.max(...rounds.map((r) => r.bytesPerActor.asleep))],
        napped: [Math.min(...rounds.map((r) => r.bytesPerActor.napped)), Math.max(...rounds.map((r) => r.bytesPerActor.napped))],
      },
      heapUsedBytesPerActor: {
        awake: Math.round(median(rounds.map((r) => r.breakdownPerActor.awake.heapUsed))),
        asleep: Math.round(median(rounds.map((r) => r.breakdownPerActor.asleep.heapUsed))),
      },
      baseRssBytes: Math.round(median(rounds.map((r) => r.probes.base.rss))),
      verified,
    };
  }
  // alarms: plain calls/s of the concurrent workload (keel, same run) is the reference.
  const alarmsPerSec = med((r) => r.alarmsPerSec);
  const reference = summary.concurrent?.keel.callsPerSec ?? null;
  return {
    actors: rounds[0].actors,
    alarms: rounds[0].alarms,
    alarmsPerSec,
    alarmsPerSecRange: [Math.min(...rounds.map((r) => r.alarmsPerSec)), Math.max(...rounds.map((r) => r.alarmsPerSec))],
    firstLagMs: med((r) => r.firstLagMs),
    spanMs: med((r) => r.spanMs),
    setupMs: med((r) => r.setupMs),
    referenceCallsPerSec: reference,
    ratio: { alarmsPerCall: reference ? round3(alarmsPerSec / reference) : null },
    verified,
  };
}

function printLifecycleTable(summary) {
  const rows = [["workload", "figure", "keel", "reference", "ratio", "verified"]];
  const x = (r) => (r === null || r === undefined ? "" : `${r.toFixed(2)}x`);
  const yes = (w) => (w.verified ? "yes" : "NO");
  if (summary.wake) {
    const w = summary.wake;
    rows.push(["wake", "p50 ms, asleep vs awake", w.wake.p50Ms.toFixed(3), w.awake.p50Ms.toFixed(3), x(w.ratio.p50Ms), yes(w)]);
    rows.push(["wake", "p99 ms, asleep vs awake", w.wake.p99Ms.toFixed(3), w.awake.p99Ms.toFixed(3), x(w.ratio.p99Ms), yes(w)]);
  }
  if (summary.memory) {
    const m = summary.memory;
    rows.push(["memory", "RSS bytes/actor, awake", String(m.bytesPerActor.awake), "", "", yes(m)]);
    rows.push(["memory", "RSS bytes/actor, asleep", String(m.bytesPerActor.asleep), "", "", yes(m)]);
    rows.push(["memory", "RSS bytes/actor, awake then asleep", String(m.bytesPerActor.napped), "", "", yes(m)]);
  }
  if (summary.alarms) {
    const a = summary.alarms;
    rows.push(["alarms", "alarms/s vs calls/s (concurrent)", a.alarmsPerSec.toFixed(1), a.referenceCallsPerSec === null ? "" : a.referenceCallsPerSec.toFixed(1), x(a.ratio.alarmsPerCall), yes(a)]);
    rows.push(["alarms", "first alarm late by ms", a.firstLagMs.toFixed(0), "", "", yes(a)]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
  const line = (row) => row.map((cell, i) => (i < 2 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join("  ");
  console.log(line(rows[0]));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const row of rows.slice(1)) console.log(line(row));
  console.log("life cycle (keel only): wake ratio = call to an asleep actor / call to an awake one; memory = RSS delta after a full GC over the wave; alarms ratio = alarms fired/s / plain calls/s.");
}

function printTable(summary) {
  const rows = [["workload", "server", "calls/s", "p50 ms", "p99 ms", "server CPU µs/call", "calls", "errors", "verified"]];
  for (const [name, w] of Object.entries(summary)) {
    if (!COUNTER_WORKLOADS.includes(name)) continue;
    for (const kind of ["keel", "baseline"]) {
      const s = w[kind];
      rows.push([name, kind, s.callsPerSec.toFixed(1), s.p50Ms.toFixed(3), s.p99Ms.toFixed(3), s.cpuUsPerCall.server.toFixed(0), String(s.calls), String(s.errors), s.verified ? "yes" : "NO"]);
    }
    const r = w.ratio;
    rows.push([name, "keel/baseline", `${r.callsPerSec.toFixed(2)}x`, `${r.p50Ms.toFixed(2)}x`, `${r.p99Ms.toFixed(2)}x`, "", "", "", ""]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
  const line = (row) => row.map((cell, i) => (i < 2 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join("  ");
  console.log(line(rows[0]));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const row of rows.slice(1)) console.log(line(row));
  console.log("ratio: calls/s above 1x means keel is faster; p50/p99 below 1x means keel answers sooner.");
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  if (opts.keelDir) keelDir = opts.keelDir;
  ensureDeps();
  // This repo's release addon and dist/, brought up to date (incrementally) by the build that
  // `npm install` runs. Another tree (--keel-dir) is built there beforehand.
  if (opts.build) run("npm", ["run", "build"], { cwd: repoRoot });
  checkRootBuilt();
  addonPath = treeAddon(keelDir);
  const tree = gitInfo();
  console.error(`keel tree: ${keelDir} at ${tree.commit || "(not a git checkout)"}; addon ${addonPath}, built ${fs.statSync(addonPath).mtime.toISOString()}`);
  if (tree.dirtyEngineFiles.length) console.error(`warning: ${keelDir} has uncommitted engine changes: ${tree.dirtyEngineFiles.join(", ")}`);

  // wrk for the http-* workloads (installed here when missing and root).
  const wrk = httpWorkloads(opts).length ? ensureWrk() : { available: false, version: null, note: "not used" };

  const disk = probeDisk();
  if (disk.tmpfs) console.error(`warning: ${disk.dataDirParent} is tmpfs; fsync costs nothing there and the figures will not reflect a disk`);
  console.error(`disk: write+fdatasync p50 ${disk.writeFdatasyncMs.p50} ms, p99 ${disk.writeFdatasyncMs.p99} ms`);

  const startedAt = new Date().toISOString();
  const loadavgStart = os.loadavg();
  const raw = {};
  for (let round = 0; round < opts.rounds; round++) {
    // Alternate which server goes first so neither always gets the quieter slot.
    const order = round % 2 === 0 ? ["keel", "baseline"] : ["baseline", "keel"];
    for (const workload of counterWorkloads(opts)) {
      for (const kind of order) {
        console.error(`round ${round + 1}/${opts.rounds}: ${workload.name} on ${kind} ...`);
        const result = await measure(kind, workload);
        console.error(
          `  ${result.callsPerSec} calls/s, p50 ${result.latencyMs.p50} ms, p99 ${result.latencyMs.p99} ms, ` +
            `${result.calls} calls, ${result.errors} errors, verified: ${result.verify.ok}`,
        );
        ((raw[workload.name] ??= {})[kind] ??= []).push(result);
      }
    }
    for (const workload of fanoutWorkloads(opts)) {
      for (const kind of order) {
        console.error(`round ${round + 1}/${opts.rounds}: ${workload.name} on ${kind} ...`);
        const result = await measure(kind, workload);
        console.error(`  ${describeFanout(result)}, verified: ${result.verify.ok}`);
        ((raw[workload.name] ??= {})[kind] ??= []).push(result);
      }
    }
    for (const workload of lifecycleWorkloads(opts)) {
      console.error(`round ${round + 1}/${opts.rounds}: ${workload.name} on keel ...`);
      const result = await measure("keel", workload);
      console.error(`  ${describeLifecycle(result)}, verified: ${result.verify.ok}`);
      ((raw[workload.name] ??= {}).keel ??= []).push(result);
    }
    for (const workload of httpWorkloads(opts)) {
      for (const kind of [...order, ...opts.peers]) {
        console.error(`round ${round + 1}/${opts.rounds}: ${workload.name} on ${kind} ...`);
        const result = await measureHttp(kind, workload, wrk);
        console.error(
          `  ${result.client}: ${result.callsPerSec} calls/s, p50 ${result.latencyMs.p50} ms, p99 ${result.latencyMs.p99} ms, ` +
            `${result.calls} calls, ${result.errors} errors, verified: ${result.verify.ok}`,
        );
        ((raw[workload.name] ??= {})[kind] ??= []).push(result);
      }
    }
  }
  // Start-up figures, once per run: 10,000 actors on each server (the baseline's fsync per
  // new row makes it the longest step of a run), then cold start and idle RSS over their own
  // spawns (--cold-rounds).
  if (opts.only.includes("many-actors")) {
    for (const kind of ["keel", "baseline", ...opts.peers]) {
      console.error(`many-actors on ${kind} ...`);
      const result = await measureManyActors(kind, opts);
      console.error(`  ${result.actors} actors in ${result.elapsedMs} ms, server RSS ${(result.serverRssBytes / 1048576).toFixed(1)} MiB, ${result.errors} errors`);
      ((raw["many-actors"] ??= {})[kind] ??= []).push(result);
    }
  }
  for (const name of ["cold-start", "idle-rss"]) {
    if (!opts.only.includes(name)) continue;
    for (const kind of ["keel", "baseline", ...opts.peers]) {
      console.error(`${name} on ${kind} (${opts.coldRounds} spawns) ...`);
      const spec = { addonPath, keelDir };
      const result = name === "cold-start" ? await coldStart(kind, spec, opts.coldRounds) : await idleRss(kind, spec, opts.coldRounds);
      console.error(name === "cold-start" ? `  median ${result.ms} ms (${result.perRoundMs.join(", ")})` : `  median RSS ${(result.rssBytes / 1048576).toFixed(1)} MiB`);
      ((raw[name] ??= {})[kind] ??= []).push(result);
    }
  }

  const summary = {};
  for (const [name, byKind] of Object.entries(raw)) {
    if (LIFECYCLE_WORKLOADS.includes(name)) continue;
    if (HTTP_WORKLOADS.includes(name) || FIGURE_WORKLOADS.includes(name)) continue;
    if (FANOUT_WORKLOADS.includes(name)) {
      const keel = summarizeFanout(byKind.keel);
      const baseline = summarizeFanout(byKind.baseline);
      summary[name] = {
        keel,
        baseline,
        ratio: {
          fanoutMs: round3(keel.fanoutMs / baseline.fanoutMs),
          deliveryP50Ms: round3(keel.deliveryP50Ms / baseline.deliveryP50Ms),
          deliveryP99Ms: round3(keel.deliveryP99Ms / baseline.deliveryP99Ms),
        },
        durableWrites: { keel: "one commit per broadcast action", baseline: "none" },
      };
      continue;
    }
    const keel = summarize(byKind.keel);
    const baseline = summarize(byKind.baseline);
    summary[name] = {
      keel,
      baseline,
      ratio: {
        callsPerSec: round3(keel.callsPerSec / baseline.callsPerSec),
        p50Ms: round3(keel.p50Ms / baseline.p50Ms),
        p99Ms: round3(keel.p99Ms / baseline.p99Ms),
      },
    };
  }
  for (const name of HTTP_WORKLOADS) {
    if (!raw[name]) continue;
    const servers = Object.fromEntries(Object.entries(raw[name]).map(([kind, rounds]) => [kind, { ...summarize(rounds), client: rounds[0].client }]));
    const ratio = Object.fromEntries(Object.keys(servers).filter((k) => k !== "keel").map((k) => [k, httpRatios(servers.keel, servers[k])]));
    summary[name] = { durability: name.endsWith("-relaxed") ? "relaxed" : "full", servers, ratio };
  }
  // After the loop above: the alarms figures take the concurrent workload's calls/s as reference.
  for (const name of LIFECYCLE_WORKLOADS) {
    if (raw[name]) summary[name] = summarizeLifecycle(name, raw[name].keel, summary);
  }
  // Memory per socket is measured once, whatever --rounds says (see sockets.mjs).
  if (opts.only.includes("sockets")) {
    summary.sockets = await socketsWorkload({ connections: opts.socketConns, actors: opts.socketActors, addonPath, keelDir });
  }

  const figures = FIGURE_WORKLOADS.some((n) => raw[n]) ? summarizeFigures(raw, summary) : null;

  const report = {
    startedAt,
    finishedAt: new Date().toISOString(),
    machine: {
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model,
      node: process.version,
      loadavgStart,
      loadavgEnd: os.loadavg(),
      // Each WebSocket is a file descriptor in both the load generator and the server.
      openFilesLimit: openFilesLimit(),
    },
    // The tree the JS layer (dist/) was loaded from; the addon's own source is in addon.builtFrom.
    git: gitInfo(),
    addon: addonInfo(),
    disk,
    options: opts,
    workloads: workloads(opts),
    summary,
    // The start-up figures (cold start, idle RSS, many actors, memory per actor) and goals.
    figures,
    loadGenerator: { http: wrk.available ? wrk.version : "js", note: wrk.note },
    rounds: raw,
  };
  fs.mkdirSync(resultsDir, { recursive: true });
  const out = path.join(resultsDir, "latest.json");
  fs.writeFileSync(out, JSON.stringify(report, null, 2) + "\n");

  console.log("");
  if (Object.keys(summary).some((name) => COUNTER_WORKLOADS.includes(name))) printTable(summary);
  if (Object.keys(summary).some((name) => FANOUT_WORKLOADS.includes(name))) {
    console.log("");
    printFanoutTable(summary);
  }
  if (Object.keys(summary).some((name) => LIFECYCLE_WORKLOADS.includes(name))) {
    console.log("");
    printLifecycleTable(summary);
  }
  if (HTTP_WORKLOADS.some((name) => summary[name])) {
    console.log("");
    printHttpTable(summary, wrk);
  }
  if (figures) {
    console.log("");
    printFiguresTable(figures);
  }
  if (summary.sockets) {
    console.log("");
    printSocketsTable(summary.sockets);
  }
  const la = report.machine;
  console.log(`\nload average (1/5/15 min): ${la.loadavgStart.map((x) => x.toFixed(2)).join(" ")} at the start, ${la.loadavgEnd.map((x) => x.toFixed(2)).join(" ")} at the end; ${la.cpus} CPUs`);
  console.log(`\nwritten to ${path.relative(process.cwd(), out) || out}`);

  const figuresFailed = FIGURE_WORKLOADS.some((name) => Object.values(raw[name] ?? {}).some((rounds) => rounds.some((r) => !r.verify.ok || r.errors)));
  const failed = figuresFailed || Object.entries(summary).some(([name, w]) =>
    HTTP_WORKLOADS.includes(name)
      ? Object.values(w.servers).some((s) => !s.verified || s.errors)
      : COUNTER_WORKLOADS.includes(name) || FANOUT_WORKLOADS.includes(name)
      ? !w.keel.verified || !w.baseline.verified || w.keel.errors || w.baseline.errors
      : !w.verified,
  );
  if (failed) {
    console.error("FAILED: some calls errored, a durable count did not match its acknowledged increments, or a life-cycle check failed (see latest.json)");
    process.exitCode = 1;
  }
}

main().catch((err) => {
  console.error(`bench: ${err.stack ?? err}`);
  process.exit(1);
});
