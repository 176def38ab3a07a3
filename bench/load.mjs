// Load generator for the bench, run by run.mjs as its own child process so that it never
// shares an event loop (or its pauses) with the server it measures.
//
// Usage: node load.mjs '<json config>'
//   config: { port, workload, timeCapMs, requestTimeoutMs, ...per-workload fields }
//   - "sequential" | "concurrent": { actors, maxCalls, durationMs, warmupCallsPerActor }
//   - "ws-sequential" | "ws-concurrent": the same, over one WebSocket connection per actor
//   - "http-sequential" | "http-concurrent" (and -relaxed): the first two, when wrk is missing
//   - "broadcast": { actors, connections, bursts, warmupBursts, payloadBytes, connectConcurrency }
//   - "many-actors": { actors, concurrency }: each actor created by one call; then server RSS
//   - `peer: "rivetkit"` sends the HTTP counter calls to the RivetKit peer's routes
//   - "wake":   { probePort, actors }                         (keel only, see load/lifecycle.mjs)
//   - "memory": { probePort, actors, concurrency, warmupActors }
//   - "alarms": { actors, alarmsPerActor, leadMs, warmupAlarmsPerActor }
// Prints one JSON result line on stdout; progress and errors go to stderr.
//
// Every request goes to 127.0.0.1 only, and every loop is bounded both in calls and in time.
//
// Layout (load/ holds this script's modules, each saying what it owns):
//   load/config.mjs     this child's config (the JSON argument) and the one host, 127.0.0.1
//   load/http.mjs       the keep-alive HTTP client and the `answered` error
//   load/ws.mjs         the JSON WebSocket client of the ws-* and broadcast workloads
//   load/measure.mjs    CPU time, percentiles, latency summaries, bounded concurrent loops
//   load/counter.mjs    sequential, concurrent (HTTP, ws-*, http-* without wrk), many-actors
//   load/broadcast.mjs  broadcast fan-out
//   load/lifecycle.mjs  wake, memory, alarms

import { broadcast } from "./load/broadcast.mjs";
import { config } from "./load/config.mjs";
import { counterWorkload, manyActors } from "./load/counter.mjs";
import { agent } from "./load/http.mjs";
import { alarms, memory, wake } from "./load/lifecycle.mjs";

// A hard stop in case a server hangs beyond the per-request timeouts.
const hardStop = setTimeout(() => {
  console.error(`load: gave up after ${config.timeCapMs} ms`);
  process.exit(4);
}, config.timeCapMs);
hardStop.unref();

async function main() {
  const workload = {
    sequential: counterWorkload,
    concurrent: counterWorkload,
    "ws-sequential": counterWorkload,
    "ws-concurrent": counterWorkload,
    // run.mjs's http-* workloads, when wrk is missing.
    "http-sequential": counterWorkload,
    "http-concurrent": counterWorkload,
    "http-sequential-relaxed": counterWorkload,
    "http-concurrent-relaxed": counterWorkload,
    broadcast,
    "many-actors": manyActors,
    wake,
    memory,
    alarms,
  }[config.workload];
  if (!workload) throw new Error(`unknown workload ${config.workload}`);
  const result = await workload();
  agent.destroy();
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((err) => {
  console.error("load:", err);
  process.exit(1);
});
