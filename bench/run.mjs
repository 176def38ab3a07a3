#!/usr/bin/env node
// `npm run bench`: keel vs a plain node:http + better-sqlite3 server, same HTTP protocol, same
// durability promise (reply after an fsynced commit). See bench/README.md.
//
// Steps: install bench deps if needed, build the release addon, then for each workload start a
// fresh server child (keel, then the baseline), drive it from a separate load-generator child,
// verify the durable counts, and print/write the figures.
//
// Options:
//   --no-build           reuse bench/.native/keel.node instead of running cargo
//   --rounds N           repeat every measurement N times and report medians (default 3)
//   --seq-calls N        calls in the sequential workload (default 2000)
//   --concurrency N      actors (= requests in flight) in the concurrent workload (default 64)
//   --duration S         length of the concurrent workload in seconds (default 5)
//   --max-calls N        call budget of the concurrent workload (default 250000)

import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const benchDir = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(benchDir, "..");
const nativeDir = path.join(benchDir, ".native");
const addonPath = path.join(nativeDir, "keel.node");
const buildInfoPath = path.join(nativeDir, "build.json");
const resultsDir = path.join(benchDir, "results");

// ---------------------------------------------------------------------------------------------
// Options

function parseArgs(argv) {
  const opts = { build: true, rounds: 3, seqCalls: 2000, concurrency: 64, durationS: 5, maxCalls: 250_000 };
  const numeric = { "--rounds": "rounds", "--seq-calls": "seqCalls", "--concurrency": "concurrency", "--duration": "durationS", "--max-calls": "maxCalls" };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--no-build") opts.build = false;
    else if (arg in numeric) {
      const value = Number(argv[++i]);
      if (!(value > 0)) throw new Error(`${arg} needs a positive number`);
      opts[numeric[arg]] = value;
    } else throw new Error(`unknown option ${arg} (see the top of bench/run.mjs)`);
  }
  // Everything is bounded: cap the knobs so a typo can't start an hour-long run.
  opts.durationS = Math.min(opts.durationS, 60);
  opts.rounds = Math.min(Math.floor(opts.rounds), 10);
  opts.concurrency = Math.min(Math.floor(opts.concurrency), 1024);
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

function canLoadBetterSqlite() {
  const res = spawnSync(process.execPath, ["-e", "new (require('better-sqlite3'))(':memory:').close()"], {
    cwd: benchDir,
    stdio: "ignore",
  });
  return res.status === 0;
}

function ensureDeps() {
  if (fs.existsSync(path.join(benchDir, "node_modules")) && canLoadBetterSqlite()) return;
  // better-sqlite3 compiles SQLite from source here (its prebuilt download is unreachable);
  // bench/package.json's allowScripts entry is what lets npm run that build.
  run("npm", ["install", "--prefix", "bench", "--no-audit", "--no-fund"], { cwd: repoRoot });
  if (!canLoadBetterSqlite()) {
    throw new Error("better-sqlite3 still does not load; try `npm rebuild better-sqlite3 --prefix bench`");
  }
}

function cargoTargetDir() {
  const res = spawnSync("cargo", ["metadata", "--format-version", "1", "--no-deps"], {
    cwd: repoRoot,
    encoding: "utf8",
    maxBuffer: 64 * 1024 * 1024,
  });
  if (res.status !== 0) throw new Error(`cargo metadata failed: ${res.stderr}`);
  return JSON.parse(res.stdout).target_directory;
}

function buildAddon() {
  // A plain cargo build rather than `napi build`: napi would also regenerate index.js and
  // index.d.ts at the root, which belong to the root build. The loader only needs the .so.
  run("cargo", ["build", "--release", "-p", "keel"], { cwd: repoRoot });
  const built = path.join(cargoTargetDir(), "release", "libkeel.so");
  fs.mkdirSync(nativeDir, { recursive: true });
  // Copy then rename so a server never maps a half-written file.
  const tmp = `${addonPath}.${process.pid}.tmp`;
  fs.copyFileSync(built, tmp);
  fs.renameSync(tmp, addonPath);
  // Record what the addon was built from, so a later `--no-build` run reports that and not
  // whatever the tree holds by then.
  fs.writeFileSync(buildInfoPath, JSON.stringify({ builtAt: new Date().toISOString(), ...gitInfo() }, null, 2) + "\n");
}

function addonInfo() {
  const built = fs.existsSync(buildInfoPath) ? JSON.parse(fs.readFileSync(buildInfoPath, "utf8")) : null;
  return { path: path.relative(repoRoot, addonPath), profile: "release", bytes: fs.statSync(addonPath).size, builtFrom: built };
}

function checkRootBuilt() {
  for (const file of ["dist/index.js", "index.js"]) {
    if (!fs.existsSync(path.join(repoRoot, file))) {
      throw new Error(`${file} is missing at the repo root: run \`npm install\` there first`);
    }
  }
}

function gitInfo() {
  const git = (...args) => spawnSync("git", args, { cwd: repoRoot, encoding: "utf8" }).stdout ?? "";
  return {
    commit: git("rev-parse", "HEAD").trim(),
    // Uncommitted engine changes are compiled into the addon too; record that they existed.
    dirtyEngineFiles: git("status", "--porcelain", "--", "crates", "src", "ts", "Cargo.toml", "Cargo.lock")
      .split("\n")
      .filter(Boolean),
  };
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
async function startServer(kind) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), `keel-bench-${kind}-`));
  const env = { ...process.env };
  if (kind === "keel") env.NAPI_RS_NATIVE_LIBRARY_PATH = addonPath;
  else delete env.NAPI_RS_NATIVE_LIBRARY_PATH;
  const child = spawn(process.execPath, [path.join(benchDir, "servers", `${kind}.mjs`), dataDir], {
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
  return { kind, child, out, dataDir, port: ready.port };
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
  return [
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
  ];
}

async function measure(kind, workload) {
  const server = await startServer(kind);
  let result;
  try {
    result = await runLoad({
      port: server.port,
      workload: workload.name,
      actors: workload.actors,
      maxCalls: workload.maxCalls,
      durationMs: workload.durationMs,
      warmupCallsPerActor: workload.warmupCallsPerActor,
      requestTimeoutMs: 30_000,
      timeCapMs: workload.durationMs + 120_000,
    });
  } finally {
    const clean = await stopServer(server);
    if (!clean) console.error(`warning: ${kind} server did not shut down cleanly:\n${server.out.stderr}`);
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// Reporting

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
    calls: rounds.reduce((n, r) => n + r.calls, 0),
    errors: rounds.reduce((n, r) => n + r.errors + r.warmupErrors, 0),
    verified: rounds.every((r) => r.verify.ok),
  };
}

function printTable(summary) {
  const rows = [["workload", "server", "calls/s", "p50 ms", "p99 ms", "calls", "errors", "verified"]];
  for (const [name, w] of Object.entries(summary)) {
    for (const kind of ["keel", "baseline"]) {
      const s = w[kind];
      rows.push([name, kind, s.callsPerSec.toFixed(1), s.p50Ms.toFixed(3), s.p99Ms.toFixed(3), String(s.calls), String(s.errors), s.verified ? "yes" : "NO"]);
    }
    const r = w.ratio;
    rows.push([name, "keel/baseline", `${r.callsPerSec.toFixed(2)}x`, `${r.p50Ms.toFixed(2)}x`, `${r.p99Ms.toFixed(2)}x`, "", "", ""]);
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
  checkRootBuilt();
  ensureDeps();
  if (opts.build) buildAddon();
  else if (!fs.existsSync(addonPath)) throw new Error(`--no-build given but ${addonPath} does not exist`);
  else {
    // dist/ comes from the current tree; an addon built from another one may not match its
    // native interface (the keel server then dies on its first call).
    const builtFrom = addonInfo().builtFrom;
    const now = gitInfo();
    if (!builtFrom || builtFrom.commit !== now.commit || builtFrom.dirtyEngineFiles.length || now.dirtyEngineFiles.length) {
      console.error(`warning: --no-build reuses an addon built from ${builtFrom?.commit ?? "an unknown tree"}; the tree is now at ${now.commit}${now.dirtyEngineFiles.length ? " with uncommitted engine changes" : ""}`);
    }
  }

  const disk = probeDisk();
  if (disk.tmpfs) console.error(`warning: ${disk.dataDirParent} is tmpfs; fsync costs nothing there and the figures will not reflect a disk`);
  console.error(`disk: write+fdatasync p50 ${disk.writeFdatasyncMs.p50} ms, p99 ${disk.writeFdatasyncMs.p99} ms`);

  const startedAt = new Date().toISOString();
  const loadavgStart = os.loadavg();
  const raw = {};
  for (let round = 0; round < opts.rounds; round++) {
    // Alternate which server goes first so neither always gets the quieter slot.
    const order = round % 2 === 0 ? ["keel", "baseline"] : ["baseline", "keel"];
    for (const workload of workloads(opts)) {
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
  }

  const summary = {};
  for (const [name, byKind] of Object.entries(raw)) {
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

  const report = {
    startedAt,
    finishedAt: new Date().toISOString(),
    machine: {
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model,
      node: process.version,
      loadavgStart,
      loadavgEnd: os.loadavg(),
    },
    // The tree the JS layer (dist/) was loaded from; the addon's own source is in addon.builtFrom.
    git: gitInfo(),
    addon: addonInfo(),
    disk,
    options: opts,
    workloads: workloads(opts),
    summary,
    rounds: raw,
  };
  fs.mkdirSync(resultsDir, { recursive: true });
  const out = path.join(resultsDir, "latest.json");
  fs.writeFileSync(out, JSON.stringify(report, null, 2) + "\n");

  console.log("");
  printTable(summary);
  console.log(`\nwritten to ${path.relative(process.cwd(), out) || out}`);

  const failed = Object.values(summary).some((w) => !w.keel.verified || !w.baseline.verified || w.keel.errors || w.baseline.errors);
  if (failed) {
    console.error("FAILED: some calls errored or a durable count did not match its acknowledged increments (see latest.json)");
    process.exitCode = 1;
  }
}

main().catch((err) => {
  console.error(`bench: ${err.stack ?? err}`);
  process.exit(1);
});
