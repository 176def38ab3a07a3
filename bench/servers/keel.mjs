// keel server for the bench, run as a child process by run.mjs.
//
// Usage: node servers/keel.mjs <dataDir>
// Expects NAPI_RS_NATIVE_LIBRARY_PATH to point at the release addon, and KEEL_BENCH_KEEL_DIR at
// the keel tree whose dist/ to load (default: this repo). Prints one JSON line
// `{"ready":true,"port":N,"addon":"...","probePort":N|null}` on stdout once listening, then
// serves until its stdin closes (the parent closing it, or the parent dying) or it gets SIGTERM.
// KEEL_BENCH_DURABILITY (`full`, the default, or `relaxed`) sets `durability`; KEEL_BENCH_PORT
// sets the port (default 0).
//
// With KEEL_BENCH_PROBE=1 it also answers `GET /probe` on a second, plain node:http listener
// (127.0.0.1, port `probePort`): `{live, rss, vmRss, rssAnon, rssFile, rssShmem, heapTotal,
// heapUsed, newSpace, external}`, where `live` is `registry.liveActors`, `newSpace` is what V8
// holds for its young generation, the rss* fields come from /proc/self/status, and with
// `?gc=1` the figures are read after a full GC (the process must run with --expose-gc). The probe is not an actor, so asking never wakes one or counts as one.

import http from "node:http";
import v8 from "node:v8";
import { readFileSync } from "node:fs";
import { actions, initialState } from "./counter.mjs";
import * as lifecycle from "./lifecycle.mjs";
import { room as roomConfig } from "./room.mjs";
import { checkAddon, loadKeel, stopOnStdinEnd } from "./keel-tree.mjs";

const dataDir = process.argv[2];
if (!dataDir) {
  console.error("usage: node servers/keel.mjs <dataDir>");
  process.exit(2);
}

const { actor, setup } = loadKeel();
const wanted = checkAddon("keel server");

const counter = actor({ state: initialState(), actions });
const napper = actor(lifecycle.napper);
const resident = actor(lifecycle.resident);
const timer = actor(lifecycle.timer);
// The broadcast workload's actor; the WebSocket workloads reach `counter` and `room` at
// /v1/actors/{name}/connect.
const room = actor(roomConfig);
const registry = setup({
  use: { counter, napper, resident, timer, room },
  host: "127.0.0.1",
  port: Number(process.env.KEEL_BENCH_PORT ?? 0),
  dataDir,
  // `full` unless a relaxed workload or bench/profile.sh asks for `relaxed`.
  durability: process.env.KEEL_BENCH_DURABILITY || "full",
  disableSignalHandlers: true,
});

const serving = registry.start();
const { port } = await registry.listening();
const probe = process.env.KEEL_BENCH_PROBE === "1" ? await startProbe() : null;
process.stdout.write(JSON.stringify({ ready: true, port, addon: wanted, probePort: probe?.address().port ?? null }) + "\n");

function startProbe() {
  // VmRSS and its split (anonymous memory, mapped files, shared memory), in bytes.
  const status = () => {
    const fields = { VmRSS: "vmRss", RssAnon: "rssAnon", RssFile: "rssFile", RssShmem: "rssShmem" };
    const out = {};
    for (const line of readFileSync("/proc/self/status", "utf8").split("\n")) {
      const [name, value] = line.split(":");
      if (name in fields) out[fields[name]] = Number.parseInt(value, 10) * 1024;
    }
    return out;
  };
  const server = http.createServer((req, res) => {
    if (req.method !== "GET" || !req.url.startsWith("/probe")) {
      res.writeHead(404).end();
      return;
    }
    // Twice: the first pass can leave finalizers whose memory only the second one frees.
    if (req.url.includes("gc=1") && globalThis.gc) {
      globalThis.gc();
      globalThis.gc();
    }
    const { rss, heapTotal, heapUsed, external } = process.memoryUsage();
    const newSpace = v8.getHeapSpaceStatistics().find((space) => space.space_name === "new_space")?.space_size ?? 0;
    const body = JSON.stringify({ live: registry.liveActors, rss, ...status(), heapTotal, heapUsed, newSpace, external, gc: Boolean(globalThis.gc) });
    res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) }).end(body);
  });
  server.keepAliveTimeout = 60_000;
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

stopOnStdinEnd("keel server", registry, () => {
  probe?.close();
  probe?.closeAllConnections();
});

await serving;
// stdin keeps the event loop alive; nothing else is left to do.
process.exit();
