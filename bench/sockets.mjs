// The sockets workload of `npm run bench -- --only sockets`: server memory per open WebSocket.
// See "Memory per socket" in bench/README.md.
//
// For each case a new server child runs with `--expose-gc --import ./servers/gc-hook.mjs`:
//   - keel, connection protocol: `room` actors of servers/sockets.mjs, `init` subscribed to
//     `tick`, one `broadcast` action per room sent over the room's first connection;
//   - keel, raw sockets: `rawroom` actors (`onWebSocket`), one text message per room sent
//     over the room's first socket, which the actor sends to each of the room's sockets;
//   - keel, hibernated: `hroom` actors (the same room, with `hibernatableConnections` and a
//     1 s sleep timeout): the idle reading is taken once every actor sleeps and every socket
//     is kept as hibernated (`keel_connections_hibernated` = count, `keel_actors_awake` = 0),
//     so it is the memory of a sleeping actor's connections; the broadcast then wakes each
//     actor through its first socket, and every hibernated connection must get the event;
//   - baseline: servers/baseline.mjs (`ws`), the connection protocol's frames, as for keel.
// Steps per case: warm up (wake every actor with an HTTP call, open and close 100 sockets),
// read the server's VmRSS after a full GC (base), open all the connections, `connections /
// actors` per actor, read it again (idle), send one broadcast per actor and wait until every
// connection has its event and every action its reply, read it again (after broadcast), then
// close everything. KiB per connection = (reading − base) / count.
//
// The clients run in this process: only the server's memory is measured, and nothing here
// is timed except the bounds. Every socket goes to 127.0.0.1; the source addresses rotate
// over 127.0.0.1–127.0.0.4 so that ephemeral ports never run out.

import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const benchDir = path.dirname(fileURLToPath(import.meta.url));
const HOST = "127.0.0.1";
const SOURCE_ADDRESSES = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"];
const EVENT = "tick";
/** Handshakes in flight at once while opening connections. */
const CONNECT_CONCURRENCY = 100;
/** Sockets opened and closed before the base reading. */
const WARMUP_SOCKETS = 100;
/** The bound on any one step (opening all connections, one broadcast round, a GC). */
const STEP_TIMEOUT_MS = 120_000;

/** Server memory per socket, on keel (both socket kinds) and on the baseline. */
export async function socketsWorkload({ connections, actors, addonPath, keelDir }) {
  const { default: WebSocket } = await import("ws");
  const cases = [
    { name: "keel", server: "sockets", protocol: "keel" },
    { name: "keel-raw", server: "sockets", protocol: "raw" },
    { name: "keel-hibernated", server: "sockets", protocol: "keel", type: "hroom", hibernate: true },
    { name: "baseline", server: "baseline", protocol: "keel" },
  ];
  const results = {};
  for (const c of cases) {
    console.error(`sockets: ${connections} ${c.protocol === "raw" ? "raw sockets" : "connections"} over ${actors} actors on ${c.name} ...`);
    const server = await startServer(c.server, { addonPath, keelDir });
    try {
      results[c.name] = await measureCase(WebSocket, server, c, connections, actors);
    } finally {
      await stopServer(server);
    }
    const r = results[c.name];
    console.error(`  ${r.kibPerConnection.idle} KiB/connection idle, ${r.kibPerConnection.afterBroadcast} after the broadcast; delivered ${r.delivered}/${r.connections}; verified: ${r.verified}`);
  }
  return {
    connections,
    actors,
    perActor: connections / actors,
    results,
    verified: Object.values(results).every((r) => r.verified),
  };
}

async function measureCase(WebSocket, server, { protocol, type = protocol === "raw" ? "rawroom" : "room", hibernate = false }, total, actors) {
  const perActor = total / actors;
  let sourceIndex = 0;
  const open = (actor, onMessage) =>
    openSocket(WebSocket, {
      url:
        protocol === "raw"
          ? `ws://${HOST}:${server.port}/v1/actors/rawroom/raw/room-${actor}`
          : `ws://${HOST}:${server.port}/v1/actors/${type}/connect`,
      localAddress: SOURCE_ADDRESSES[sourceIndex++ % SOURCE_ADDRESSES.length],
      protocol,
      key: [`room-${actor}`],
      onMessage,
    });

  // Warm-up: wakes every actor (keel; the baseline has none), then runs the whole socket
  // path on a few sockets. Few, because the allocators keep what the warm-up freed and the
  // measured sockets reuse it, which the base reading would hide.
  if (server.kind !== "baseline") {
    await bounded(forEachConcurrently(actors, 16, (actor) => wake(server.port, type, actor)), STEP_TIMEOUT_MS);
  }
  const warm = await openAll(Math.min(WARMUP_SOCKETS, actors), (i) => open(i, () => {}));
  await closeAll(warm);
  const base = await reading(server);

  const received = new Int32Array(total);
  let delivered = 0;
  let allDelivered = null;
  const errors = [];
  const onMessage = (i) => (text) => {
    if (protocol === "raw" ? text !== `broadcast ${Math.floor(i / perActor)}` : !isEvent(text, Math.floor(i / perActor))) {
      if (errors.length < 20) errors.push(`connection ${i}: unexpected message ${text.slice(0, 120)}`);
      return;
    }
    if (received[i]++ === 0 && ++delivered === total) allDelivered?.();
  };
  const sockets = await openAll(total, (i) => open(Math.floor(i / perActor), onMessage(i)));
  // Hibernated: every actor asleep, every socket kept for it, before the idle reading.
  let hibernated;
  if (hibernate) {
    await bounded(untilGauges(server.port, total), STEP_TIMEOUT_MS);
    hibernated = total;
  }
  const idle = await reading(server);

  // One broadcast per actor, over its first socket.
  const everyone = new Promise((resolve) => (allDelivered = resolve));
  const replies = [];
  for (let actor = 0; actor < actors; actor++) {
    const first = sockets[actor * perActor];
    if (protocol === "raw") first.ws.send(`broadcast ${actor}`);
    else replies.push(first.call("broadcast", [{ room: actor }]));
  }
  const timedOut = await bounded(Promise.all([everyone, ...replies]), STEP_TIMEOUT_MS).then(
    () => false,
    (err) => {
      errors.push(String(err.message ?? err));
      return true;
    },
  );
  const afterBroadcast = await reading(server);
  await closeAll(sockets);

  const duplicates = received.reduce((n, count) => n + (count > 1 ? 1 : 0), 0);
  const perConnection = (r) => round1((r.vmRss - base.vmRss) / total / 1024);
  return {
    connections: total,
    actors,
    rssMiB: { base: mib(base.vmRss), idle: mib(idle.vmRss), afterBroadcast: mib(afterBroadcast.vmRss) },
    kibPerConnection: { idle: perConnection(idle), afterBroadcast: perConnection(afterBroadcast) },
    readings: { base, idle, afterBroadcast },
    delivered,
    duplicates,
    hibernated,
    errors: errors.slice(0, 5),
    verified: !timedOut && delivered === total && duplicates === 0 && errors.length === 0,
  };
}

/** Resolves once no actor is awake and `count` connections are kept for sleeping actors. */
async function untilGauges(port, count) {
  for (;;) {
    const page = await (await fetch(`http://${HOST}:${port}/metrics`)).text();
    const value = (name) => Number(page.split("\n").find((line) => line.startsWith(`${name} `))?.split(" ")[1]);
    if (value("keel_actors_awake") === 0 && value("keel_connections_hibernated") === count) return;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

/** Wakes (and first creates) actor `room-<actor>` of `type` with an HTTP call to `size`. */
async function wake(port, type, actor) {
  const response = await fetch(`http://${HOST}:${port}/v1/actors/${type}/actions/size`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ key: [`room-${actor}`], args: [] }),
  });
  if (response.status !== 200) throw new Error(`waking ${type} room-${actor}: HTTP ${response.status} ${await response.text()}`);
}

/** Runs `fn(i)` for i in [0, count), `concurrency` at a time. */
async function forEachConcurrently(count, concurrency, fn) {
  let next = 0;
  const worker = async () => {
    while (next < count) await fn(next++);
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
}

/** Whether `text` is the room's `tick` event in keel's connection protocol. */
function isEvent(text, room) {
  const msg = parse(text);
  return msg?.t === "event" && msg.event === EVENT && msg.data?.room === room;
}

/** `text` as JSON, or null. */
function parse(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/**
 * Opens one socket and resolves once the server has admitted it: `ready` for keel's
 * connection protocol (after `init`), the actor's `ready` message for a raw socket. Later text
 * frames other than replies go to `onMessage`. `call(action, args)` resolves a reply's output.
 */
function openSocket(WebSocket, { url, localAddress, protocol, key, onMessage }) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false, handshakeTimeout: STEP_TIMEOUT_MS, localAddress });
    const pending = new Map();
    let nextId = 1;
    let admitted = false;
    const socket = {
      ws,
      call(action, args) {
        return new Promise((res, rej) => {
          const id = nextId++;
          pending.set(id, { res, rej });
          ws.send(JSON.stringify({ t: "call", id, action, args }));
        });
      },
    };
    ws.on("open", () => {
      if (protocol === "keel") ws.send(JSON.stringify({ t: "init", key, params: null, subs: [EVENT] }));
    });
    ws.on("message", (data, isBinary) => {
      const text = isBinary ? "" : data.toString("utf8");
      if (!admitted) {
        const ready = protocol === "raw" ? text === "ready" : parse(text)?.t === "ready";
        if (!ready) return reject(new Error(`not admitted: ${text.slice(0, 200)}`));
        admitted = true;
        return resolve(socket);
      }
      const msg = protocol === "keel" ? parse(text) : null;
      if (msg?.t === "reply") {
        const call = pending.get(msg.id);
        pending.delete(msg.id);
        if (msg.error) call?.rej(new Error(`${msg.error.group}.${msg.error.code}: ${msg.error.message}`));
        else call?.res(msg.output);
        return;
      }
      onMessage(text);
    });
    ws.on("error", (err) => {
      if (!admitted) reject(err);
    });
    ws.on("close", (code) => {
      if (!admitted) reject(new Error(`closed (${code}) before it was admitted`));
      for (const call of pending.values()) call.rej(new Error(`socket closed (${code})`));
      pending.clear();
    });
  });
}

/** Opens `count` sockets, `CONNECT_CONCURRENCY` handshakes at a time, within the step bound. */
async function openAll(count, openOne) {
  const sockets = new Array(count);
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const i = next++;
      sockets[i] = await openOne(i);
    }
  };
  const workers = Array.from({ length: Math.min(CONNECT_CONCURRENCY, count) }, worker);
  try {
    await bounded(Promise.all(workers), STEP_TIMEOUT_MS);
  } catch (err) {
    await closeAll(sockets.filter(Boolean));
    throw err;
  }
  return sockets;
}

/** Closes sockets with a close handshake; stragglers are terminated after 10 s. */
async function closeAll(sockets) {
  const open = sockets.filter((s) => s.ws.readyState !== s.ws.CLOSED);
  const closed = Promise.all(open.map((s) => new Promise((resolve) => {
    s.ws.once("close", resolve);
    s.ws.close(1000);
  })));
  const timer = setTimeout(() => open.forEach((s) => s.ws.terminate()), 10_000);
  await closed;
  clearTimeout(timer);
}

function bounded(promise, ms) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`not done after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------------
// The server child

async function startServer(kind, { addonPath, keelDir }) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), `keel-bench-sockets-${kind}-`));
  const env = { ...process.env, NAPI_RS_NATIVE_LIBRARY_PATH: addonPath, KEEL_BENCH_KEEL_DIR: keelDir };
  if (kind === "baseline") delete env.NAPI_RS_NATIVE_LIBRARY_PATH;
  const child = spawn(
    process.execPath,
    ["--expose-gc", "--import", "./servers/gc-hook.mjs", path.join(benchDir, "servers", `${kind}.mjs`), dataDir],
    { cwd: benchDir, env, stdio: ["pipe", "pipe", "pipe"] },
  );
  const server = { kind, child, dataDir, port: null, lines: [], waiters: [], stderr: "" };
  child.stderr.setEncoding("utf8").on("data", (d) => (server.stderr = (server.stderr + d).slice(-8000)));
  let buffered = "";
  child.stdout.setEncoding("utf8").on("data", (chunk) => {
    buffered += chunk;
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      if (!line.startsWith("{")) continue;
      const waiter = server.waiters.shift();
      if (waiter) waiter(JSON.parse(line));
      else server.lines.push(JSON.parse(line));
    }
  });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  server.exited = exited;
  try {
    const ready = await bounded(Promise.race([nextLine(server), exited.then((code) => Promise.reject(new Error(`${kind} server exited early (${code}):\n${server.stderr}`)))]), 60_000);
    server.port = ready.port;
  } catch (err) {
    child.kill("SIGKILL");
    fs.rmSync(dataDir, { recursive: true, force: true });
    throw err;
  }
  return server;
}

function nextLine(server) {
  if (server.lines.length) return Promise.resolve(server.lines.shift());
  return new Promise((resolve) => server.waiters.push(resolve));
}

/** The server's memory after two full GCs, from /proc/<pid>/status, in bytes. */
async function reading(server) {
  server.child.stdin.write("gc\n");
  const answer = await bounded(nextLine(server), STEP_TIMEOUT_MS);
  if (!answer.gc) throw new Error(`${server.kind} server has no gc(); it must run with --expose-gc`);
  const fields = { VmRSS: "vmRss", RssAnon: "rssAnon", RssFile: "rssFile" };
  const out = {};
  for (const line of fs.readFileSync(`/proc/${server.child.pid}/status`, "utf8").split("\n")) {
    const [name, value] = line.split(":");
    if (name in fields) out[fields[name]] = Number.parseInt(value, 10) * 1024;
  }
  return out;
}

async function stopServer(server) {
  server.child.stdin.end();
  const clean = await bounded(server.exited, 30_000).then(
    () => true,
    () => false,
  );
  if (!clean) {
    console.error(`${server.kind} server did not stop within 30 s; killing pid ${server.child.pid}`);
    server.child.kill("SIGKILL");
    await server.exited;
  }
  fs.rmSync(server.dataDir, { recursive: true, force: true });
}

const round1 = (x) => Math.round(x * 10) / 10;
const mib = (bytes) => round1(bytes / (1024 * 1024));

/** Prints the table of a `socketsWorkload` result. */
export function printSocketsTable(s) {
  const rows = [["sockets", "server", "RSS MiB base", "idle", "after broadcast", "KiB/conn idle", "KiB/conn after broadcast", "delivered", "verified"]];
  for (const [name, r] of Object.entries(s.results)) {
    rows.push([
      name === "keel-raw" ? "raw onWebSocket" : name === "keel-hibernated" ? "connection protocol, actor asleep" : "connection protocol",
      name === "keel-raw" || name === "keel-hibernated" ? "keel" : name,
      r.rssMiB.base.toFixed(1),
      r.rssMiB.idle.toFixed(1),
      r.rssMiB.afterBroadcast.toFixed(1),
      r.kibPerConnection.idle.toFixed(1),
      r.kibPerConnection.afterBroadcast.toFixed(1),
      `${r.delivered}/${r.connections}`,
      r.verified ? "yes" : "NO",
    ]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
  const line = (row) => row.map((cell, i) => (i < 2 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join("  ");
  console.log(line(rows[0]));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const row of rows.slice(1)) console.log(line(row));
  console.log(`sockets: ${s.connections} per server over ${s.actors} actors (${s.perActor} each); RSS read after a full GC; KiB/conn = (RSS − base) / ${s.connections}.`);
}
