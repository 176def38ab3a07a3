// Baseline server for the bench: what one would write by hand without keel. Plain node:http
// and better-sqlite3, run as a child process by run.mjs.
//
// Usage: node servers/baseline.mjs <dataDir>
// Prints `{"ready":true,"port":N}` on stdout once listening; serves until stdin closes or
// SIGTERM.
//
// Same durability promise as keel: each action runs in its own SQLite transaction (read the
// state row, run the action, write the row, commit) in WAL mode with synchronous=FULL, and the
// reply is sent only after COMMIT returned. better-sqlite3 is synchronous, so the fsync of each
// commit blocks the event loop: there is no group commit, which is the point of comparison.

import http from "node:http";
import path from "node:path";
import Database from "better-sqlite3";
import { actions as counterActions, initialState as counterInitial } from "./counter.mjs";

const dataDir = process.argv[2];
if (!dataDir) {
  console.error("usage: node servers/baseline.mjs <dataDir>");
  process.exit(2);
}

const types = { counter: { actions: counterActions, initialState: counterInitial } };

const db = new Database(path.join(dataDir, "baseline.db"));
db.pragma("journal_mode = WAL");
db.pragma("synchronous = FULL");
db.exec(`CREATE TABLE IF NOT EXISTS actors (
  name  TEXT NOT NULL,
  key   TEXT NOT NULL,
  state TEXT NOT NULL,
  PRIMARY KEY (name, key)
) WITHOUT ROWID`);

const selectState = db.prepare("SELECT state FROM actors WHERE name = ? AND key = ?");
const upsertState = db.prepare(
  `INSERT INTO actors (name, key, state) VALUES (?, ?, ?)
   ON CONFLICT (name, key) DO UPDATE SET state = excluded.state`,
);

// State is stored as JSON text, as keel stores it, so both pay for (de)serialisation.
// A read-only action (getCount) writes nothing, so its COMMIT costs no fsync.
const runAction = db.transaction((type, name, keyText, key, action, args) => {
  const row = selectState.get(name, keyText);
  const before = row ? row.state : null;
  const c = { state: row ? JSON.parse(row.state) : type.initialState(), name, key };
  const output = action(c, ...args);
  const after = JSON.stringify(c.state);
  if (after !== before) upsertState.run(name, keyText, after);
  return output;
});

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

function fail(res, status, group, code, message) {
  send(res, status, { group, code, message, metadata: null });
}

const ROUTE = /^\/v1\/actors\/([^/]+)\/actions\/([^/]+)$/;

const server = http.createServer({ noDelay: true }, (req, res) => {
  const match = req.method === "POST" ? ROUTE.exec(req.url) : null;
  if (!match) return fail(res, 404, "request", "route_not_found", `no route for ${req.method} ${req.url}`);
  const name = decodeURIComponent(match[1]);
  const actionName = decodeURIComponent(match[2]);
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch (err) {
      return fail(res, 400, "request", "malformed", `invalid JSON body: ${err.message}`);
    }
    const key = body?.key;
    const args = body?.args ?? [];
    if (!Array.isArray(key) || !key.every((part) => typeof part === "string") || !Array.isArray(args)) {
      return fail(res, 400, "request", "malformed", "expected {key: string[], args?: any[]}");
    }
    const type = Object.hasOwn(types, name) ? types[name] : undefined;
    if (!type) return fail(res, 404, "actor", "not_found", `no actor type ${JSON.stringify(name)}`);
    const action = Object.hasOwn(type.actions, actionName) ? type.actions[actionName] : undefined;
    if (!action) return fail(res, 404, "actor", "action_not_found", `no action ${JSON.stringify(actionName)}`);
    let output;
    try {
      output = runAction(type, name, JSON.stringify(key), key, action, args);
    } catch (err) {
      return fail(res, 500, "actor", "internal_error", String(err?.message ?? err));
    }
    // COMMIT has returned (and fsynced) by now, so the reply may go out.
    send(res, 200, { output: output ?? null });
  });
});

// Long enough that no keep-alive socket is closed between the warm-up and the measurement,
// which would otherwise show up as a reconnect (or an ECONNRESET race) in the figures.
server.keepAliveTimeout = 60_000;

server.listen(0, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ ready: true, port: server.address().port }) + "\n");
});

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  server.close(() => {
    db.close();
    process.exit();
  });
  server.closeIdleConnections();
}
process.stdin.on("end", stop);
process.stdin.on("error", stop);
process.stdin.resume();
process.on("SIGTERM", stop);
