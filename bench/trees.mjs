#!/usr/bin/env node
// Two keel trees on the same counter workload, alternating, in one run: the "a change costs
// nothing" check (issue #12: actors without `db` within 10% of the tree before it).
//
// Usage (both trees built with `npm run build` beforehand; nothing is built here):
//   node bench/trees.mjs --before /work/wt-before [--after .] [--rounds 6] [--workload concurrent]
//                        [--duration 5] [--concurrency 64]
// Each round measures both trees on a fresh server each (run/workloads.mjs's `measure`: a
// server child on a new data dir, load.mjs as a separate client child, the durable count
// verified), the order alternating per round so neither always gets the quieter slot. It
// prints each round's after/before ratio, their median and range, and writes
// bench/results/trees.json.
//
// What must stay true: both trees run the same workload definition as run.mjs (the same
// function builds it), each round's two measurements run back to back, and a failed call or
// a durable count that does not match fails the run (exit status 1).

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { resultsDir } from "./run/paths.mjs";
import { checkRootBuilt, gitInfo, treeAddon } from "./run/setup.mjs";
import { median, round3 } from "./run/stats.mjs";
import { counterWorkloads, measure } from "./run/workloads.mjs";

function parse(argv) {
  const opts = { before: null, after: path.resolve(import.meta.dirname, ".."), rounds: 6, workload: "concurrent", durationS: 5, concurrency: 64 };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === "--before") opts.before = path.resolve(value);
    else if (flag === "--after") opts.after = path.resolve(value);
    else if (flag === "--workload") opts.workload = value;
    else if (["--rounds", "--duration", "--concurrency"].includes(flag)) {
      const n = Number(value);
      if (!Number.isInteger(n) || n < 1 || n > 60) throw new Error(`${flag} must be an integer from 1 to 60`);
      opts[{ "--rounds": "rounds", "--duration": "durationS", "--concurrency": "concurrency" }[flag]] = n;
    } else throw new Error(`unknown option ${flag} (see the top of bench/trees.mjs)`);
  }
  if (!opts.before) throw new Error("--before PATH is required");
  return opts;
}

const opts = parse(process.argv.slice(2));
const [workload] = counterWorkloads({ only: [opts.workload], seqCalls: 2000, concurrency: opts.concurrency, maxCalls: 250_000, durationS: opts.durationS });
if (!workload) throw new Error(`--workload must be one of sequential, concurrent, ws-sequential, ws-concurrent`);

const trees = {};
for (const side of ["before", "after"]) {
  const keelDir = opts[side];
  checkRootBuilt(keelDir);
  trees[side] = { spec: { keelDir, addonPath: treeAddon(keelDir) }, git: gitInfo(keelDir) };
  console.error(`${side}: ${keelDir} at ${trees[side].git.commit}, addon ${trees[side].spec.addonPath}`);
}

const loadavgStart = os.loadavg();
const rounds = [];
let failed = false;
for (let round = 0; round < opts.rounds; round++) {
  const order = round % 2 === 0 ? ["before", "after"] : ["after", "before"];
  const got = {};
  for (const side of order) {
    const result = await measure("keel", workload, trees[side].spec);
    const ok = result.errors === 0 && result.verify.ok;
    failed ||= !ok;
    got[side] = { callsPerSec: result.callsPerSec, serverCpuUsPerCall: result.cpuUsPerCall?.server ?? null, p50: result.latencyMs.p50, p99: result.latencyMs.p99, calls: result.calls, errors: result.errors, verified: result.verify.ok };
    console.error(`round ${round + 1}/${opts.rounds} ${side}: ${result.callsPerSec} calls/s, server CPU ${got[side].serverCpuUsPerCall} µs/call, p50 ${result.latencyMs.p50} ms, p99 ${result.latencyMs.p99} ms, ${result.errors} errors, verified: ${result.verify.ok}`);
  }
  const cpuRatio = got.after.serverCpuUsPerCall && got.before.serverCpuUsPerCall ? round3(got.after.serverCpuUsPerCall / got.before.serverCpuUsPerCall) : null;
  rounds.push({ order, ...got, ratio: round3(got.after.callsPerSec / got.before.callsPerSec), cpuRatio });
}

const ratios = rounds.map((r) => r.ratio);
const summary = {
  workload: workload.name,
  concurrency: workload.actors,
  beforeMedian: median(rounds.map((r) => r.before.callsPerSec)),
  afterMedian: median(rounds.map((r) => r.after.callsPerSec)),
  ratioMedian: round3(median(ratios)),
  ratioMin: Math.min(...ratios),
  ratioMax: Math.max(...ratios),
  // Server CPU per call, after / before: less sensitive than calls/s to what else the machine runs.
  cpuRatioMedian: rounds.every((r) => r.cpuRatio !== null) ? round3(median(rounds.map((r) => r.cpuRatio))) : null,
  cpuRatioMin: Math.min(...rounds.map((r) => r.cpuRatio ?? Infinity)),
  cpuRatioMax: Math.max(...rounds.map((r) => r.cpuRatio ?? -Infinity)),
};
fs.mkdirSync(resultsDir, { recursive: true });
const out = path.join(resultsDir, "trees.json");
fs.writeFileSync(out, JSON.stringify({ startedAt: new Date().toISOString(), loadavgStart, loadavgEnd: os.loadavg(), cpus: os.cpus().length, opts, trees: { before: trees.before.git, after: trees.after.git }, summary, rounds }, null, 2) + "\n");

const fmt = (x) => (x === null || !Number.isFinite(x) ? "-" : x.toFixed(2));
console.log(`| round | first | before calls/s | after calls/s | after / before | server CPU µs/call before / after | CPU after / before |`);
console.log(`|---|---|---|---|---|---|---|`);
rounds.forEach((r, i) =>
  console.log(`| ${i + 1} | ${r.order[0]} | ${Math.round(r.before.callsPerSec)} | ${Math.round(r.after.callsPerSec)} | ${r.ratio.toFixed(2)} | ${r.before.serverCpuUsPerCall} / ${r.after.serverCpuUsPerCall} | ${fmt(r.cpuRatio)} |`),
);
console.log(
  `| median | | ${Math.round(summary.beforeMedian)} | ${Math.round(summary.afterMedian)} | **${summary.ratioMedian.toFixed(2)}** (range ${summary.ratioMin.toFixed(2)}–${summary.ratioMax.toFixed(2)}) | | **${fmt(summary.cpuRatioMedian)}** (range ${fmt(summary.cpuRatioMin)}–${fmt(summary.cpuRatioMax)}) |`,
);
console.log(`\nload average ${loadavgStart.map((x) => x.toFixed(2)).join(" ")} at the start, ${os.loadavg().map((x) => x.toFixed(2)).join(" ")} at the end; written to ${out}`);
if (failed) {
  console.error("FAILED: some calls errored or a durable count did not match (see trees.json)");
  process.exitCode = 1;
}
