// keel server for the sockets workload (bench/sockets.mjs), run as a child process with
// `--expose-gc --import ./servers/gc-hook.mjs`.
//
// Usage: node servers/sockets.mjs <dataDir>
// Like servers/keel.mjs (same environment: NAPI_RS_NATIVE_LIBRARY_PATH, KEEL_BENCH_KEEL_DIR),
// with two actor types: `room` (servers/room.mjs) for keel's connection protocol, and
// `rawroom`, whose `onWebSocket` sockets broadcast what any of them sends to all of the
// room's sockets. Both sleep only after 10 minutes idle, so no actor sleeps during a run;
// and `hroom`, the room with hibernatable connections, which sleeps after 1 s idle with its
// sockets kept open.
// Prints `{"ready":true,"port":N}` once listening and serves until its stdin closes.

import { room as roomConfig } from "./room.mjs";
import { checkAddon, loadKeel, stopOnStdinEnd } from "./keel-tree.mjs";

const dataDir = process.argv[2];
if (!dataDir) {
  console.error("usage: node servers/sockets.mjs <dataDir>");
  process.exit(2);
}

const { actor, setup } = loadKeel();
checkAddon("sockets server");

const IDLE = { sleepTimeoutMs: 600_000 };

/** `size` (0) lets the bench wake a room over HTTP before it opens any socket. */
const room = actor({ ...roomConfig, actions: { ...roomConfig.actions, size: () => 0 }, options: IDLE });

/**
 * The same room with hibernatable connections and a 1 s sleep timeout: once its sockets are
 * idle it sleeps, and they stay open (kept as hibernated) until the next call wakes it.
 */
const hroom = actor({
  ...roomConfig,
  actions: { ...roomConfig.actions, size: () => 0 },
  options: { hibernatableConnections: true, sleepTimeoutMs: 1000 },
});

/**
 * A room of raw sockets. Each socket gets `ready` once it is in the room; any message a
 * socket sends goes to every socket of the room, the sender included.
 */
const rawroom = actor({
  state: {},
  createVars: () => ({ sockets: new Set() }),
  onWebSocket: (c, ws) => {
    c.vars.sockets.add(ws);
    ws.addEventListener("message", (event) => {
      for (const socket of c.vars.sockets) socket.send(event.data);
    });
    ws.addEventListener("close", () => c.vars.sockets.delete(ws));
    ws.send("ready");
  },
  actions: {
    /** How many sockets the room has; the bench calls it over HTTP to wake the room. */
    size: (c) => c.vars.sockets.size,
  },
  options: IDLE,
});

const registry = setup({
  use: { room, rawroom, hroom },
  host: "127.0.0.1",
  port: 0,
  dataDir,
  durability: "full",
  disableSignalHandlers: true,
});

const serving = registry.start();
const { port } = await registry.listening();
process.stdout.write(JSON.stringify({ ready: true, port }) + "\n");

stopOnStdinEnd("sockets server", registry);

await serving;
process.exit();
