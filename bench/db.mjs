// The `c.db` workload: each call inserts a row into its actor's database and reads rows back
// by an indexed column, through keel (`keel/db`, HTTP actions) and through the plain-Node
// baseline (node:http + better-sqlite3, the same SQL in one transaction per request, WAL,
// synchronous=FULL, reply after COMMIT). Also the concurrent counter (actors without `db`),
// for the "actors without db lose nothing" check: run it on two trees (KEEL_DIR) and compare.
//
// Usage: node bench/db.mjs [seconds per workload, default 5]
//   KEEL_DIR=/path/to/other/tree node bench/db.mjs   # load that tree's dist/ and addon
// Everything runs in this one process (servers and load): ratios, not absolutes, are the
// figures, and both sides share the process the same way.
import http from "node:http";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const seconds = Number(process.argv[2] ?? 5);
const ACTORS = 16;
const keelDir = resolve(process.env.KEEL_DIR ?? join(import.meta.dirname, ".."));
const { actor, setup, createClient } = await import(pathToFileURL(join(keelDir, "dist/index.js")).href);
let db;
try {
  ({ db } = await import(pathToFileURL(join(keelDir, "dist/db.js")).href));
} catch {
  db = undefined; // A tree from before keel/db: only the counter runs.
}

/** Runs `call(i)` from ACTORS concurrent loops, one per actor, for `seconds`; calls per second. */
async function drive(call) {
  let done = 0;
  const deadline = Date.now() + seconds * 1000;
  await Promise.all(
    Array.from({ length: ACTORS }, async (_, i) => {
      for (let n = 0; Date.now() < deadline; n++) {
        await call(i, n);
        done++;
      }
    }),
  );
  return done / seconds;
}

async function keelRun(dataDir) {
  const counter = actor({
    state: { count: 0 },
    actions: { increment: (c, by) => (c.state.count += by) },
  });
  const use = { counter };
  if (db !== undefined) {
    use.notes = actor({
      state: {},
      db: db({
        onMigrate: async (d) => {
          await d.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, tag INTEGER NOT NULL, body TEXT NOT NULL)");
          await d.execute("CREATE INDEX IF NOT EXISTS notes_by_tag ON notes (tag)");
        },
      }),
      actions: {
        add: async (c, tag, body) => {
          await c.db.execute("INSERT INTO notes (tag, body) VALUES (?, ?)", tag, body);
          return (await c.db.execute("SELECT id, body FROM notes WHERE tag = ? ORDER BY id DESC LIMIT 5", tag)).length;
        },
      },
    });
  }
  const registry = setup({ use, port: 0, dataDir, disableSignalHandlers: true });
  const serving = registry.start();
  const { url } = await registry.listening();
  const client = createClient(url);
  const counterRate = await drive((i) => client.counter.getOrCreate([`c${i}`]).increment(1));
  const dbRate = db === undefined ? undefined : await drive((i, n) => client.notes.getOrCreate([`n${i}`]).add(n % 10, `body ${n}`));
  await registry.shutdown();
  await serving;
  return { counterRate, dbRate };
}

async function baselineRun(dataDir) {
  const { default: Database } = await import("better-sqlite3");
  const sqlite = new Database(join(dataDir, "baseline.db"));
  sqlite.pragma("journal_mode = WAL");
  sqlite.pragma("synchronous = FULL");
  sqlite.exec("CREATE TABLE notes (id INTEGER PRIMARY KEY, actor TEXT NOT NULL, tag INTEGER NOT NULL, body TEXT NOT NULL)");
  sqlite.exec("CREATE INDEX notes_by_tag ON notes (actor, tag)");
  const insert = sqlite.prepare("INSERT INTO notes (actor, tag, body) VALUES (?, ?, ?)");
  const select = sqlite.prepare("SELECT id, body FROM notes WHERE actor = ? AND tag = ? ORDER BY id DESC LIMIT 5");
  const add = sqlite.transaction((key, tag, body) => {
    insert.run(key, tag, body);
    return select.all(key, tag).length;
  });
  const server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      const { key, args } = JSON.parse(body);
      const output = add(key.join("/"), args[0], args[1]);
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ output }));
    });
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  const url = `http://127.0.0.1:${server.address().port}/v1/actors/notes/actions/add`;
  const agent = new http.Agent({ keepAlive: true });
  const post = (payload) =>
    new Promise((ok, fail) => {
      const req = http.request(url, { method: "POST", agent, headers: { "content-type": "application/json" } }, (res) => {
        res.resume();
        res.on("end", ok);
      });
      req.on("error", fail);
      req.end(JSON.stringify(payload));
    });
  const rate = await drive((i, n) => post({ key: [`n${i}`], args: [n % 10, `body ${n}`] }));
  agent.destroy();
  await new Promise((ok) => server.close(ok));
  sqlite.close();
  return rate;
}

const dir = mkdtempSync(join(tmpdir(), "keel-bench-db-"));
try {
  const keel = await keelRun(join(dir, "keel"));
  let baseline;
  if (db !== undefined) {
    try {
      baseline = await baselineRun(dir);
    } catch (err) {
      console.error(`baseline skipped: ${err.message} (npm install --prefix bench)`);
    }
  }
  const row = (name, rate) => console.log(`${name.padEnd(34)} ${rate === undefined ? "-" : rate.toFixed(0).padStart(8)} calls/s`);
  console.log(`keel from ${keelDir}, ${ACTORS} actors, ${seconds} s per workload`);
  row("counter (no db), keel", keel.counterRate);
  row("db insert + indexed select, keel", keel.dbRate);
  row("db insert + indexed select, baseline", baseline);
  if (keel.dbRate !== undefined && baseline !== undefined) console.log(`keel / baseline: ${(keel.dbRate / baseline).toFixed(2)}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
