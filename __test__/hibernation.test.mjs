// Hibernatable connections: sockets that stay open while their actor sleeps, with a durable
// `conn.state`; resuming them after a graceful restart; destroy, races and refusals. Real
// addon, real servers on port 0, real `ws` sockets and the real client.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { setup, createClient, actor, event } from "keel";
import { startRegistry, tempDir } from "./helpers.mjs";

/** What the actors' hooks saw, by actor key, in this process. */
const seen = new Map();
function log(c, what) {
  const key = c.key.join("/");
  if (!seen.has(key)) seen.set(key, []);
  seen.get(key).push(what);
}
function seenBy(key) {
  return seen.get(key) ?? [];
}

/** Resolvers the tests use to hold an actor inside its onSleep. */
const sleepGates = new Map();

function roomOf(options) {
  return actor({
    state: { total: 0 },
    events: { tick: event() },
    createConnState: (c, params) => ({ name: params?.name ?? "anon", count: 0 }),
    onConnect: (c, conn) => log(c, `connect:${conn.state.name}`),
    onDisconnect: (c, conn) => log(c, `disconnect:${conn.state.name}`),
    onWake: (c) => log(c, `wake:${[...c.conns.values()].map((conn) => `${conn.id}=${conn.state?.name}:${conn.state?.count}`).join(",")}`),
    onSleep: async (c) => {
      log(c, "sleep");
      const gate = sleepGates.get(c.key.join("/"));
      if (gate !== undefined) {
        sleepGates.delete(c.key.join("/"));
        gate.entered();
        await gate.release;
      }
    },
    actions: {
      bump: (c) => {
        c.conn.state.count += 1;
        c.state.total += 1;
        return { count: c.conn.state.count, total: c.state.total, connId: c.conn.id, params: c.conn.params };
      },
      bumpThenThrow: (c) => {
        c.conn.state.count += 100;
        throw new Error("no");
      },
      tick: (c, n) => {
        c.broadcast("tick", n);
        return n;
      },
      conns: (c) =>
        [...c.conns.values()].map((conn) => ({ id: conn.id, name: conn.state?.name, count: conn.state?.count })).sort((a, b) => a.name.localeCompare(b.name)),
      destroy: (c) => {
        c.destroy();
        return true;
      },
      sleep: (c) => {
        c.sleep();
        return true;
      },
    },
    options,
  });
}

const room = roomOf({ hibernatableConnections: true, sleepTimeoutMs: 200 });
const plain = roomOf({ sleepTimeoutMs: 200 });
const shortWindow = roomOf({ hibernatableConnections: true, sleepTimeoutMs: 60_000, reconnectWindowMs: 300 });

async function start(t, dataDir = tempDir(t), use = { room, plain, shortWindow }) {
  return { ...(await startRegistry(t, setup, { use, dataDir })), dataDir };
}

async function until(what, condition, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

async function gauge(url, name) {
  const text = await (await fetch(`${url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return Number(line.split(" ")[1]);
}

/** A raw socket of keel's protocol, with its frames collected. */
async function open(url, type, key, extra = {}) {
  const ws = new WebSocket(`${url.replace(/^http/, "ws")}/v1/actors/${type}/connect`);
  const frames = [];
  const waiting = [];
  ws.on("message", (data) => {
    const frame = JSON.parse(data.toString());
    frames.push(frame);
    for (const w of [...waiting]) if (w.match(frame)) w.resolve(frame);
  });
  ws.closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })));
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", reject);
  });
  ws.frames = frames;
  ws.next = (match) => {
    const found = frames.find(match);
    if (found) return Promise.resolve(found);
    return new Promise((resolve) => waiting.push({ match, resolve }));
  };
  let id = 0;
  ws.call = (action, ...args) => {
    id += 1;
    const callId = id;
    ws.send(JSON.stringify({ t: "call", id: callId, action, args }));
    return ws.next((f) => f.t === "reply" && f.id === callId);
  };
  ws.send(JSON.stringify({ t: "init", key, params: { name: extra.name }, subs: extra.subs ?? [], ...extra.init }));
  ws.ready = ws.next((f) => f.t === "ready" || f.t === "error");
  return ws;
}

test("a hibernated connection wakes its actor with conn.state intact after sleep (and onConnect does not run again)", async (t) => {
  const { url } = await start(t);
  const key = "sleep-only";
  const ws = await open(url, "room", [key], { name: "ada" });
  const ready = await ws.ready;
  assert.equal(ready.t, "ready");
  assert.match(ready.connToken, /^[0-9a-f]{32}$/, "a hibernatable connection gets a resume token");
  assert.deepEqual((await ws.call("bump")).output.count, 1);
  assert.deepEqual((await ws.call("bump")).output.count, 2);
  // Idle: the actor sleeps although the socket is open.
  await until("the actor sleeps", () => seenBy(key).includes("sleep"));
  await until("the socket is kept as hibernated", async () => (await gauge(url, "keel_connections_hibernated")) === 1);
  assert.equal(await gauge(url, "keel_actors_awake"), 0, "no instance runs");
  assert.equal(ws.readyState, WebSocket.OPEN, "the socket stayed open");
  // The next call wakes it, with the connection restored.
  const woke = await ws.call("bump");
  assert.deepEqual(
    { count: woke.output.count, total: woke.output.total, connId: woke.output.connId, params: woke.output.params },
    { count: 3, total: 3, connId: ready.connId, params: { name: "ada" } },
  );
  // (It may have slept again since; what matters is the first sleep and wake.)
  assert.deepEqual(seenBy(key).slice(0, 4), ["wake:", "connect:ada", "sleep", `wake:${ready.connId}=ada:2`]);
  assert.equal(await gauge(url, "keel_connections_hibernated"), 0);
  ws.close();
  await until("onDisconnect runs when the client closes", () => seenBy(key).includes("disconnect:ada"));
});

test("a throwing call's change to conn.state is rolled back, and what survives sleep is the committed state", async (t) => {
  const { url } = await start(t);
  const key = "rollback";
  const ws = await open(url, "room", [key], { name: "bo" });
  await ws.ready;
  await ws.call("bump");
  assert.equal((await ws.call("bumpThenThrow")).error.code, "internal_error");
  assert.equal((await ws.call("bump")).output.count, 2, "the throwing call's +100 is gone");
  await until("the actor sleeps", () => seenBy(key).includes("sleep"));
  assert.equal((await ws.call("bump")).output.count, 3);
  ws.close();
});

test("events after a wake reach every hibernated connection in order", async (t) => {
  const { url } = await start(t);
  const key = "events";
  const sockets = [];
  for (const name of ["a", "b", "c"]) {
    const ws = await open(url, "room", [key], { name, subs: ["tick"] });
    assert.equal((await ws.ready).t, "ready");
    sockets.push(ws);
  }
  await until("the actor sleeps", () => seenBy(key).includes("sleep"));
  await until("three sockets hibernated", async () => (await gauge(url, "keel_connections_hibernated")) === 3);
  // The wake comes from one socket; every one of them hears every event, in order.
  for (let n = 1; n <= 5; n++) await sockets[n % 3].call("tick", n);
  for (const ws of sockets) {
    await until("five ticks", () => ws.frames.filter((f) => f.t === "event").length === 5);
    assert.deepEqual(
      ws.frames.filter((f) => f.t === "event").map((f) => f.data),
      [1, 2, 3, 4, 5],
    );
  }
  const conns = (await sockets[0].call("conns")).output;
  assert.deepEqual(conns.map((c) => c.name), ["a", "b", "c"], "c.conns is restored whole");
  for (const ws of sockets) ws.close();
});

test("destroy closes hibernated connections with 1000 and deletes their records", async (t) => {
  const { url, stop, dataDir } = await start(t);
  const key = "destroy";
  const a = await open(url, "room", [key], { name: "a" });
  const b = await open(url, "room", [key], { name: "b" });
  await a.ready;
  const readyB = await b.ready;
  await until("the actor sleeps", () => seenBy(key).includes("sleep"));
  await until("both sockets hibernated", async () => (await gauge(url, "keel_connections_hibernated")) === 2);
  assert.equal((await a.call("destroy")).output, true);
  assert.deepEqual(await a.closed, { code: 1000, reason: "actor destroyed" });
  assert.deepEqual(await b.closed, { code: 1000, reason: "actor destroyed" });
  await stop();
  // After a restart, nothing of the destroyed actor's connections can be resumed.
  const again = await start(t, dataDir);
  const resumed = await open(again.url, "room", [key], { init: { connId: readyB.connId, connToken: readyB.connToken } });
  const refused = await resumed.ready;
  assert.equal(refused.t, "error");
  assert.deepEqual([refused.error.group, refused.error.code], ["connection", "resume_refused"]);
});

test("after a graceful restart a client resumes its connection with conn.state intact; a wrong token is refused", async (t) => {
  const dataDir = tempDir(t);
  const first = await start(t, dataDir);
  const key = "restart";
  const ws = await open(first.url, "room", [key], { name: "cy" });
  const ready = await ws.ready;
  await ws.call("bump");
  await ws.call("bump");
  const other = await open(first.url, "room", [key], { name: "dee" });
  await other.ready;
  await first.stop();
  assert.equal((await ws.closed).code, 1001, "shutdown closes the socket with going-away");
  const second = await start(t, dataDir);
  // A wrong token: refused with a structured error, and the socket closed with 1008.
  const wrong = await open(second.url, "room", [key], { init: { connId: ready.connId, connToken: "0".repeat(32) } });
  const refused = await wrong.ready;
  assert.equal(refused.t, "error");
  assert.deepEqual([refused.error.group, refused.error.code], ["connection", "resume_refused"]);
  assert.equal((await wrong.closed).code, 1008);
  // A token without an id (or the reverse) is malformed.
  const half = await open(second.url, "room", [key], { init: { connToken: ready.connToken } });
  assert.equal((await half.ready).error.code, "malformed");
  // The right one: the same connection, its state and params as they were, no onConnect.
  const before = seenBy(key).length;
  const back = await open(second.url, "room", [key], { init: { connId: ready.connId, connToken: ready.connToken } });
  const resumed = await back.ready;
  assert.equal(resumed.t, "ready");
  assert.equal(resumed.connId, ready.connId);
  assert.equal(resumed.resumed, true);
  const bumped = (await back.call("bump")).output;
  assert.deepEqual([bumped.count, bumped.total, bumped.params], [3, 3, { name: "cy" }]);
  assert.ok(!seenBy(key).slice(before).some((e) => e.startsWith("connect:")), "onConnect did not run again");
  // The same token cannot take the connection over while its socket is open.
  const twice = await open(second.url, "room", [key], { init: { connId: ready.connId, connToken: ready.connToken } });
  assert.equal((await twice.ready).error.code, "resume_refused");
  back.close();
  await until("closing for good runs onDisconnect", () => seenBy(key).slice(before).includes("disconnect:cy"));
  // Closed for good: its record is gone, so it cannot be resumed any more.
  const late = await open(second.url, "room", [key], { init: { connId: ready.connId, connToken: ready.connToken } });
  assert.equal((await late.ready).error.code, "resume_refused");
});

test("a restored connection that is not resumed within reconnectWindowMs closes for good", async (t) => {
  const dataDir = tempDir(t);
  const first = await start(t, dataDir);
  const key = "window";
  const gone = await open(first.url, "shortWindow", [key], { name: "gone" });
  const goneReady = await gone.ready;
  const stays = await open(first.url, "shortWindow", [key], { name: "stays" });
  const staysReady = await stays.ready;
  await first.stop();
  const second = await start(t, dataDir);
  const back = await open(second.url, "shortWindow", [key], { init: { connId: staysReady.connId, connToken: staysReady.connToken } });
  assert.equal((await back.ready).t, "ready");
  assert.deepEqual((await back.call("conns")).output.map((c) => c.name), ["gone", "stays"], "both are in c.conns at first");
  await until("the window passes for the other one", () => seenBy(key).includes("disconnect:gone"));
  assert.deepEqual((await back.call("conns")).output.map((c) => c.name), ["stays"]);
  const late = await open(second.url, "shortWindow", [key], { init: { connId: goneReady.connId, connToken: goneReady.connToken } });
  assert.equal((await late.ready).error.code, "resume_refused");
  back.close();
});

test("an actor without the option behaves as before: open connections keep it awake, no token", async (t) => {
  const { url } = await start(t);
  const key = "plain";
  const ws = await open(url, "plain", [key], { name: "pat" });
  const ready = await ws.ready;
  assert.equal(ready.connToken, undefined);
  await ws.call("bump");
  // Four sleep timeouts pass with the socket open and idle: still awake.
  await new Promise((resolve) => setTimeout(resolve, 800));
  assert.ok(!seenBy(key).includes("sleep"), "an open connection keeps it awake");
  assert.equal(await gauge(url, "keel_connections_hibernated"), 0);
  // Resuming on a type without the option is refused.
  const resume = await open(url, "plain", [key], { init: { connId: ready.connId, connToken: "a".repeat(32) } });
  assert.equal((await resume.ready).error.code, "resume_refused");
  ws.close();
  await until("it sleeps once the connection is gone", () => seenBy(key).includes("sleep"));
});

test("a call that arrives while the actor is going to sleep is neither lost nor run twice", async (t) => {
  const { url } = await start(t);
  const key = "race";
  const ws = await open(url, "room", [key], { name: "race" });
  await ws.ready;
  assert.equal((await ws.call("bump")).output.count, 1);
  // Hold the actor inside its onSleep, then call: the call reaches the next instance.
  let entered;
  const inSleep = new Promise((resolve) => (entered = resolve));
  let release;
  sleepGates.set(key, { entered, release: new Promise((resolve) => (release = resolve)) });
  await inSleep;
  const reply = ws.call("bump");
  const second = ws.call("bump");
  release();
  assert.deepEqual([(await reply).output.count, (await second).output.count], [2, 3]);
  assert.equal((await ws.call("bump")).output.total, 4, "each call ran exactly once");
  // The held sleep, then one wake that found the state of the first call only.
  assert.deepEqual(seenBy(key).filter((e) => e === "sleep" || e.startsWith("wake")).slice(0, 3), ["wake:", "sleep", `wake:${ws.frames[0].connId}=race:1`]);
  ws.close();
});

test("the TS client keeps its connection through sleep and resumes it after a restart on the same port", async (t) => {
  const dataDir = tempDir(t);
  const first = await start(t, dataDir);
  const port = Number(new URL(first.url).port);
  const key = "client";
  const client = createClient(first.url);
  const conn = client.room.getOrCreate([key]).connect({ name: "eve" }, { reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });
  await conn.ready;
  const id = conn.connId;
  assert.equal((await conn.bump()).count, 1);
  await until("the actor sleeps", () => seenBy(key).includes("sleep"));
  assert.equal((await conn.bump()).count, 2, "a call wakes it");
  await first.stop();
  await until("the client notices", () => conn.status === "reconnecting");
  const registry = setup({ use: { room, plain, shortWindow }, port, dataDir, disableSignalHandlers: true });
  const serving = registry.start();
  t.after(async () => {
    conn.dispose();
    await registry.shutdown();
    await serving;
  });
  await registry.listening();
  await until("the client reconnects", () => conn.status === "open");
  assert.equal(conn.connId, id, "the same connection");
  const bumped = await conn.bump();
  assert.deepEqual([bumped.count, bumped.connId], [3, id]);
});
