// What a run prints: the one-line progress description of a broadcast or life-cycle round
// (on stderr), and the tables of the summary (on stdout): counter calls, broadcast fan-out,
// life cycle, http-* and the start-up figures, plus the sockets table from sockets.mjs.
//
// What must stay true: the tables print what the summary holds (only the start-up table
// derives its ratios and goal checks here), in this order, each with the note under it that
// says how to read it; the README's "Results of one run" shows these tables as they print.

import { printSocketsTable } from "../sockets.mjs";
import { COUNTER_WORKLOADS, FANOUT_WORKLOADS, HTTP_WORKLOADS, LIFECYCLE_WORKLOADS, PEERS } from "./workloads.mjs";

/** One line on a life-cycle round's result, for the progress on stderr. */
export function describeLifecycle(r) {
  if (r.workload === "wake") {
    return `awake p50 ${r.awakeMs.p50} ms p99 ${r.awakeMs.p99} ms; asleep p50 ${r.wakeMs.p50} ms p99 ${r.wakeMs.p99} ms; ${r.actors} actors all asleep after ${r.waitAllAsleepMs} ms`;
  }
  if (r.workload === "memory") {
    const mib = (b) => (b / 1048576).toFixed(1);
    const p = r.probes;
    return `RSS MiB base ${mib(p.base.rss)}, +${r.actors} asleep ${mib(p.asleep.rss)}, +${r.actors} awake ${mib(p.awake.rss)}, all asleep ${mib(p.napped.rss)}; bytes/actor awake ${r.bytesPerActor.awake}, asleep ${r.bytesPerActor.asleep}`;
  }
  return `${r.alarms} alarms: set in ${r.setupMs} ms, first ${r.firstLagMs} ms after due, last ${r.spanMs} ms after due: ${r.alarmsPerSec} alarms/s; fired ${r.fired}`;
}

/** One line on a broadcast round's result, for the progress on stderr. */
export function describeFanout(r) {
  return (
    `${r.connections} connections over ${r.rooms} rooms opened in ${r.connectMs} ms; fan-out median ${r.fanoutMs.median} ms ` +
    `(${r.fanoutMs.min}..${r.fanoutMs.max}) over ${r.bursts} bursts; delivery p50 ${r.deliveryMs.p50} ms p99 ${r.deliveryMs.p99} ms; ` +
    `reply p99 ${r.replyMs.p99} ms; ${r.errors} errors`
  );
}

/** The counter workloads: keel, the baseline and keel/baseline for each. */
function printTable(summary) {
  const rows = [["workload", "server", "calls/s", "p50 ms", "p99 ms", "server CPU µs/call", "calls", "errors", "verified"]];
  for (const [name, w] of Object.entries(summary)) {
    if (!COUNTER_WORKLOADS.includes(name)) continue;
    for (const kind of ["keel", "baseline"]) {
      const s = w[kind];
      rows.push([name, kind, s.callsPerSec.toFixed(1), s.p50Ms.toFixed(3), s.p99Ms.toFixed(3), s.cpuUsPerCall.server.toFixed(0), String(s.calls), String(s.errors), s.verified ? "yes" : "NO"]);
    }
    const r = w.ratio;
    rows.push([name, "keel/baseline", `${r.callsPerSec.toFixed(2)}x`, `${r.p50Ms.toFixed(2)}x`, `${r.p99Ms.toFixed(2)}x`, "", "", "", ""]);
  }
  printRows(rows, 2);
  console.log("ratio: calls/s above 1x means keel is faster; p50/p99 below 1x means keel answers sooner.");
}

/** The broadcast workload: keel, the baseline and keel/baseline, with what each side writes. */
function printFanoutTable(summary) {
  const rows = [["workload", "server", "fan-out ms", "events/s", "delivery p50 ms", "delivery p99 ms", "CPU ms/burst srv+client", "connect ms", "errors", "verified"]];
  for (const name of FANOUT_WORKLOADS) {
    const w = summary[name];
    if (!w) continue;
    for (const kind of ["keel", "baseline"]) {
      const s = w[kind];
      const cpu = `${s.cpuMsPerBurst.server.toFixed(0)}+${s.cpuMsPerBurst.client.toFixed(0)}`;
      rows.push([name, kind, s.fanoutMs.toFixed(3), s.eventsPerSec.toFixed(0), s.deliveryP50Ms.toFixed(3), s.deliveryP99Ms.toFixed(3), cpu, s.connectMs.toFixed(0), String(s.errors), s.verified ? "yes" : "NO"]);
    }
    const r = w.ratio;
    rows.push([name, "keel/baseline", `${r.fanoutMs.toFixed(2)}x`, "", `${r.deliveryP50Ms.toFixed(2)}x`, `${r.deliveryP99Ms.toFixed(2)}x`, "", "", "", ""]);
  }
  printRows(rows, 2);
  const b = summary.broadcast.keel;
  console.log(
    `broadcast: ${b.connections} connections, ${b.connections / b.rooms} per room, one action per room per burst, ~${b.payloadBytes}-byte payload; ` +
      "fan-out = first action sent to last event received (median burst); delivery = action sent to event received, per connection; ratio below 1x means keel delivers sooner.",
  );
  console.log("NOTE: the baseline does no durable write; keel does one commit per action (the room counts its broadcasts in durable state) and sends the events after it.");
}

/** The life-cycle workloads (keel only), each figure next to its reference. */
function printLifecycleTable(summary) {
  const rows = [["workload", "figure", "keel", "reference", "ratio", "verified"]];
  const x = (r) => (r === null || r === undefined ? "" : `${r.toFixed(2)}x`);
  const yes = (w) => (w.verified ? "yes" : "NO");
  if (summary.wake) {
    const w = summary.wake;
    rows.push(["wake", "p50 ms, asleep vs awake", w.wake.p50Ms.toFixed(3), w.awake.p50Ms.toFixed(3), x(w.ratio.p50Ms), yes(w)]);
    rows.push(["wake", "p99 ms, asleep vs awake", w.wake.p99Ms.toFixed(3), w.awake.p99Ms.toFixed(3), x(w.ratio.p99Ms), yes(w)]);
  }
  if (summary.memory) {
    const m = summary.memory;
    rows.push(["memory", "RSS bytes/actor, awake", String(m.bytesPerActor.awake), "", "", yes(m)]);
    rows.push(["memory", "RSS bytes/actor, asleep", String(m.bytesPerActor.asleep), "", "", yes(m)]);
    rows.push(["memory", "… less V8 young-generation growth", String(m.bytesPerActor.asleepBesidesYoung), "", "", yes(m)]);
    rows.push(["memory", "RSS bytes/actor, awake then asleep", String(m.bytesPerActor.napped), "", "", yes(m)]);
  }
  if (summary.alarms) {
    const a = summary.alarms;
    rows.push(["alarms", "alarms/s vs calls/s (concurrent)", a.alarmsPerSec.toFixed(1), a.referenceCallsPerSec === null ? "" : a.referenceCallsPerSec.toFixed(1), x(a.ratio.alarmsPerCall), yes(a)]);
    rows.push(["alarms", "first alarm late by ms", a.firstLagMs.toFixed(0), "", "", yes(a)]);
  }
  printRows(rows, 2);
  console.log("life cycle (keel only): wake ratio = call to an asleep actor / call to an awake one; memory = RSS delta after a full GC over the wave; alarms ratio = alarms fired/s / plain calls/s.");
}

/** The http-* workloads: every server, the client that drove it, and keel over each other one. */
function printHttpTable(summary, wrk) {
  const rows = [["workload", "server", "client", "calls/s", "p50 ms", "p99 ms", "server CPU µs/call", "calls", "errors", "verified"]];
  for (const name of HTTP_WORKLOADS) {
    const w = summary[name];
    if (!w) continue;
    for (const kind of Object.keys(w.servers)) {
      const s = w.servers[kind];
      rows.push([name, kind, s.client, s.callsPerSec.toFixed(1), s.p50Ms.toFixed(3), s.p99Ms.toFixed(3), s.cpuUsPerCall.server.toFixed(0), String(s.calls), String(s.errors), s.verified ? "yes" : "NO"]);
    }
    for (const [other, r] of Object.entries(w.ratio)) {
      rows.push([name, `keel/${other}`, "", `${r.callsPerSec.toFixed(2)}x`, `${r.p50Ms.toFixed(2)}x`, `${r.p99Ms.toFixed(2)}x`, "", "", "", ""]);
    }
  }
  printRows(rows, 3);
  console.log(
    `http-*: ${wrk.available ? `${wrk.version}, one connection per key (one wrk thread per connection for one key, else one per core, the keys in turn)` : `JS load generator (${wrk.note})`}; ` +
      "-relaxed = keel `durability: \"relaxed\"`, baseline synchronous=NORMAL. RivetKit has no such setting: it replies before writing state " +
      "(saved at most every 10 s, written and renamed without fsync), in both rows.",
  );
}

/** The start-up figures of every server, with keel's goals and keel/other ratios. */
function printFiguresTable(f) {
  const mb = (b) => (b / 1048576).toFixed(1);
  const kinds = ["keel", "baseline", ...PEERS].filter((k) => f.coldStart?.[k] || f.idleRss?.[k] || f.manyActors?.[k]);
  const rows = [["figure", "goal (keel)", ...kinds, ...kinds.filter((k) => k !== "keel").map((k) => `keel/${k}`), "keel meets goal"]];
  const add = (label, goal, pick, fmt, meets) => {
    const values = kinds.map((k) => pick(k));
    if (values[0] === undefined) return;
    const ratios = kinds.slice(1).map((_, i) => (values[i + 1] === undefined ? "" : `${(values[0] / values[i + 1]).toFixed(2)}x`));
    rows.push([label, goal, ...values.map((v) => (v === undefined ? "" : fmt(v))), ...ratios, meets === null ? "" : meets(values[0]) ? "yes" : "NO"]);
  };
  const g = f.goals;
  add("cold start ms (spawn to first reply)", `< ${g.coldStartMs}`, (k) => f.coldStart?.[k]?.ms, (v) => v.toFixed(1), (v) => v < g.coldStartMs);
  add(`idle RSS MB (no actors)`, `< ${g.idleRssMB}`, (k) => f.idleRss?.[k]?.rssBytes, mb, (v) => v / 1048576 < g.idleRssMB);
  // The goals are for 10,000 actors; another --many-actors count is shown without them.
  const n = f.manyActors?.keel?.actors ?? 10_000;
  const held = n === 10_000;
  add(`${n} actors created+called, ms`, held ? `< ${g.manyActorsMs}` : "", (k) => f.manyActors?.[k]?.elapsedMs, (v) => v.toFixed(0), held ? (v) => v < g.manyActorsMs : null);
  add(`RSS MB after ${n} actors`, held ? `< ${g.manyActorsRssMB}` : "", (k) => f.manyActors?.[k]?.serverRssBytes, mb, held ? (v) => v / 1048576 < g.manyActorsRssMB : null);
  if (f.memoryBytesPerActor) {
    add("RSS bytes/actor, awake", "", (k) => (k === "keel" ? f.memoryBytesPerActor.awake : undefined), String, null);
    add("RSS bytes/actor, asleep", "", (k) => (k === "keel" ? f.memoryBytesPerActor.asleep : undefined), String, null);
  }
  printRows(rows, 1);
  console.log(
    "start-up: keel runs the README counter; medians over the spawns (cold start, idle RSS); one run of the actors on each server. Ratios are keel/peer, below 1x " +
      "means keel is faster or smaller. RivetKit needs two requests to create and call an actor (PUT /actors, then the action); keel and the baseline one. " +
      "bytes/actor come from the memory workload (keel only).",
  );
}

/**
 * Prints `rows` (the first is the header) as a table: columns as wide as their widest cell, two
 * spaces apart, the first `leftColumns` padded on the right (names), the rest on the left
 * (figures), and a line of dashes under the header.
 */
function printRows(rows, leftColumns) {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
  const line = (row) => row.map((cell, i) => (i < leftColumns ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join("  ");
  console.log(line(rows[0]));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const row of rows.slice(1)) console.log(line(row));
}

/**
 * Prints every table the summary has, each after a blank line: counter calls, broadcast, life
 * cycle, http-*, the start-up `figures` (or null) and sockets. `wrk` says what drove http-*.
 */
export function printTables(summary, figures, wrk) {
  console.log("");
  if (Object.keys(summary).some((name) => COUNTER_WORKLOADS.includes(name))) printTable(summary);
  if (Object.keys(summary).some((name) => FANOUT_WORKLOADS.includes(name))) {
    console.log("");
    printFanoutTable(summary);
  }
  if (Object.keys(summary).some((name) => LIFECYCLE_WORKLOADS.includes(name))) {
    console.log("");
    printLifecycleTable(summary);
  }
  if (HTTP_WORKLOADS.some((name) => summary[name])) {
    console.log("");
    printHttpTable(summary, wrk);
  }
  if (figures) {
    console.log("");
    printFiguresTable(figures);
  }
  if (summary.sockets) {
    console.log("");
    printSocketsTable(summary.sockets);
  }
  if (summary.db) {
    console.log("\nc.db insert + indexed select per call (db.mjs), keel vs better-sqlite3, medians");
    for (const [name, w] of Object.entries(summary.db.summary)) {
      console.log(
        `${name.padEnd(14)} ${String(w.actors).padStart(3)} actors  keel ${w.keel.callsPerSec} calls/s (p50 ${w.keel.p50Ms} ms)  baseline ${w.baseline.callsPerSec} calls/s (p50 ${w.baseline.p50Ms} ms)  ${w.ratioMedian}x (${w.ratioMin}-${w.ratioMax})${summary.db.verified ? "" : "  NOT VERIFIED"}`,
      );
    }
  }
  if (summary["actor-calls"]) {
    const a = summary["actor-calls"];
    console.log("\nactor-to-actor calls (actor-calls.mjs), medians");
    console.log(`c.client() in process  p50 ${a.inProcess.p50Ms} ms  p99 ${a.inProcess.p99Ms} ms  ${a.inProcess.callsPerSec} calls/s`);
    console.log(`HTTP from a client     p50 ${a.http.p50Ms} ms  p99 ${a.http.p99Ms} ms  ${a.http.callsPerSec} calls/s`);
    console.log(`p50 in process / HTTP  ${a.p50Ratio.median}x (${a.p50Ratio.min}-${a.p50Ratio.max})${a.verified ? "" : "  NOT VERIFIED"}`);
  }
}
