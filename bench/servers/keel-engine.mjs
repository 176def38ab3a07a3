// keel for the engine workloads (`--only engine`), run as a child process by run.mjs, in either
// mode with the same actors:
// - engine mode, with KEEL_BENCH_ENGINE=http://127.0.0.1:PORT (an engine bench/engine/harness.mjs
//   started on loopback): `setup({ engine: { endpoint } })`, namespace and pool `default`. keel
//   opens no listener; `registry.listening()` resolves with the engine's guard port once the
//   engine accepted the envoy. Every request comes through the engine's gateway.
// - embedded, without it: keel's own server on 127.0.0.1 (port KEEL_BENCH_PORT, default 0),
//   SQLite in <dataDir>, plus the probe below.
//
// Usage: [KEEL_BENCH_ENGINE=URL] node servers/keel-engine.mjs <dataDir>
// Expects NAPI_RS_NATIVE_LIBRARY_PATH and KEEL_BENCH_KEEL_DIR as servers/keel.mjs does. Prints
// `{"ready":true,"port":N,"probePort":N|null}` once serving, then serves until stdin closes or
// SIGTERM. `durability: "full"` in both modes: embedded, a reply waits for the fsynced SQLite
// commit; on the engine, for the engine's acknowledgement of the actor's remote SQLite batch.
//
// Actors: `counter` (servers/counter.mjs) and `dozer` (the same actions plus `nap`, which calls
// `c.sleep()`), both with a 10-minute sleep timeout so that only `nap` puts one to sleep while
// a run measures. Embedded, `GET /probe` on a second node:http listener (127.0.0.1, port
// `probePort`) answers `{"live":registry.liveActors}`: the wake figure waits on it for the
// actor to be asleep. On the engine it asks the engine instead.

import http from "node:http";
import { actions, initialState } from "./counter.mjs";
import { checkAddon, loadKeel, stopOnStdinEnd } from "./keel-tree.mjs";

const dataDir = process.argv[2];
if (!dataDir) {
  console.error("usage: [KEEL_BENCH_ENGINE=URL] node servers/keel-engine.mjs <dataDir>");
  process.exit(2);
}

const { actor, setup } = loadKeel();
checkAddon("keel-engine server");

const options = { sleepTimeoutMs: 600_000 };
const counter = actor({ state: initialState(), actions, options });
const dozer = actor({
  state: initialState(),
  options,
  actions: {
    ...actions,
    nap: (c) => {
      c.sleep();
      return c.state.count;
    },
  },
});

const endpoint = process.env.KEEL_BENCH_ENGINE;
const registry = setup({
  use: { counter, dozer },
  ...(endpoint
    ? { engine: { endpoint, namespace: "default", pool: "default" } }
    : { host: "127.0.0.1", port: Number(process.env.KEEL_BENCH_PORT ?? 0) }),
  dataDir,
  durability: "full",
  disableSignalHandlers: true,
});

const serving = registry.start();
const { port } = await registry.listening();
const probe = endpoint ? null : await startProbe();
process.stdout.write(JSON.stringify({ ready: true, port, probePort: probe?.address().port ?? null }) + "\n");

function startProbe() {
  const server = http.createServer((req, res) => {
    const body = JSON.stringify({ live: registry.liveActors });
    res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) }).end(body);
  });
  server.keepAliveTimeout = 60_000;
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

stopOnStdinEnd("keel-engine server", registry, () => {
  probe?.close();
  probe?.closeAllConnections();
});

await serving;
process.exit();
