// RivetKit peer on the engine (`--only engine`), run as a child process by run.mjs: the same
// counter served by RivetKit 2.3.19 (npm `rivetkit@2.3.19`, installed under the alias
// `rivetkit-engine` beside the 2.0.33 of servers/rivetkit.mjs) as an envoy of the engine at
// KEEL_BENCH_ENGINE (an engine bench/engine/harness.mjs started on loopback).
//
// Usage: KEEL_BENCH_ENGINE=http://127.0.0.1:PORT node servers/rivetkit-engine.mjs
// Prints `{"ready":true,"port":N}` (N: the engine's guard port) once the registry's envoy is
// registered with the engine (`startAndWait()`), then serves until stdin closes or SIGTERM.
//
// How it is run, and why (from RivetKit 2.3.19's own source: src/registry/config/*.ts,
// rivetkit-core's registry):
// - `endpoint` is the engine, namespace `default`, pool `default` (its `envoy.poolName`
//   default): the same engine, namespace and runner config keel is measured against.
// - `RIVETKIT_ENGINE_SPAWN=never` (set here before the registry starts): for a loopback
//   endpoint rivetkit-core would otherwise start, or reuse, an engine of its own with its own
//   config. `startServices: false`: no "Services" actor host beside it (on by default for a
//   loopback endpoint). For a loopback endpoint it also upserts the pool's runner config
//   itself; the harness has already done so with the same body.
// - No HTTP listener of its own: in envoy mode RivetKit only holds its WebSocket to the engine;
//   every request reaches it through the engine's gateway. Signal handlers off: stdin's end
//   (or SIGTERM) calls `registry.shutdown()` here.
// - Telemetry: RivetKit 2.3.19 has none to turn off beyond OpenTelemetry trace headers on its
//   own outbound requests; the only address it contacts is the endpoint above.
//
// Durability, as RivetKit ships it: an action's reply does not wait for its state change to be
// written. A mutation of `c.state` asks for a deferred save (`actorRequestSave(..,
// {immediate:false})`), written to the engine at most every `stateSaveInterval` (1 s by
// default in 2.3.19) and when the actor sleeps.
//
// Actors: `counter` (`increment(n)`, `getCount`) and `dozer` (the same plus `nap`, which calls
// `c.sleep()`), for the wake figure.

process.env.RIVETKIT_ENGINE_SPAWN = "never";
const { actor, setup } = await import("rivetkit-engine");

const endpoint = process.env.KEEL_BENCH_ENGINE;
if (!endpoint) {
  console.error("usage: KEEL_BENCH_ENGINE=http://127.0.0.1:PORT node servers/rivetkit-engine.mjs");
  process.exit(2);
}

const actions = {
  increment: (c, amount) => {
    c.state.count += amount;
    return c.state.count;
  },
  getCount: (c) => c.state.count,
};
const counter = actor({ state: { count: 0 }, actions });
const dozer = actor({
  state: { count: 0 },
  actions: {
    ...actions,
    nap: (c) => {
      c.sleep();
      return c.state.count;
    },
  },
});

const registry = setup({
  use: { counter, dozer },
  endpoint,
  namespace: "default",
  startServices: false,
  noWelcome: true,
  logging: { level: "warn" },
  shutdown: { disableSignalHandlers: true },
});

await registry.startAndWait();
process.stdout.write(JSON.stringify({ ready: true, port: Number(new URL(endpoint).port) }) + "\n");

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  Promise.resolve(registry.shutdown?.())
    .catch((err) => {
      console.error("rivetkit-engine: shutdown failed:", err);
      process.exitCode = 1;
    })
    .finally(() => process.exit());
}
process.stdin.on("end", stop);
process.stdin.on("error", stop);
process.stdin.resume();
process.on("SIGTERM", stop);
