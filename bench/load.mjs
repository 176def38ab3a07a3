// Load generator for the bench, run by run.mjs as its own child process so that it never
// shares an event loop (or its pauses) with the server it measures.
//
// Usage: node load.mjs '<json config>'
//   config: { port, workload: "sequential" | "concurrent", calls, actors, durationMs,
//             maxCalls, warmupCallsPerActor, timeCapMs, requestTimeoutMs }
// Prints one JSON result line on stdout; progress and errors go to stderr.
//
// Every request goes to 127.0.0.1 only, and every loop is bounded both in calls and in time.

import http from "node:http";

const config = JSON.parse(process.argv[2]);
const HOST = "127.0.0.1";

// One socket per in-flight request: with keep-alive each actor loop reuses its own
// connection, so the figures measure request handling, not TCP handshakes.
const agent = new http.Agent({ keepAlive: true, maxSockets: config.actors, noDelay: true });

/** POSTs a JSON body; resolves `{status, body}` or rejects on a network error or timeout. */
function post(path, payload) {
  const text = JSON.stringify(payload);
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: HOST,
        port: config.port,
        method: "POST",
        path,
        agent,
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(text) },
        timeout: config.requestTimeoutMs,
      },
      (res) => {
        const chunks = [];
        res.on("data", (chunk) => chunks.push(chunk));
        res.on("end", () => {
          const raw = Buffer.concat(chunks).toString("utf8");
          let body;
          try {
            body = JSON.parse(raw);
          } catch {
            body = raw;
          }
          resolve({ status: res.statusCode, body });
        });
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new Error(`request timed out after ${config.requestTimeoutMs} ms`)));
    req.on("error", reject);
    req.end(text);
  });
}

const increment = (key) => post("/v1/actors/counter/actions/increment", { key, args: [1] });
const getCount = (key) => post("/v1/actors/counter/actions/getCount", { key, args: [] });

/**
 * Per-actor bookkeeping. `acked` counts increments that got a 200: the durable count must equal
 * it at the end. `unknown` counts increments that failed without a reply, whose effect we can't
 * know; any of them makes the final check inconclusive instead of wrong.
 */
function newActor(i) {
  return { key: [`${config.workload}-${i}`], acked: 0, unknown: 0, outputMismatches: 0 };
}

/**
 * Sends one increment and records it. With one request in flight per actor, the reply must be
 * exactly the number of increments acknowledged so far, so each reply is checked too.
 */
async function step(actor, errors) {
  try {
    const { status, body } = await increment(actor.key);
    if (status !== 200) {
      // A rejection the server answered: nothing was committed.
      errors.push(`HTTP ${status}: ${JSON.stringify(body).slice(0, 200)}`);
      return false;
    }
    actor.acked += 1;
    if (body.output !== actor.acked) actor.outputMismatches += 1;
    return true;
  } catch (err) {
    actor.unknown += 1;
    errors.push(String(err.message ?? err));
    return false;
  }
}

/** Nearest-rank percentile of a sorted array. */
function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

const round3 = (x) => (x === null ? null : Math.round(x * 1000) / 1000);

async function main() {
  const actors = Array.from({ length: config.actors }, (_, i) => newActor(i));
  const errors = [];

  // Warm-up: creates every actor (its first call pays for creation and the first insert),
  // opens the keep-alive sockets and lets V8 optimise the hot paths on both sides. These
  // calls are counted for the final check but not timed.
  await Promise.all(
    actors.map(async (actor) => {
      for (let i = 0; i < config.warmupCallsPerActor; i++) await step(actor, errors);
    }),
  );
  const warmupCalls = actors.reduce((n, a) => n + a.acked, 0);
  const warmupErrors = errors.length;

  // Measurement. Each actor has its own loop that awaits its own reply before the next call,
  // so exactly `actors` requests are in flight. Loops stop at the call budget or the deadline,
  // whichever comes first; requests already sent are allowed to finish.
  const latencies = new Float64Array(config.maxCalls);
  let issued = 0;
  let completed = 0;
  const start = performance.now();
  const deadline = start + config.durationMs;
  await Promise.all(
    actors.map(async (actor) => {
      while (issued < config.maxCalls && performance.now() < deadline) {
        issued += 1;
        const t0 = performance.now();
        const ok = await step(actor, errors);
        if (ok) latencies[completed++] = performance.now() - t0;
      }
    }),
  );
  const elapsedMs = performance.now() - start;

  // Correctness: the durable count of every actor must equal its acknowledged increments.
  const mismatches = [];
  for (const actor of actors) {
    const { status, body } = await getCount(actor.key);
    const expected = actor.acked;
    const actual = status === 200 ? body.output : `HTTP ${status}`;
    const consistent = actor.unknown === 0 ? actual === expected : actual >= expected && actual <= expected + actor.unknown;
    if (!consistent || actor.outputMismatches > 0) {
      mismatches.push({ key: actor.key, expected, actual, unknown: actor.unknown, outputMismatches: actor.outputMismatches });
    }
  }

  const sorted = latencies.subarray(0, completed).sort();
  const sum = sorted.reduce((a, b) => a + b, 0);
  const result = {
    workload: config.workload,
    actors: config.actors,
    warmupCalls,
    calls: completed,
    errors: errors.length - warmupErrors,
    warmupErrors,
    firstErrors: errors.slice(0, 5),
    elapsedMs: round3(elapsedMs),
    callsPerSec: Math.round((completed / elapsedMs) * 1000 * 10) / 10,
    latencyMs: {
      p50: round3(percentile(sorted, 50)),
      p99: round3(percentile(sorted, 99)),
      mean: round3(completed ? sum / completed : null),
      max: round3(percentile(sorted, 100)),
    },
    verify: {
      ok: mismatches.length === 0,
      actorsChecked: actors.length,
      ackedTotal: actors.reduce((n, a) => n + a.acked, 0),
      mismatches: mismatches.slice(0, 10),
    },
  };
  agent.destroy();
  process.stdout.write(JSON.stringify(result) + "\n");
}

// A hard stop in case a server hangs beyond the per-request timeouts.
const hardStop = setTimeout(() => {
  console.error(`load: gave up after ${config.timeCapMs} ms`);
  process.exit(4);
}, config.timeCapMs);
hardStop.unref();

main().catch((err) => {
  console.error("load:", err);
  process.exit(1);
});
