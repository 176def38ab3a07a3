// A sequential client for bench/profile.sh: `increment` on one `counter` actor, one call at a
// time, over one keep-alive HTTP connection or one WebSocket connection. The same code drives
// keel (JS-hosted or the Rust test host) and the baseline, like load.mjs's sequential workload,
// but in phases that profile.sh can wrap: it connects, makes the warm-up calls, prints
// `warm` on stdout and waits for a line on stdin before the timed calls, so a profiler is
// attached to the server for exactly those calls.
//
// Usage: node seq-client.mjs <port> <http|ws> <warmupCalls> <calls> [key]
// Prints `{"calls","seconds","callsPerSec","p50Ms","p99Ms"}` on stdout at the end. Every reply
// must be the count so far (the key must be new), or it exits with status 1.

import http from "node:http";
import { createInterface } from "node:readline";
import WebSocket from "ws";

const [port, transport, warmupText, callsText, keyText] = process.argv.slice(2);
const warmupCalls = Number(warmupText);
const calls = Number(callsText);
const key = [keyText ?? `p${process.pid}`];
const agent = new http.Agent({ keepAlive: true, maxSockets: 1, noDelay: true });
const body = JSON.stringify({ key, args: [1] });

function httpIncrement() {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: "127.0.0.1",
        port: Number(port),
        method: "POST",
        path: "/v1/actors/counter/actions/increment",
        agent,
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) },
      },
      (res) => {
        const chunks = [];
        res.on("data", (chunk) => chunks.push(chunk));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          if (res.statusCode !== 200) reject(new Error(`HTTP ${res.statusCode}: ${text.slice(0, 200)}`));
          else resolve(JSON.parse(text).output);
        });
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

async function wsClient() {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/v1/actors/counter/connect`);
  const waiting = new Map();
  let ready;
  const isReady = new Promise((resolve, reject) => {
    ready = resolve;
    ws.on("error", reject);
  });
  ws.on("open", () => ws.send(JSON.stringify({ t: "init", key, params: null, subs: [] })));
  ws.on("message", (data) => {
    const frame = JSON.parse(data.toString());
    if (frame.t === "ready") ready();
    else if (frame.t === "reply") {
      const pending = waiting.get(frame.id);
      waiting.delete(frame.id);
      if (frame.error) pending.reject(new Error(JSON.stringify(frame.error)));
      else pending.resolve(frame.output);
    }
  });
  await isReady;
  let nextId = 0;
  const increment = () =>
    new Promise((resolve, reject) => {
      const id = ++nextId;
      waiting.set(id, { resolve, reject });
      ws.send(JSON.stringify({ t: "call", id, action: "increment", args: [1] }));
    });
  return { increment, close: () => ws.close() };
}

const client = transport === "ws" ? await wsClient() : { increment: httpIncrement, close: () => agent.destroy() };
let expected = 0;
async function one() {
  const output = await client.increment();
  expected += 1;
  if (output !== expected) {
    console.error(`reply ${output}, expected ${expected}`);
    process.exit(1);
  }
}

for (let i = 0; i < warmupCalls; i++) await one();
process.stdout.write("warm\n");
const lines = createInterface({ input: process.stdin });
await new Promise((resolve) => lines.once("line", resolve));

const latencies = new Float64Array(calls);
const started = process.hrtime.bigint();
for (let i = 0; i < calls; i++) {
  const t0 = process.hrtime.bigint();
  await one();
  latencies[i] = Number(process.hrtime.bigint() - t0) / 1e6;
}
const seconds = Number(process.hrtime.bigint() - started) / 1e9;
latencies.sort();
const rank = (p) => latencies[Math.min(calls - 1, Math.ceil(p * calls) - 1)];
process.stdout.write(
  JSON.stringify({ calls, seconds, callsPerSec: calls / seconds, p50Ms: rank(0.5), p99Ms: rank(0.99) }) + "\n",
);
lines.close();
client.close();
