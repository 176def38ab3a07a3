// The README counter (examples/counter/actors.mjs and server.mjs) as a bench child: what the
// cold-start and idle-RSS figures start. Nothing else is registered, and `setup()` gets no
// options: host, port and data dir come from KEEL_HOST, KEEL_PORT and KEEL_DATA_DIR, which
// run.mjs sets (127.0.0.1, a port it picked, a temp dir).
//
// Usage: node servers/readme-counter.mjs
// Loads keel from KEEL_BENCH_KEEL_DIR (default: this repo) with the addon from
// NAPI_RS_NATIVE_LIBRARY_PATH, prints `{"ready":true,"port":N}` once listening and serves until
// its stdin closes or SIGTERM. Like servers/keel.mjs it refuses to run on any other addon.

import { checkAddon, loadKeel, stopOnStdinEnd } from "./keel-tree.mjs";

const { actor, setup } = loadKeel();

export const counter = actor({
  state: { count: 0 },
  actions: {
    increment: (c, amount) => {
      c.state.count += amount;
      return c.state.count;
    },
    getCount: (c) => c.state.count,
  },
});

export const registry = setup({ use: { counter } });

const serving = registry.start();
const { port } = await registry.listening();

// After listening, so the check is not on the path the cold start times before the listener
// is up (it reads one small /proc file either way).
checkAddon("readme-counter");
process.stdout.write(JSON.stringify({ ready: true, port }) + "\n");

stopOnStdinEnd("readme-counter", registry);

await serving;
process.exit();
