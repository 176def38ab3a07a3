// Start-up figures, measured from run.mjs on server children it spawns itself (127.0.0.1 only):
//
// - cold start: from spawning `node` on the server file to the first successful reply of an
//   `increment` on a new actor. The port is picked before the spawn (bind 127.0.0.1:0, close);
//   each attempt is a fresh TCP connection, retried 1 ms after a refused connect.
// - idle RSS: VmRSS of a server child once it says it is listening, with no actor created.
//
// keel runs the README counter (servers/readme-counter.mjs); the baseline and RivetKit run
// their usual server files, which serve the same counter.

import { spawn } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const benchDir = path.dirname(fileURLToPath(import.meta.url));
const HOST = "127.0.0.1";

/** A port that was free a moment ago on 127.0.0.1. */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, HOST, () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/**
 * Spawns the server of `kind` on `port` with a new data dir. `spec` is what run.mjs knows
 * about the keel tree: `{addonPath, keelDir}`. Returns `{child, dataDir, ready}`, where `ready`
 * resolves the server's ready line.
 */
function spawnServer(kind, port, spec) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), `keel-bench-${kind}-cold-`));
  const env = { ...process.env };
  for (const name of ["KEEL_BENCH_PROBE", "KEEL_BENCH_DURABILITY", "NAPI_RS_NATIVE_LIBRARY_PATH"]) delete env[name];
  let args;
  if (kind === "keel") {
    Object.assign(env, {
      NAPI_RS_NATIVE_LIBRARY_PATH: spec.addonPath,
      KEEL_BENCH_KEEL_DIR: spec.keelDir,
      KEEL_HOST: HOST,
      KEEL_PORT: String(port),
      KEEL_DATA_DIR: dataDir,
    });
    args = [path.join(benchDir, "servers", "readme-counter.mjs")];
  } else {
    env.KEEL_BENCH_PORT = String(port);
    args = [path.join(benchDir, "servers", `${kind}.mjs`), dataDir];
  }
  const child = spawn(process.execPath, args, { cwd: benchDir, env, stdio: ["pipe", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (d) => (stderr = (stderr + d).slice(-4000)));
  const ready = new Promise((resolve, reject) => {
    child.stdout.setEncoding("utf8").on("data", (d) => {
      stdout += d;
      const line = stdout.split("\n").find((l) => l.startsWith("{"));
      if (line) resolve(JSON.parse(line));
    });
    child.once("exit", (code, signal) => reject(new Error(`${kind} server exited (${code ?? signal}):\n${stderr}`)));
  });
  ready.catch(() => {});
  return { child, dataDir, ready, stderr: () => stderr };
}

/** Closes the child's stdin, waits for it to exit (SIGKILL after 30 s) and removes its data. */
async function stop(server) {
  const { child } = server;
  if (child.exitCode === null && child.signalCode === null) {
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.stdin.end();
    const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
    await exited;
    clearTimeout(timer);
  }
  fs.rmSync(server.dataDir, { recursive: true, force: true });
}

/** One request on a fresh connection; resolves `{status, body}` or rejects (e.g. ECONNREFUSED). */
function once(port, method, urlPath, payload) {
  const text = JSON.stringify(payload);
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: HOST,
        port,
        method,
        path: urlPath,
        agent: false,
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(text), connection: "close" },
        timeout: 30_000,
      },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => {
          try {
            resolve({ status: res.statusCode, body: JSON.parse(Buffer.concat(chunks).toString("utf8")) });
          } catch (err) {
            reject(err);
          }
        });
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new Error("request timed out")));
    req.on("error", reject);
    req.end(text);
  });
}

/** The first `increment` of a new counter, as its kind of server takes it (fresh connections). */
async function firstIncrement(kind, port) {
  if (kind !== "rivetkit") return once(port, "POST", "/v1/actors/counter/actions/increment", { key: ["cold"], args: [1] });
  const put = await once(port, "PUT", "/actors", { name: "counter", key: "cold", runner_name_selector: "default", crash_policy: "sleep" });
  if (put.status !== 200) return put;
  return once(port, "POST", `/gateway/${encodeURIComponent(put.body.actor.actor_id)}/action/increment`, { args: [1] });
}

const sleepMs = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Spawn to first answered action, in ms, for one server; bounded by 30 s. */
async function coldStartOnce(kind, spec) {
  const port = await freePort();
  const t0 = performance.now();
  const server = spawnServer(kind, port, spec);
  let attempts = 0;
  try {
    for (;;) {
      attempts += 1;
      try {
        const res = await firstIncrement(kind, port);
        if (res.status === 200 && res.body.output === 1) return { ms: performance.now() - t0, attempts };
        throw new Error(`${kind}: first increment answered HTTP ${res.status}: ${JSON.stringify(res.body).slice(0, 200)}`);
      } catch (err) {
        if (err.code !== "ECONNREFUSED" && err.code !== "ECONNRESET") throw err;
      }
      if (server.child.exitCode !== null) throw new Error(`${kind} server exited before answering:\n${server.stderr()}`);
      if (performance.now() - t0 > 30_000) throw new Error(`${kind} server did not answer within 30 s`);
      await sleepMs(1);
    }
  } finally {
    await stop(server);
  }
}

/** VmRSS and RssAnon, in bytes, of the process `pid`. */
export function rssOf(pid) {
  const out = {};
  for (const line of fs.readFileSync(`/proc/${pid}/status`, "utf8").split("\n")) {
    const [name, value] = line.split(":");
    if (name === "VmRSS") out.rss = Number.parseInt(value, 10) * 1024;
    if (name === "RssAnon") out.rssAnon = Number.parseInt(value, 10) * 1024;
  }
  return out;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
};
const round3 = (x) => Math.round(x * 1000) / 1000;

/** `rounds` cold starts of one server; the median and every round. */
export async function coldStart(kind, spec, rounds) {
  const runs = [];
  for (let i = 0; i < rounds; i++) runs.push(await coldStartOnce(kind, spec));
  return { workload: "cold-start", kind, rounds, ms: round3(median(runs.map((r) => r.ms))), perRoundMs: runs.map((r) => round3(r.ms)), attempts: runs.map((r) => r.attempts), verify: { ok: true } };
}

/** `rounds` idle servers of one kind: RSS once listening, no actor created; the median. */
export async function idleRss(kind, spec, rounds) {
  const runs = [];
  for (let i = 0; i < rounds; i++) {
    const server = spawnServer(kind, 0, spec);
    try {
      await server.ready;
      runs.push(rssOf(server.child.pid));
    } finally {
      await stop(server);
    }
  }
  return { workload: "idle-rss", kind, rounds, rssBytes: median(runs.map((r) => r.rss)), rssAnonBytes: median(runs.map((r) => r.rssAnon)), perRound: runs, verify: { ok: true } };
}
