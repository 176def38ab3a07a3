// The counter workloads: sequential and concurrent calls of `increment` over HTTP or over one
// WebSocket connection per actor (also the http-* workloads when wrk is missing, and the
// RivetKit peer's routes), and many-actors, which creates each of many actors with one call.
//
// What must stay true: each actor has at most one call in flight, so every reply must equal the
// increments acknowledged so far; at the end each durable count must equal the acknowledged
// increments (or lie within the calls whose effect is unknown); warm-up calls are counted by
// that check but never timed.

import { rssOf } from "../figures.mjs";
import { config } from "./config.mjs";
import { answered, post, request } from "./http.mjs";
import { cpuNow, cpuSince, forEachConcurrently, percentile, round3 } from "./measure.mjs";
import { closeAll, openConnection } from "./ws.mjs";

/**
 * Per-actor bookkeeping. `acked` counts increments that got a 200: the durable count must equal
 * it at the end. `unknown` counts increments that failed without a reply, whose effect we can't
 * know; any of them makes the final check inconclusive instead of wrong.
 */
function newActor(i) {
  return { key: [`${config.workload}-${i}`], acked: 0, unknown: 0, outputMismatches: 0 };
}

/**
 * One call on `actor`: over its WebSocket connection if it has one (the ws-* workloads),
 * else over HTTP. Resolves the output; rejects with `err.answered` set if the server refused.
 */
async function callOn(actor, action, args) {
  if (actor.conn) return actor.conn.call(action, args);
  if (config.peer === "rivetkit") return callRivetkit(actor, action, args);
  const { status, body } = await post(`/v1/actors/counter/actions/${action}`, { key: actor.key, args });
  if (status !== 200) throw answered(`HTTP ${status}: ${JSON.stringify(body).slice(0, 200)}`);
  return body.output;
}

/**
 * The same call on the RivetKit peer (servers/rivetkit.mjs): the actor id of the key is asked
 * for once (`PUT /actors`, get or create) and kept, then the action goes to
 * `POST /gateway/{id}/action/{name}` with `{"args":[...]}`. RivetKit's own client asks for the
 * id before every action; the bench does it once per actor.
 */
async function callRivetkit(actor, action, args) {
  if (actor.rivetkitId === undefined) {
    const text = JSON.stringify({ name: "counter", key: actor.key[0], runner_name_selector: "default", crash_policy: "sleep" });
    const { status, body } = await request("PUT", config.port, "/actors", text);
    if (status !== 200) throw answered(`PUT /actors: HTTP ${status}: ${JSON.stringify(body).slice(0, 200)}`);
    actor.rivetkitId = body.actor.actor_id;
  }
  const { status, body } = await post(`/gateway/${encodeURIComponent(actor.rivetkitId)}/action/${action}`, { args });
  if (status !== 200) throw answered(`HTTP ${status}: ${JSON.stringify(body).slice(0, 200)}`);
  return body.output;
}

/**
 * Sends one increment and records it. With one request in flight per actor, the reply must be
 * exactly the number of increments acknowledged so far, so each reply is checked too.
 */
async function step(actor, errors) {
  try {
    const output = await callOn(actor, "increment", [1]);
    actor.acked += 1;
    if (output !== actor.acked) actor.outputMismatches += 1;
    return true;
  } catch (err) {
    // A refusal committed nothing; a lost socket or a timeout leaves the effect unknown.
    if (!err.answered) actor.unknown += 1;
    errors.push(String(err.message ?? err));
    return false;
  }
}

export async function counterWorkload() {
  const actors = Array.from({ length: config.actors }, (_, i) => newActor(i));
  const errors = [];
  const overWs = config.workload.startsWith("ws-");
  if (overWs) {
    // One connection per actor, opened (and admitted) before anything is timed.
    await forEachConcurrently(actors.length, 16, async (i) => {
      actors[i].conn = await openConnection("counter", actors[i].key);
    });
  }

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
  const cpuStart = cpuNow();
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
  const cpuMs = cpuSince(cpuStart);

  // Correctness: the durable count of every actor must equal its acknowledged increments.
  const mismatches = [];
  for (const actor of actors) {
    const expected = actor.acked;
    const actual = await callOn(actor, "getCount", []).catch((err) => String(err.message ?? err));
    const consistent = actor.unknown === 0 ? actual === expected : actual >= expected && actual <= expected + actor.unknown;
    if (!consistent || actor.outputMismatches > 0) {
      mismatches.push({ key: actor.key, expected, actual, unknown: actor.unknown, outputMismatches: actor.outputMismatches });
    }
  }

  if (overWs) await closeAll(actors.map((a) => a.conn));

  const sorted = latencies.subarray(0, completed).sort();
  const sum = sorted.reduce((a, b) => a + b, 0);
  const result = {
    workload: config.workload,
    transport: overWs ? "ws" : "http",
    actors: config.actors,
    warmupCalls,
    calls: completed,
    errors: errors.length - warmupErrors,
    warmupErrors,
    firstErrors: errors.slice(0, 5),
    elapsedMs: round3(elapsedMs),
    callsPerSec: Math.round((completed / elapsedMs) * 1000 * 10) / 10,
    // CPU time of the timed phase, and per call in µs (ms per 1,000 calls).
    cpuMs,
    cpuUsPerCall: { client: round3((cpuMs.client / completed) * 1000), server: cpuMs.server === null ? null : round3((cpuMs.server / completed) * 1000) },
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
  return result;
}

/**
 * `actors` distinct counters, each created by its first call (`increment` of 1, which must
 * answer 1), `concurrency` calls in flight. Timed from the first call to the last reply;
 * afterwards the server's RSS is read from /proc (no GC is forced: what a user would see).
 */
export async function manyActors() {
  const errors = [];
  let wrong = 0;
  const cpuStart = cpuNow();
  const start = performance.now();
  await forEachConcurrently(config.actors, config.concurrency, async (i) => {
    const actor = newActor(i);
    try {
      const out = await callOn(actor, "increment", [1]);
      if (out !== 1) wrong += 1;
    } catch (err) {
      if (errors.length < 5) errors.push(String(err.message ?? err));
      wrong += 1;
    }
  });
  const elapsedMs = performance.now() - start;
  const cpuMs = cpuSince(cpuStart);
  const { rss, rssAnon } = rssOf(config.serverPid);
  return {
    workload: "many-actors",
    actors: config.actors,
    concurrency: config.concurrency,
    elapsedMs: round3(elapsedMs),
    actorsPerSec: Math.round((config.actors / elapsedMs) * 1000 * 10) / 10,
    cpuMs,
    serverRssBytes: rss,
    serverRssAnonBytes: rssAnon,
    errors: wrong,
    verify: { ok: wrong === 0, firstErrors: errors },
  };
}
