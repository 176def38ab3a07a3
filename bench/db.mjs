// The `c.db` workload: each call inserts a row into its actor's database and reads rows back
// by an indexed column, through keel (`keel/db`, HTTP actions, `durability: "full"`) and
// through the plain-Node baseline (node:http + better-sqlite3: the same SQL in one
// transaction per request, WAL, synchronous=FULL, reply after COMMIT). Sequential (one actor,
// one call at a time) and concurrent (16 actors, one call in flight each).
//
// Usage: node bench/db.mjs [--seconds 5] [--rounds 3] [--actors 16] [--json]
//   KEEL_DIR=/path/to/other/tree node bench/db.mjs   # load that tree's dist/ and release addon
// Run by run.mjs as the `db` workload (with --json: one JSON line on stdout).
//
// Everything runs in this one process (the server under test and the load): both sides are
// driven by the same `post` below over keep-alive HTTP to 127.0.0.1, so they share the process
// the same way, and the figures are the ratios. Each round runs every workload on both, the
// order alternating per round; each (side, workload) gets a fresh data dir. Afterwards the
// rows each actor holds must equal the calls acknowledged for it, or the run fails.
//
// What must stay true: the same durability on both sides (a reply only after the commit that
// holds the call's row is durable: keel.db's fsynced commit for keel, COMMIT with
// synchronous=FULL for the baseline); the same SQL; and the addon loaded is a release build
// (a debug addon is refused).
import http from "node:http";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { treeAddon } from "./run/setup.mjs";
import { median, round3 } from "./run/stats.mjs";
import { checkAddon } from "./servers/keel-tree.mjs";

const args = process.argv.slice(2);
const opt = (name, fallback) => {
  const i = args.indexOf(name);
  return i === -1 ? fallback : Number(args[i + 1]);
};
const seconds = opt("--seconds", 5);
const rounds = opt("--rounds", 3);
const concurrentActors = opt("--actors", 16);
const asJson = args.includes("--json");
for (const [name, v] of [["--seconds", seconds], ["--rounds", rounds], ["--actors", concurrentActors]]) {
  if (!Number.isInteger(v) || v < 1 || v > 256) throw new Error(`${name} must be an integer from 1 to 256`);
}

const keelDir = resolve(process.env.KEEL_DIR ?? join(import.meta.dirname, ".."));
process.env.NAPI_RS_NATIVE_LIBRARY_PATH = treeAddon(keelDir); // refuses a debug addon
const { actor, setup } = await import(pathToFileURL(join(keelDir, "dist/index.js")).href);
const { db } = await import(pathToFileURL(join(keelDir, "dist/db.js")).href);
checkAddon("db bench");
const { default: Database } = await import("better-sqlite3");

const WORKLOADS = [
  { name: "db-sequential", actors: 1 },
  { name: "db-concurrent", actors: concurrentActors },
];

const agent = new http.Agent({ keepAlive: true, noDelay: true });
function post(port, path, payload) {
  return new Promise((ok, fail) => {
    const req = http.request({ host: "127.0.0.1", port, path, method: "POST", agent, headers: { "content-type": "application/json" } }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (chunk) => (text += chunk));
      res.on("end", () => (res.statusCode === 200 ? ok(JSON.parse(text).output) : fail(new Error(`status ${res.statusCode}: ${text}`))));
    });
    req.on("error", fail);
    req.end(JSON.stringify(payload));
  });
}

/** `actors` loops, one per actor, calling `add` for `seconds`; rate, latencies, acks per actor. */
async function drive(port, actors) {
  const latencies = [];
  const acked = new Array(actors).fill(0);
  // Warm-up: each actor started and its statements prepared before the clock starts.
  await Promise.all(acked.map((_, i) => post(port, "/v1/actors/notes/actions/add", { key: [`n${i}`], args: [0, "warm-up"] }).then(() => acked[i]++)));
  const started = performance.now();
  const deadline = started + seconds * 1000;
  await Promise.all(
    acked.map(async (_, i) => {
      for (let n = 0; performance.now() < deadline; n++) {
        const t = performance.now();
        await post(port, "/v1/actors/notes/actions/add", { key: [`n${i}`], args: [n % 10, `body ${n}`] });
        latencies.push(performance.now() - t);
        acked[i]++;
      }
    }),
  );
  const elapsed = (performance.now() - started) / 1000;
  latencies.sort((a, b) => a - b);
  const at = (q) => round3(latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))]);
  return { callsPerSec: Math.round(latencies.length / elapsed), p50Ms: at(0.5), p99Ms: at(0.99), calls: latencies.length, acked };
}

const SCHEMA = [
  "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, tag INTEGER NOT NULL, body TEXT NOT NULL)",
  "CREATE INDEX IF NOT EXISTS notes_by_tag ON notes (tag)",
];

async function keelRun(dataDir, actors) {
  const notes = actor({
    state: {},
    db: db({
      onMigrate: async (d) => {
        for (const sql of SCHEMA) await d.execute(sql);
      },
    }),
    actions: {
      add: async (c, tag, body) => {
        await c.db.execute("INSERT INTO notes (tag, body) VALUES (?, ?)", tag, body);
        return (await c.db.execute("SELECT id, body FROM notes WHERE tag = ? ORDER BY id DESC LIMIT 5", tag)).length;
      },
      rows: async (c) => (await c.db.execute("SELECT count(*) AS n FROM notes"))[0].n,
    },
  });
  const registry = setup({ use: { notes }, host: "127.0.0.1", port: 0, dataDir, durability: "full", disableSignalHandlers: true });
  const serving = registry.start();
  try {
    const { url } = await registry.listening();
    const port = Number(new URL(url).port);
    const result = await drive(port, actors);
    const rows = await Promise.all(result.acked.map((_, i) => post(port, "/v1/actors/notes/actions/rows", { key: [`n${i}`], args: [] })));
    return { ...result, rows };
  } finally {
    await registry.shutdown();
    await serving;
  }
}

async function baselineRun(dataDir, actors) {
  // One file for all actors, keyed by actor: the plain-Node way to hold many actors' rows.
  const sqlite = new Database(join(dataDir, "baseline.db"));
  sqlite.pragma("journal_mode = WAL");
  sqlite.pragma("synchronous = FULL");
  sqlite.exec("CREATE TABLE notes (id INTEGER PRIMARY KEY, actor TEXT NOT NULL, tag INTEGER NOT NULL, body TEXT NOT NULL)");
  sqlite.exec("CREATE INDEX notes_by_tag ON notes (actor, tag)");
  const insert = sqlite.prepare("INSERT INTO notes (actor, tag, body) VALUES (?, ?, ?)");
  const select = sqlite.prepare("SELECT id, body FROM notes WHERE actor = ? AND tag = ? ORDER BY id DESC LIMIT 5");
  const count = sqlite.prepare("SELECT count(*) AS n FROM notes WHERE actor = ?");
  const add = sqlite.transaction((key, tag, body) => {
    insert.run(key, tag, body);
    return select.all(key, tag).length;
  });
  const server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      const { key, args } = JSON.parse(body);
      const name = req.url.slice(req.url.lastIndexOf("/") + 1);
      // The transaction has committed (fsynced, synchronous=FULL) before the reply is written.
      const output = name === "add" ? add(key.join("/"), args[0], args[1]) : count.get(key.join("/")).n;
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ output }));
    });
  });
  server.keepAliveTimeout = 60_000;
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  try {
    const port = server.address().port;
    const result = await drive(port, actors);
    const rows = await Promise.all(result.acked.map((_, i) => post(port, "/v1/actors/notes/actions/rows", { key: [`n${i}`], args: [] })));
    return { ...result, rows };
  } finally {
    server.closeAllConnections();
    await new Promise((ok) => server.close(ok));
    sqlite.close();
  }
}

const raw = {};
const failures = [];
for (let round = 0; round < rounds; round++) {
  const order = round % 2 === 0 ? ["keel", "baseline"] : ["baseline", "keel"];
  for (const w of WORKLOADS) {
    for (const side of order) {
      const dir = mkdtempSync(join(tmpdir(), `keel-bench-db-${side}-`));
      try {
        const r = await (side === "keel" ? keelRun : baselineRun)(dir, w.actors);
        r.acked.forEach((n, i) => n !== r.rows[i] && failures.push(`${side} ${w.name} round ${round + 1}: actor n${i} holds ${r.rows[i]} rows, ${n} calls acknowledged`));
        ((raw[w.name] ??= {})[side] ??= []).push({ callsPerSec: r.callsPerSec, p50Ms: r.p50Ms, p99Ms: r.p99Ms, calls: r.calls });
        if (!asJson) console.error(`round ${round + 1}/${rounds} ${w.name} ${side}: ${r.callsPerSec} calls/s, p50 ${r.p50Ms} ms, p99 ${r.p99Ms} ms`);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  }
}
agent.destroy();

const summary = {};
for (const w of WORKLOADS) {
  const side = (s) => ({
    callsPerSec: median(raw[w.name][s].map((r) => r.callsPerSec)),
    p50Ms: median(raw[w.name][s].map((r) => r.p50Ms)),
    p99Ms: median(raw[w.name][s].map((r) => r.p99Ms)),
  });
  const ratios = raw[w.name].keel.map((k, i) => round3(k.callsPerSec / raw[w.name].baseline[i].callsPerSec));
  summary[w.name] = { actors: w.actors, keel: side("keel"), baseline: side("baseline"), ratioMedian: round3(median(ratios)), ratioMin: Math.min(...ratios), ratioMax: Math.max(...ratios) };
}
const report = { keelDir, seconds, rounds, summary, perRound: raw, ok: failures.length === 0, failures };
if (asJson) console.log(JSON.stringify(report));
else {
  console.log(`keel from ${keelDir}, ${seconds} s per workload, ${rounds} rounds (medians)`);
  console.log("| workload | keel calls/s | baseline calls/s | keel / baseline (range) | keel p50 / p99 ms | baseline p50 / p99 ms |");
  console.log("|---|---|---|---|---|---|");
  for (const [name, s] of Object.entries(summary)) {
    console.log(
      `| ${name} (${s.actors} actor${s.actors === 1 ? "" : "s"}) | ${s.keel.callsPerSec} | ${s.baseline.callsPerSec} | **${s.ratioMedian.toFixed(2)}×** (${s.ratioMin.toFixed(2)}–${s.ratioMax.toFixed(2)}) | ${s.keel.p50Ms} / ${s.keel.p99Ms} | ${s.baseline.p50Ms} / ${s.baseline.p99Ms} |`,
    );
  }
}
if (failures.length) {
  console.error(`FAILED:\n${failures.join("\n")}`);
  process.exitCode = 1;
}
