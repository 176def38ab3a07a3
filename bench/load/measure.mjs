// How the load generator measures and paces: CPU time of this process and of the server (from
// /proc), nearest-rank percentiles, latency summaries, rounding, and the bounded loops that
// keep a given number of calls in flight.
//
// What must stay true: percentiles are nearest-rank over sorted values; the server's CPU comes
// from /proc/<serverPid>/stat in 10 ms ticks and is null, not a guess, when the pid is unknown;
// forEachConcurrently awaits every call it starts.

import { readFileSync } from "node:fs";
import { config } from "./config.mjs";

/**
 * CPU time used so far, in ms: this process's (`client`) and the server's (`server`, from
 * /proc/<serverPid>/stat, in clock ticks of 10 ms), so a workload can say where its time went.
 */
const CLK_TCK = 100; // USER_HZ, which /proc reports in; 100 on Linux/x86-64
export function cpuNow() {
  const { user, system } = process.cpuUsage();
  let server = null;
  try {
    const stat = readFileSync(`/proc/${config.serverPid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    server = ((Number(fields[11]) + Number(fields[12])) * 1000) / CLK_TCK;
  } catch {
    // No pid given, or the server is gone: report the client's only.
  }
  return { client: (user + system) / 1000, server };
}

/** CPU ms used since `from` (a `cpuNow()`), each side divided by `per`. */
export function cpuSince(from, per = 1) {
  const now = cpuNow();
  const div = (x) => (x === null ? null : round3(x / per));
  return { client: div(now.client - from.client), server: from.server === null || now.server === null ? null : div(now.server - from.server) };
}

/** Nearest-rank percentile of a sorted array. */
export function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

export const round3 = (x) => (x === null ? null : Math.round(x * 1000) / 1000);

export function latencySummary(times) {
  const sorted = Float64Array.from(times).sort();
  return {
    count: sorted.length,
    p50: round3(percentile(sorted, 50)),
    p99: round3(percentile(sorted, 99)),
    mean: round3(sorted.length ? sorted.reduce((a, b) => a + b, 0) / sorted.length : null),
    max: round3(percentile(sorted, 100)),
  };
}

/** Runs `fn(i)` for i in [0, count) with `concurrency` loops; every call is awaited. */
export async function forEachConcurrently(count, concurrency, fn) {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, count) }, async () => {
      while (next < count) await fn(next++);
    }),
  );
}

export const sleepMs = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
