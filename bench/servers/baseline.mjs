// Baseline server for the bench: what one would write by hand without keel. Plain node:http,
// the `ws` package and better-sqlite3, run as a child process by run.mjs.
//
// Usage: node servers/baseline.mjs <dataDir>
// Prints `{"ready":true,"port":N}` on stdout once listening; serves until stdin closes or
// SIGTERM. KEEL_BENCH_DURABILITY=relaxed runs SQLite with synchronous=NORMAL instead of FULL
// (keel's `durability: "relaxed"`); KEEL_BENCH_PORT sets the port (default 0).
//
// Same durability promise as keel: each action runs in its own SQLite transaction (read the
// state row, run the action, write the row, commit) in WAL mode with synchronous=FULL, and the
// reply is sent only after COMMIT returned. better-sqlite3 is synchronous, so the fsync of each
// commit blocks the event loop: there is no group commit, which is the point of comparison.
//
// WebSocket connections (`GET /v1/actors/{name}/connect`, upgraded by `ws`) speak the JSON
// frames of keel's connection protocol, enough of it for the bench: `init` (only its key and
// subscriptions matter), `call` → `reply`, `sub`/`unsub` and `event`. Calls to `counter` run
// the same synchronous transaction as over HTTP and are answered after the commit. `room`
// (the broadcast workload) is a map of rooms to sockets: its `broadcast` action writes
// nothing and just sends the event to the room's subscribed sockets, then replies.

import http from "node:http";
import path from "node:path";
import Database from "better-sqlite3";
import { WebSocketServer } from "ws";
import { actions as counterActions, initialState as counterInitial } from "./counter.mjs";
import { EVENT as ROOM_EVENT } from "./room.mjs";

const dataDir = process.argv[2];
if (!dataDir) {
  console.error("usage: node servers/baseline.mjs <dataDir>");
  process.exit(2);
}

const types = { counter: { actions: counterActions, initialState: counterInitial } };

const db = new Database(path.join(dataDir, "baseline.db"));
db.pragma("journal_mode = WAL");
// FULL by default, as keel's `full`; NORMAL (keel's `relaxed`) for the relaxed workloads and
// for profiling (bench/profile.sh). BASELINE_SYNCHRONOUS overrides both.
db.pragma(`synchronous = ${process.env.BASELINE_SYNCHRONOUS ?? (process.env.KEEL_BENCH_DURABILITY === "relaxed" ? "NORMAL" : "FULL")}`);
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

// ---------------------------------------------------------------------------------------------
// WebSocket connections

const CONNECT = /^\/v1\/actors\/([^/?]+)\/connect(?:\?.*)?$/;
// No compression, as keel (whose WebSocket library does not offer it).
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 1024 * 1024 });

/** The broadcast workload's rooms: key (as JSON text) → `{members: Set<conn>, sent}`. */
const rooms = new Map();
let nextConnId = 0;

server.on("upgrade", (req, socket, head) => {
  const match = req.method === "GET" ? CONNECT.exec(req.url) : null;
  const name = match ? decodeURIComponent(match[1]) : null;
  if (name !== "room" && !Object.hasOwn(types, name ?? "")) {
    socket.end("HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => serveSocket(ws, name));
});

function wsError(group, code, message) {
  return { group, code, message, metadata: null };
}

/** Sends an `error` frame and closes the socket with 1008, as keel does for a bad message. */
function refuse(ws, message) {
  ws.send(JSON.stringify({ t: "error", error: wsError("request", "malformed", message) }));
  ws.close(1008, "malformed message");
}

function serveSocket(ws, name) {
  /** Set by init: `{ws, key, keyText, subs, room}`. */
  let conn = null;
  ws.on("message", (data, isBinary) => {
    let msg;
    try {
      if (isBinary) throw new Error("the baseline speaks JSON only");
      msg = JSON.parse(data.toString("utf8"));
    } catch (err) {
      return refuse(ws, `invalid message: ${err.message}`);
    }
    if (conn === null) {
      const key = msg?.key;
      if (msg?.t !== "init" || !Array.isArray(key) || !key.every((part) => typeof part === "string")) {
        return refuse(ws, "the first message must be init, with a key");
      }
      const keyText = JSON.stringify(key);
      conn = { ws, key, keyText, subs: new Set(Array.isArray(msg.subs) ? msg.subs : []), room: null };
      if (name === "room") {
        let room = rooms.get(keyText);
        if (room === undefined) rooms.set(keyText, (room = { members: new Set(), sent: 0 }));
        room.members.add(conn);
        conn.room = room;
      }
      ws.send(JSON.stringify({ t: "ready", actorId: `${name}:${keyText}`, connId: String(++nextConnId) }));
      return;
    }
    switch (msg?.t) {
      case "call":
        return onCall(name, conn, msg);
      case "sub":
        conn.subs.add(msg.event);
        return;
      case "unsub":
        conn.subs.delete(msg.event);
        return;
      default:
        return refuse(ws, `unknown message type ${JSON.stringify(msg?.t)}`);
    }
  });
  ws.on("close", () => conn?.room?.members.delete(conn));
  ws.on("error", () => {});
}

function onCall(name, conn, msg) {
  const { id, action: actionName } = msg;
  const args = msg.args ?? [];
  const reply = (body) => conn.ws.send(JSON.stringify({ t: "reply", id, ...body }));
  if (!Array.isArray(args)) return reply({ error: wsError("request", "malformed", '"args" must be an array') });
  if (name === "room") {
    const room = conn.room;
    if (actionName === "sent") return reply({ output: room.sent });
    if (actionName !== "broadcast") return reply({ error: wsError("actor", "action_not_found", `no action ${JSON.stringify(actionName)}`) });
    // Nothing durable: build the frame once and send it to the room's subscribers, then
    // reply (keel too sends an action's events before its reply).
    room.sent += 1;
    const frame = JSON.stringify({ t: "event", event: ROOM_EVENT, data: args[0] ?? null });
    for (const member of room.members) {
      if (member.subs.has(ROOM_EVENT)) member.ws.send(frame);
    }
    return reply({ output: room.sent });
  }
  const type = types[name];
  const action = Object.hasOwn(type.actions, actionName) ? type.actions[actionName] : undefined;
  if (!action) return reply({ error: wsError("actor", "action_not_found", `no action ${JSON.stringify(actionName)}`) });
  let output;
  try {
    output = runAction(type, name, conn.keyText, conn.key, action, args);
  } catch (err) {
    return reply({ error: wsError("actor", "internal_error", String(err?.message ?? err)) });
  }
  // COMMIT has returned (and fsynced) by now, so the reply may go out.
  reply({ output: output ?? null });
}

// Long enough that no keep-alive socket is closed between the warm-up and the measurement,
// which would otherwise show up as a reconnect (or an ECONNRESET race) in the figures.
server.keepAliveTimeout = 60_000;

server.listen(Number(process.env.KEEL_BENCH_PORT ?? 0), "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ ready: true, port: server.address().port }) + "\n");
});

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  for (const ws of wss.clients) ws.terminate();
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
