// RivetKit peer for the bench (`--peers rivetkit`), run as a child process by run.mjs: the same
// counter (`count` in state, `increment` and `getCount`) served by RivetKit 2.0.33 with its
// file-system driver, in this process, with no engine.
//
// Usage: node servers/rivetkit.mjs <dataDir>
// Prints `{"ready":true,"port":N}` on stdout once listening; serves until stdin closes or
// SIGTERM. With KEEL_BENCH_PORT set it listens on that port instead of port 0 (the cold-start
// figure polls a port chosen before the spawn).
//
// How it is run, and why:
// - `createFileSystemDriver({ path: dataDir })`: actors' state goes to files under the bench's
//   temp dir, not the default under the home directory.
// - `disableDefaultServer: true`: RivetKit's own server (`@hono/node-server`'s `serve` with no
//   hostname) would listen on every interface. Instead the registry's `fetch` handler is
//   served here with the same `serve`, on 127.0.0.1 only.
// - `runEngine` stays off and no endpoint or token is given, so no engine is started or
//   downloaded; the inspector is disabled; RivetKit 2.0.33 has no telemetry to turn off (its
//   source sends nothing anywhere but to an engine endpoint, which is not configured here).
// - Logging at `warn` (its default) goes to stderr's tail in run.mjs, never to the ready line.
//
// Durability, as RivetKit ships it: an action's reply does not wait for the state to be
// written. The actor saves its state at most every `stateSaveInterval` (10 s by default) and
// when it sleeps, and the file-system driver writes the file and renames it, with no fsync.
//
// An action over HTTP is `POST /gateway/{actorId}/action/{name}` with `x-rivet-encoding: json`
// and `{"args":[...]}` → `{"output":...}`; the actor id for a key comes from
// `PUT /actors` with `{"name","key","runner_name_selector","crash_policy"}` (get or create).

import { serve } from "@hono/node-server";
import { actor, createFileSystemDriver, setup } from "rivetkit";

const dataDir = process.argv[2];
if (!dataDir) {
  console.error("usage: node servers/rivetkit.mjs <dataDir>");
  process.exit(2);
}

const counter = actor({
  state: { count: 0 },
  actions: {
    increment: (c, amount) => {
      c.state.count += amount;
      return c.state.count;
    },
    getCount: (c) => c.state.count,
  },
});

const registry = setup({ use: { counter } });
const { fetch } = registry.start({
  driver: createFileSystemDriver({ path: dataDir }),
  disableDefaultServer: true,
  inspector: { enabled: false },
  noWelcome: true,
  logging: { level: "warn" },
});

const server = serve({ fetch, hostname: "127.0.0.1", port: Number(process.env.KEEL_BENCH_PORT ?? 0) }, (info) => {
  process.stdout.write(JSON.stringify({ ready: true, port: info.port }) + "\n");
});
// As the baseline: no keep-alive socket closes between the warm-up and the measurement.
server.keepAliveTimeout = 60_000;

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit());
  server.closeIdleConnections?.();
}
process.stdin.on("end", stop);
process.stdin.on("error", stop);
process.stdin.resume();
process.on("SIGTERM", stop);
