// Actor-to-actor call latency in process (`c.client()`) against a plain HTTP call to keel.
//
// One registry serves `counter` (one durable `increment`) and `relay`, whose `run(n)` makes n
// sequential `c.client()` calls to `counter.increment` and times each one inside the action.
// The HTTP side makes the same `increment` calls one at a time from this process over one
// keep-alive connection to 127.0.0.1. Both wait for the same durable commit per call.
//
// Usage (from the repo root, after `npm run build`: a debug addon is refused):
//   node bench/actor-calls.mjs [calls=2000] [--rounds 3] [--durability full|relaxed] [--json]
//   KEEL_DIR=/path/to/other/tree node bench/actor-calls.mjs   # that tree's dist/ and addon
// Each round runs both transports (the order alternating per round) on one registry; the
// figures are medians over rounds and the ratio in-process / HTTP per round. Prints a table,
// or with --json (how run.mjs's `actor-calls` workload runs it) one JSON line.
import http from "node:http";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { treeAddon } from "./run/setup.mjs";
import { median, round3 } from "./run/stats.mjs";
import { checkAddon } from "./servers/keel-tree.mjs";

const argv = process.argv.slice(2);
const asJson = argv.includes("--json");
const roundsAt = argv.indexOf("--rounds");
const rounds = roundsAt === -1 ? 3 : Number(argv[roundsAt + 1]);
const calls = Number(argv.find((a, i) => /^\d+$/.test(a) && !["--rounds", "--durability"].includes(argv[i - 1])) ?? 2000);
if (!Number.isInteger(rounds) || rounds < 1 || rounds > 20) throw new Error("--rounds must be an integer from 1 to 20");
if (!Number.isInteger(calls) || calls < 1 || calls > 100_000) throw new Error("calls must be an integer from 1 to 100000");
const durabilityAt = argv.indexOf("--durability");
const durability = durabilityAt === -1 ? "full" : argv[durabilityAt + 1];
if (!["full", "relaxed"].includes(durability)) throw new Error("--durability must be full or relaxed");
const BATCH = 200;

const keelDir = resolve(process.env.KEEL_DIR ?? join(import.meta.dirname, ".."));
process.env.NAPI_RS_NATIVE_LIBRARY_PATH = treeAddon(keelDir); // refuses a debug addon
const { actor, setup } = await import(pathToFileURL(join(keelDir, "dist/index.js")).href);
checkAddon("actor-calls bench");

const counter = actor({
  state: { count: 0 },
  actions: { increment: (c, n) => (c.state.count += n) },
});

const relay = actor({
  state: null,
  actions: {
    run: async (c, n, key) => {
      const target = c.client().counter.getOrCreate(key);
      const latencies = [];
      for (let i = 0; i < n; i += 1) {
        const started = process.hrtime.bigint();
        await target.increment(1);
        latencies.push(Number(process.hrtime.bigint() - started) / 1e6);
      }
      return latencies;
    },
  },
});

function summary(transport, latencies, seconds) {
  const sorted = [...latencies].sort((a, b) => a - b);
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  return { transport, calls: sorted.length, p50Ms: +at(0.5).toFixed(3), p99Ms: +at(0.99).toFixed(3), callsPerSec: Math.round(sorted.length / seconds) };
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 1, noDelay: true });
function post(port, path, body) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, method: "POST", path, agent, headers: { "content-type": "application/json" } }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (chunk) => (text += chunk));
      res.on("end", () => (res.statusCode === 200 ? resolve(JSON.parse(text)) : reject(new Error(`status ${res.statusCode}: ${text}`))));
    });
    req.on("error", reject);
    req.end(JSON.stringify(body));
  });
}

const dataDir = mkdtempSync(join(tmpdir(), "keel-bench-calls-"));
const registry = setup({ use: { counter, relay }, host: "127.0.0.1", port: 0, dataDir, durability, disableSignalHandlers: true });
const serving = registry.start();
try {
  const { url } = await registry.listening();
  const port = Number(new URL(url).port);

  async function inProcessRound(round) {
    const latencies = [];
    for (let done = 0; done < calls; done += BATCH) {
      const reply = await post(port, "/v1/actors/relay/actions/run", { key: ["bench"], args: [Math.min(BATCH, calls - done), [`in-process-${round}`]] });
      latencies.push(...reply.output);
    }
    // Counts the time inside the actions only, so the HTTP calls that start each batch are out.
    return summary("c.client() in process", latencies, latencies.reduce((sum, ms) => sum + ms, 0) / 1000);
  }
  async function httpRound(round) {
    const latencies = [];
    const started = process.hrtime.bigint();
    for (let i = 0; i < calls; i += 1) {
      const callStarted = process.hrtime.bigint();
      await post(port, "/v1/actors/counter/actions/increment", { key: [`over-http-${round}`], args: [1] });
      latencies.push(Number(process.hrtime.bigint() - callStarted) / 1e6);
    }
    return summary("HTTP from a client", latencies, Number(process.hrtime.bigint() - started) / 1e9);
  }
  // Warm-up: both actors of each kind started, the HTTP connection open.
  await post(port, "/v1/actors/relay/actions/run", { key: ["bench"], args: [50, ["warm-up"]] });
  for (let i = 0; i < 50; i += 1) await post(port, "/v1/actors/counter/actions/increment", { key: ["warm-up"], args: [1] });

  const got = { inProcess: [], http: [] };
  for (let round = 0; round < rounds; round += 1) {
    const order = round % 2 === 0 ? ["inProcess", "http"] : ["http", "inProcess"];
    for (const side of order) {
      const r = side === "inProcess" ? await inProcessRound(round) : await httpRound(round);
      got[side].push(r);
      if (!asJson) console.error(`round ${round + 1}/${rounds}: ${JSON.stringify(r)}`);
    }
  }
  const med = (side, field) => round3(median(got[side].map((r) => r[field])));
  const ratios = got.inProcess.map((r, i) => round3(r.p50Ms / got.http[i].p50Ms));
  const report = {
    keelDir,
    calls,
    rounds,
    durability,
    inProcess: { p50Ms: med("inProcess", "p50Ms"), p99Ms: med("inProcess", "p99Ms"), callsPerSec: med("inProcess", "callsPerSec") },
    http: { p50Ms: med("http", "p50Ms"), p99Ms: med("http", "p99Ms"), callsPerSec: med("http", "callsPerSec") },
    p50Ratio: { median: round3(median(ratios)), min: Math.min(...ratios), max: Math.max(...ratios) },
    perRound: got,
  };
  if (asJson) console.log(JSON.stringify(report));
  else {
    console.log(`keel from ${keelDir}, durability ${durability}, ${calls} calls per transport, ${rounds} rounds (medians)`);
    console.log("| transport | p50 ms | p99 ms | calls/s |");
    console.log("|---|---|---|---|");
    console.log(`| c.client() in process | ${report.inProcess.p50Ms} | ${report.inProcess.p99Ms} | ${report.inProcess.callsPerSec} |`);
    console.log(`| HTTP from a client | ${report.http.p50Ms} | ${report.http.p99Ms} | ${report.http.callsPerSec} |`);
    console.log(`p50 in process / HTTP: **${report.p50Ratio.median.toFixed(2)}×** (range ${report.p50Ratio.min.toFixed(2)}–${report.p50Ratio.max.toFixed(2)})`);
  }
} finally {
  agent.destroy();
  await registry.shutdown();
  await serving;
  rmSync(dataDir, { recursive: true, force: true });
}
