// Actor-to-actor call latency in process (`c.client()`) against a plain HTTP call to keel.
//
// One registry serves `counter` (one durable `increment`) and `relay`, whose `run(n)` makes n
// sequential `c.client()` calls to `counter.increment` and times each one inside the action.
// The HTTP side makes the same `increment` calls one at a time from this process over one
// keep-alive connection to 127.0.0.1. Both wait for the same durable commit per call.
//
// Usage (from the repo root, after `npm run build` for release figures):
//   node bench/actor-calls.mjs [calls=2000]
// Prints one JSON line per transport: {"transport","calls","p50Ms","p99Ms","callsPerSec"}.
import http from "node:http";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { actor, setup } from "../dist/index.js";

const calls = Number(process.argv[2] ?? 2000);
const BATCH = 200;

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
const registry = setup({ use: { counter, relay }, port: 0, dataDir, disableSignalHandlers: true });
const serving = registry.start();
try {
  const { url } = await registry.listening();
  const port = Number(new URL(url).port);

  const inProcess = [];
  let started = process.hrtime.bigint();
  for (let done = 0; done < calls; done += BATCH) {
    const reply = await post(port, "/v1/actors/relay/actions/run", { key: ["bench"], args: [Math.min(BATCH, calls - done), ["in-process"]] });
    inProcess.push(...reply.output);
  }
  // Counts the time inside the actions only, so the HTTP calls that start each batch are out.
  const inProcessSeconds = inProcess.reduce((sum, ms) => sum + ms, 0) / 1000;
  console.log(JSON.stringify(summary("c.client() in process", inProcess, inProcessSeconds)));

  const overHttp = [];
  started = process.hrtime.bigint();
  for (let i = 0; i < calls; i += 1) {
    const callStarted = process.hrtime.bigint();
    await post(port, "/v1/actors/counter/actions/increment", { key: ["over-http"], args: [1] });
    overHttp.push(Number(process.hrtime.bigint() - callStarted) / 1e6);
  }
  console.log(JSON.stringify(summary("HTTP from a client", overHttp, Number(process.hrtime.bigint() - started) / 1e9)));
} finally {
  agent.destroy();
  await registry.shutdown();
  await serving;
  rmSync(dataDir, { recursive: true, force: true });
}
