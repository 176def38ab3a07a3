// From the raw results of every round to the summary of latest.json: medians over rounds (and
// their spread) for each workload and server, the keel/baseline and keel/peer ratios, the
// start-up figures with their goals, and whether any check failed.
//
// What must stay true: a figure measured in every round is its median over the rounds, and
// counts (calls, errors) are sums; keel is the numerator of every keel/other ratio; a round
// that failed a check makes its workload unverified, and any unverified workload or error
// fails the run. The alarms figures take the concurrent workload's calls/s as their
// reference, so they are summarized after it.

import { median, round3 } from "./stats.mjs";
import { COUNTER_WORKLOADS, FANOUT_WORKLOADS, FIGURE_WORKLOADS, HTTP_WORKLOADS, LIFECYCLE_WORKLOADS } from "./workloads.mjs";

/** Medians over rounds of each figure (for one round, the figures themselves). */
function summarize(rounds) {
  return {
    callsPerSec: round3(median(rounds.map((r) => r.callsPerSec))),
    // The spread across rounds: on a shared machine it says how far to trust the median.
    callsPerSecRange: [Math.min(...rounds.map((r) => r.callsPerSec)), Math.max(...rounds.map((r) => r.callsPerSec))],
    p50Ms: round3(median(rounds.map((r) => r.latencyMs.p50))),
    p99Ms: round3(median(rounds.map((r) => r.latencyMs.p99))),
    // CPU per call in µs, the server's and the load generator's (same machine, 10 ms ticks).
    cpuUsPerCall: {
      server: round3(median(rounds.map((r) => r.cpuUsPerCall?.server ?? NaN))),
      client: round3(median(rounds.map((r) => r.cpuUsPerCall?.client ?? NaN))),
    },
    calls: rounds.reduce((n, r) => n + r.calls, 0),
    errors: rounds.reduce((n, r) => n + r.errors + r.warmupErrors, 0),
    verified: rounds.every((r) => r.verify.ok),
  };
}

/** Medians over rounds of the broadcast figures of one server. */
function summarizeFanout(rounds) {
  const med = (pick) => round3(median(rounds.map(pick)));
  const fanouts = rounds.map((r) => r.fanoutMs.median);
  return {
    rooms: rounds[0].rooms,
    connections: rounds[0].connections,
    payloadBytes: rounds[0].payloadBytes,
    burstsPerRound: rounds[0].bursts,
    fanoutMs: med((r) => r.fanoutMs.median),
    fanoutMsRange: [Math.min(...fanouts), Math.max(...fanouts)],
    eventsPerSec: med((r) => r.eventsPerSec),
    deliveryP50Ms: med((r) => r.deliveryMs.p50),
    deliveryP99Ms: med((r) => r.deliveryMs.p99),
    replyP50Ms: med((r) => r.replyMs.p50),
    replyP99Ms: med((r) => r.replyMs.p99),
    connectMs: med((r) => r.connectMs),
    cpuMsPerBurst: { client: med((r) => r.cpuMsPerBurst.client), server: med((r) => r.cpuMsPerBurst.server ?? NaN) },
    errors: rounds.reduce((n, r) => n + r.errors, 0),
    verified: rounds.every((r) => r.verify.ok),
  };
}

/** Medians over rounds of the life-cycle figures, with their ratios. */
function summarizeLifecycle(name, rounds, summary) {
  const med = (pick) => round3(median(rounds.map(pick)));
  const verified = rounds.every((r) => r.verify.ok);
  if (name === "wake") {
    const awake = { p50Ms: med((r) => r.awakeMs.p50), p99Ms: med((r) => r.awakeMs.p99) };
    const wake = { p50Ms: med((r) => r.wakeMs.p50), p99Ms: med((r) => r.wakeMs.p99) };
    return {
      actors: rounds[0].actors,
      awake,
      wake,
      ratio: { p50Ms: round3(wake.p50Ms / awake.p50Ms), p99Ms: round3(wake.p99Ms / awake.p99Ms) },
      waitAllAsleepMs: med((r) => r.waitAllAsleepMs),
      verified,
    };
  }
  if (name === "memory") {
    return {
      actors: rounds[0].actors,
      bytesPerActor: {
        awake: Math.round(median(rounds.map((r) => r.bytesPerActor.awake))),
        asleep: Math.round(median(rounds.map((r) => r.bytesPerActor.asleep))),
        asleepBesidesYoung: Math.round(median(rounds.map((r) => r.bytesPerActor.asleepBesidesYoung))),
        napped: Math.round(median(rounds.map((r) => r.bytesPerActor.napped))),
      },
      bytesPerActorRange: {
        awake: [Math.min(...rounds.map((r) => r.bytesPerActor.awake)), Math.max(...rounds.map((r) => r.bytesPerActor.awake))],
        asleep: [Math.min(...rounds.map((r) => r.bytesPerActor.asleep)), Math.max(...rounds.map((r) => r.bytesPerActor.asleep))],
        napped: [Math.min(...rounds.map((r) => r.bytesPerActor.napped)), Math.max(...rounds.map((r) => r.bytesPerActor.napped))],
      },
      heapUsedBytesPerActor: {
        awake: Math.round(median(rounds.map((r) => r.breakdownPerActor.awake.heapUsed))),
        asleep: Math.round(median(rounds.map((r) => r.breakdownPerActor.asleep.heapUsed))),
      },
      baseRssBytes: Math.round(median(rounds.map((r) => r.probes.base.rss))),
      verified,
    };
  }
  // alarms: plain calls/s of the concurrent workload (keel, same run) is the reference.
  const alarmsPerSec = med((r) => r.alarmsPerSec);
  const reference = summary.concurrent?.keel.callsPerSec ?? null;
  return {
    actors: rounds[0].actors,
    alarms: rounds[0].alarms,
    alarmsPerSec,
    alarmsPerSecRange: [Math.min(...rounds.map((r) => r.alarmsPerSec)), Math.max(...rounds.map((r) => r.alarmsPerSec))],
    firstLagMs: med((r) => r.firstLagMs),
    spanMs: med((r) => r.spanMs),
    setupMs: med((r) => r.setupMs),
    referenceCallsPerSec: reference,
    ratio: { alarmsPerCall: reference ? round3(alarmsPerSec / reference) : null },
    verified,
  };
}

/** keel/other ratios of the figures of one http-* workload. */
function httpRatios(keel, other) {
  return { callsPerSec: round3(keel.callsPerSec / other.callsPerSec), p50Ms: round3(keel.p50Ms / other.p50Ms), p99Ms: round3(keel.p99Ms / other.p99Ms) };
}

/** Medians of the start-up figures for each server, and the goals they are held to. */
export function summarizeFigures(raw, summary) {
  const out = {};
  const kinds = (name) => Object.keys(raw[name] ?? {});
  if (raw["cold-start"]) out.coldStart = Object.fromEntries(kinds("cold-start").map((k) => [k, raw["cold-start"][k][0]]));
  if (raw["idle-rss"]) out.idleRss = Object.fromEntries(kinds("idle-rss").map((k) => [k, raw["idle-rss"][k][0]]));
  if (raw["many-actors"]) {
    out.manyActors = Object.fromEntries(
      kinds("many-actors").map((k) => {
        const rounds = raw["many-actors"][k];
        return [k, {
          actors: rounds[0].actors,
          elapsedMs: rounds[0].elapsedMs,
          serverRssBytes: rounds[0].serverRssBytes,
          errors: rounds.reduce((n, r) => n + r.errors, 0),
          verified: rounds.every((r) => r.verify.ok),
        }];
      }),
    );
  }
  if (summary.memory) out.memoryBytesPerActor = summary.memory.bytesPerActor;
  out.goals = { coldStartMs: 150, manyActorsMs: 2000, manyActorsRssMB: 150, idleRssMB: 60 };
  return out;
}

/**
 * The summary of every workload that ran in rounds, from `raw` (per workload, per server, the
 * result of each round). The start-up figures are summarized apart (summarizeFigures) and the
 * sockets workload, measured once, adds its own entry.
 */
export function summarizeRounds(raw) {
  const summary = {};
  for (const [name, byKind] of Object.entries(raw)) {
    if (LIFECYCLE_WORKLOADS.includes(name)) continue;
    if (HTTP_WORKLOADS.includes(name) || FIGURE_WORKLOADS.includes(name)) continue;
    if (FANOUT_WORKLOADS.includes(name)) {
      const keel = summarizeFanout(byKind.keel);
      const baseline = summarizeFanout(byKind.baseline);
      summary[name] = {
        keel,
        baseline,
        ratio: {
          fanoutMs: round3(keel.fanoutMs / baseline.fanoutMs),
          deliveryP50Ms: round3(keel.deliveryP50Ms / baseline.deliveryP50Ms),
          deliveryP99Ms: round3(keel.deliveryP99Ms / baseline.deliveryP99Ms),
        },
        durableWrites: { keel: "one commit per broadcast action", baseline: "none" },
      };
      continue;
    }
    const keel = summarize(byKind.keel);
    const baseline = summarize(byKind.baseline);
    summary[name] = {
      keel,
      baseline,
      ratio: {
        callsPerSec: round3(keel.callsPerSec / baseline.callsPerSec),
        p50Ms: round3(keel.p50Ms / baseline.p50Ms),
        p99Ms: round3(keel.p99Ms / baseline.p99Ms),
      },
    };
  }
  for (const name of HTTP_WORKLOADS) {
    if (!raw[name]) continue;
    const servers = Object.fromEntries(Object.entries(raw[name]).map(([kind, rounds]) => [kind, { ...summarize(rounds), client: rounds[0].client }]));
    const ratio = Object.fromEntries(Object.keys(servers).filter((k) => k !== "keel").map((k) => [k, httpRatios(servers.keel, servers[k])]));
    summary[name] = { durability: name.endsWith("-relaxed") ? "relaxed" : "full", servers, ratio };
  }
  // After the loop above: the alarms figures take the concurrent workload's calls/s as reference.
  for (const name of LIFECYCLE_WORKLOADS) {
    if (raw[name]) summary[name] = summarizeLifecycle(name, raw[name].keel, summary);
  }
  return summary;
}

/** Whether any call errored or any check failed, in the start-up figures or in the summary. */
export function anyFailed(raw, summary) {
  const figuresFailed = FIGURE_WORKLOADS.some((name) => Object.values(raw[name] ?? {}).some((rounds) => rounds.some((r) => !r.verify.ok || r.errors)));
  return figuresFailed || Object.entries(summary).some(([name, w]) =>
    HTTP_WORKLOADS.includes(name)
      ? Object.values(w.servers).some((s) => !s.verified || s.errors)
      : COUNTER_WORKLOADS.includes(name) || FANOUT_WORKLOADS.includes(name)
      ? !w.keel.verified || !w.baseline.verified || w.keel.errors || w.baseline.errors
      : !w.verified,
  );
}
