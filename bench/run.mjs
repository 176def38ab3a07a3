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
//                        http-concurrent-relaxed,cold-start,idle-rss,many-actors,sockets,
//                        db,actor-calls)
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
//   --only engine        (opt-in, never in the default) keel and RivetKit 2.3.19 on a Rivet
//                        Engine, embedded keel beside: see bench/engine/workloads.mjs
//   --engine-seq-calls N     timed sequential calls in the engine group (default 500)
//   --engine-first-actors N  new actors timed by their first call (default 10)
//   --engine-wake-actors N   actors timed waking from sleep (default 10)
//   --engine-actors LIST     actor counts of the engine group's wrk throughput (default 8,64)
//
// The http-* workloads drive HTTP with wrk (installed with apt-get when missing and root; else
// the JS generator, noted in the table), in `full` and `relaxed` durability; see http-wrk.mjs.
// cold-start, idle-rss and many-actors are the start-up figures (see figures.mjs).
// db and actor-calls run bench/db.mjs and bench/actor-calls.mjs once each (--rounds inside,
// --duration as db's seconds per workload): c.db vs better-sqlite3, c.client() vs HTTP.
//   --socket-conns N     sockets per server in the sockets workload (default 10000)
//   --socket-actors N    actors they are spread over (default 1000)
//
// Layout (run/ holds this script's modules, each saying what it owns):
//   run/options.mjs    the options above: parsing, defaults and bounds
//   run/setup.mjs      bench deps, the keel tree's build and release addon, git, disk context
//   run/workloads.mjs  the workloads by family and one measurement of a workload on a server
//   run/children.mjs   the server and load-generator child processes and their life cycle
//   run/summary.mjs    medians over rounds, ratios, the start-up figures, the failure check
//   run/tables.mjs     the progress lines and the printed tables
//   run/paths.mjs, run/stats.mjs: where bench/ is; rounding and medians
// The load generator is load.mjs (with load/); the start-up figures, wrk and the sockets
// workload are figures.mjs, http-wrk.mjs and sockets.mjs.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { coldStart, idleRss } from "./figures.mjs";
import { ensureWrk } from "./http-wrk.mjs";
import { parseArgs } from "./run/options.mjs";
import { repoRoot, resultsDir } from "./run/paths.mjs";
import { addonInfo, checkRootBuilt, ensureDeps, gitInfo, openFilesLimit, probeDisk, run, treeAddon } from "./run/setup.mjs";
import { anyFailed, summarizeFigures, summarizeRounds } from "./run/summary.mjs";
import { describeFanout, describeLifecycle, printTables } from "./run/tables.mjs";
import {
  counterWorkloads,
  FIGURE_WORKLOADS,
  fanoutWorkloads,
  httpWorkloads,
  lifecycleWorkloads,
  measure,
  measureHttp,
  measureManyActors,
  runScript,
  SCRIPT_WORKLOADS,
  workloads,
} from "./run/workloads.mjs";
import { socketsWorkload } from "./sockets.mjs";
import { ENGINE_KINDS, measureEngineKind, printEngineTable, summarizeEngine } from "./engine/workloads.mjs";

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  // The keel tree under test: this repo unless --keel-dir names another.
  const keelDir = opts.keelDir ?? repoRoot;
  ensureDeps();
  // This repo's release addon and dist/, brought up to date (incrementally) by the build that
  // `npm install` runs. Another tree (--keel-dir) is built there beforehand.
  if (opts.build) run("npm", ["run", "build"], { cwd: repoRoot });
  checkRootBuilt(keelDir);
  const addonPath = treeAddon(keelDir);
  // What every keel server child is given: the tree to load keel from and the addon it maps.
  const spec = { addonPath, keelDir };
  const tree = gitInfo(keelDir);
  console.error(`keel tree: ${keelDir} at ${tree.commit || "(not a git checkout)"}; addon ${addonPath}, built ${fs.statSync(addonPath).mtime.toISOString()}`);
  if (tree.dirtyEngineFiles.length) console.error(`warning: ${keelDir} has uncommitted engine changes: ${tree.dirtyEngineFiles.join(", ")}`);

  // wrk for the http-* workloads (installed here when missing and root).
  const withEngine = opts.only.includes("engine");
  const wrk = httpWorkloads(opts).length || withEngine || opts.only.includes("many-actors") ? ensureWrk() : { available: false, version: null, note: "not used" };
  if (withEngine && !wrk.available) throw new Error(`the engine workloads need wrk: ${wrk.note}`);

  const disk = probeDisk();
  if (disk.tmpfs) console.error(`warning: ${disk.dataDirParent} is tmpfs; fsync costs nothing there and the figures will not reflect a disk`);
  console.error(`disk: write+fdatasync p50 ${disk.writeFdatasyncMs.p50} ms, p99 ${disk.writeFdatasyncMs.p99} ms`);

  const startedAt = new Date().toISOString();
  const loadavgStart = os.loadavg();
  const raw = {};
  const engineRaw = {};
  for (let round = 0; round < opts.rounds; round++) {
    // Alternate which server goes first so neither always gets the quieter slot.
    const order = round % 2 === 0 ? ["keel", "baseline"] : ["baseline", "keel"];
    for (const workload of counterWorkloads(opts)) {
      for (const kind of order) {
        console.error(`round ${round + 1}/${opts.rounds}: ${workload.name} on ${kind} ...`);
        const result = await measure(kind, workload, spec);
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
        const result = await measure(kind, workload, spec);
        console.error(`  ${describeFanout(result)}, verified: ${result.verify.ok}`);
        ((raw[workload.name] ??= {})[kind] ??= []).push(result);
      }
    }
    for (const workload of lifecycleWorkloads(opts)) {
      console.error(`round ${round + 1}/${opts.rounds}: ${workload.name} on keel ...`);
      const result = await measure("keel", workload, spec);
      console.error(`  ${describeLifecycle(result)}, verified: ${result.verify.ok}`);
      ((raw[workload.name] ??= {}).keel ??= []).push(result);
    }
    for (const workload of httpWorkloads(opts)) {
      for (const kind of [...order, ...opts.peers]) {
        console.error(`round ${round + 1}/${opts.rounds}: ${workload.name} on ${kind} ...`);
        const result = await measureHttp(kind, workload, wrk, spec);
        console.error(
          `  ${result.client}: ${result.callsPerSec} calls/s, p50 ${result.latencyMs.p50} ms, p99 ${result.latencyMs.p99} ms, ` +
            `${result.calls} calls, ${result.errors} errors, verified: ${result.verify.ok}`,
        );
        ((raw[workload.name] ??= {})[kind] ??= []).push(result);
      }
    }
    if (withEngine) {
      // keel and RivetKit on a fresh engine each, embedded keel beside; the order rotates.
      const kinds = Object.keys(ENGINE_KINDS);
      const order = kinds.map((_, i) => kinds[(i + round) % kinds.length]);
      for (const kind of order) {
        console.error(`round ${round + 1}/${opts.rounds}: engine workloads on ${kind} ...`);
        const result = await measureEngineKind(kind, opts, spec);
        console.error(
          `  cold start ${result.coldStartMs} ms, first call ${result.firstCallMs?.p50} ms, sequential p50 ${result.sequential?.p50} ms p99 ${result.sequential?.p99} ms, ` +
            `wake ${result.wakeMs?.p50} ms, ${opts.engineActors.map((n) => `${n} actors ${result.throughput?.[n]?.callsPerSec} calls/s`).join(", ")}, verified: ${result.verify.ok}`,
        );
        if (!result.verify.ok) console.error(`  failures: ${result.verify.failures.join("\n  ")}`);
        // Everything, in case the run is cut short before latest.json is written.
        console.error(`  ENGINE_RESULT ${JSON.stringify({ round, ...result, verify: undefined })}`);
        (engineRaw[kind] ??= []).push(result);
      }
    }
  }
  // Start-up figures, once per run: 10,000 actors on each server (the baseline's fsync per
  // new row makes it the longest step of a run), then cold start and idle RSS over their own
  // spawns (--cold-rounds).
  if (opts.only.includes("many-actors")) {
    for (const kind of ["keel", "baseline", ...opts.peers]) {
      console.error(`many-actors on ${kind} ...`);
      const result = await measureManyActors(kind, opts, spec, wrk);
      console.error(`  ${result.actors} actors in ${result.elapsedMs} ms, server RSS ${(result.serverRssBytes / 1048576).toFixed(1)} MiB, ${result.errors} errors`);
      ((raw["many-actors"] ??= {})[kind] ??= []).push(result);
    }
  }
  for (const name of ["cold-start", "idle-rss"]) {
    if (!opts.only.includes(name)) continue;
    for (const kind of ["keel", "baseline", ...opts.peers]) {
      console.error(`${name} on ${kind} (${opts.coldRounds} spawns) ...`);
      const result = name === "cold-start" ? await coldStart(kind, spec, opts.coldRounds) : await idleRss(kind, spec, opts.coldRounds);
      console.error(name === "cold-start" ? `  median ${result.ms} ms (${result.perRoundMs.join(", ")})` : `  median RSS ${(result.rssBytes / 1048576).toFixed(1)} MiB`);
      ((raw[name] ??= {})[kind] ??= []).push(result);
    }
  }

  const summary = summarizeRounds(raw);
  // Memory per socket is measured once, whatever --rounds says (see sockets.mjs).
  if (opts.only.includes("sockets")) {
    summary.sockets = await socketsWorkload({ connections: opts.socketConns, actors: opts.socketActors, addonPath, keelDir });
  }

  // db.mjs and actor-calls.mjs, once each as a child, with their rounds inside.
  for (const name of SCRIPT_WORKLOADS) {
    if (!opts.only.includes(name)) continue;
    console.error(`${name} (bench/${name}.mjs, ${opts.rounds} rounds) ...`);
    summary[name] = runScript(name, opts, spec);
    console.error(`  verified: ${summary[name].verified}`);
  }

  const figures = FIGURE_WORKLOADS.some((n) => raw[n]) ? summarizeFigures(raw, summary) : null;
  const engine = withEngine ? { summary: summarizeEngine(engineRaw, opts.engineActors), rounds: engineRaw } : null;

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
    git: gitInfo(keelDir),
    addon: addonInfo(addonPath, keelDir),
    disk,
    options: opts,
    workloads: workloads(opts),
    summary,
    // The start-up figures (cold start, idle RSS, many actors, memory per actor) and goals.
    figures,
    loadGenerator: { http: wrk.available ? wrk.version : "js", note: wrk.note },
    // The engine workloads (--only engine): medians and ratios, and every round's figures.
    engine,
    rounds: raw,
  };
  fs.mkdirSync(resultsDir, { recursive: true });
  const out = path.join(resultsDir, "latest.json");
  fs.writeFileSync(out, JSON.stringify(report, null, 2) + "\n");

  printTables(summary, figures, wrk);
  if (engine) printEngineTable(engine.summary, opts.rounds);
  const la = report.machine;
  console.log(`\nload average (1/5/15 min): ${la.loadavgStart.map((x) => x.toFixed(2)).join(" ")} at the start, ${la.loadavgEnd.map((x) => x.toFixed(2)).join(" ")} at the end; ${la.cpus} CPUs`);
  console.log(`\nwritten to ${path.relative(process.cwd(), out) || out}`);

  if (anyFailed(raw, summary) || (engine && !engine.summary.ok)) {
    console.error("FAILED: some calls errored, a durable count did not match its acknowledged increments, or a life-cycle check failed (see latest.json)");
    process.exitCode = 1;
  }
}

main().catch((err) => {
  console.error(`bench: ${err.stack ?? err}`);
  process.exit(1);
});
