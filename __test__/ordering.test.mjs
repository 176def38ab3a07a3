// Ordering around an actor's end, against the real addon and a real server: a connection's
// frames leave in order, a destroyed actor's key is free as soon as the reply arrives, and a
// sleeping actor's raw sockets close inside the instance that owned them.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { actor, event, setup, createClient } from "keel";
import { tempDir } from "./helpers.mjs";

const counter = actor({
  state: { count: 0 },
  events: { counted: event() },
  actions: {
    bump: (c) => {
      c.state.count += 1;
      c.broadcast("counted", c.state.count);
      return c.state.count;
    },
    id: (c) => c.actorId,
    destroyMe: (c) => {
      c.destroy();
      return c.actorId;
    },
    nap: (c) => c.sleep(),
  },
});

/** What ran after a destroy, whose state is deleted with the actor. */
const destroyLog = [];

/** Records, in state, every wake and which instance ran its close listeners and onSleep. */
const socketed = actor({
  state: { history: [], wakes: 0 },
  createVars: () => ({ wake: 0 }),
  onWake: (c) => {
    c.state.wakes += 1;
    c.vars.wake = c.state.wakes;
    c.state.history.push(`wake${c.vars.wake}`);
  },
  onSleep: (c) => c.state.history.push(`sleep@${c.vars.wake}`),
  onDestroy: (c) => destroyLog.push(`destroy@${c.vars.wake}`),
  onWebSocket: (c, ws) => {
    ws.addEventListener("close", (e) => {
      c.state.history.push(`close@${c.vars.wake}:${e.code}`);
      destroyLog.push(`close@${c.vars.wake}:${e.code}`);
    });
    ws.send("open");
  },
  actions: {
    nap: (c) => c.sleep(),
    destroyMe: (c) => c.destroy(),
    history: (c) => c.state.history,
  },
});

/** Closes its raw socket from user code on request, and records what each close listener saw. */
const closer = actor({
  state: { closes: [] },
  onWebSocket: (c, ws) => {
    ws.addEventListener("message", (e) => {
      if (e.data === "close-me") ws.close(4001, "bye");
    });
    ws.addEventListener("close", (e) => c.state.closes.push(`${e.code}:${e.reason}`));
    ws.send("open");
  },
  actions: { closes: (c) => c.state.closes },
});

async function start(t, dataDir = tempDir(t)) {
  const registry = setup({ use: { counter, socketed, closer }, port: 0, dataDir, disableSignalHandlers: true });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  return { registry, serving, url, client: createClient(url) };
}

async function until(what, condition, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** A keel-protocol socket that records every frame and its close, in arrival order. */
async function protocolSocket(url, key) {
  const ws = new WebSocket(`${url.replace("http", "ws")}/v1/actors/counter/connect`);
  const frames = [];
  let onFrame = () => {};
  ws.on("message", (data) => {
    frames.push(JSON.parse(String(data)));
    onFrame();
  });
  ws.on("close", (code, reason) => {
    frames.push({ t: "close", code, reason: String(reason) });
    onFrame();
  });
  await new Promise((resolve, reject) => {
    ws.on("open", resolve);
    ws.on("error", reject);
  });
  ws.send(JSON.stringify({ t: "init", key, subs: ["counted"] }));
  /** Resolves once `count` frames have arrived. */
  const received = (count) =>
    new Promise((resolve) => {
      onFrame = () => frames.length >= count && resolve(frames.slice(0, count));
      onFrame();
    });
  return { ws, frames, received };
}

const brief = (f) => (f.t === "event" ? `event:${f.data}` : f.t === "reply" ? `reply:${f.id}` : f.t === "close" ? `close:${f.code}` : f.t);

test("a connection gets each call's event before its reply, replies in call order, and the close last", async (t) => {
  const { url } = await start(t);
  const { ws, received } = await protocolSocket(url, ["pipelined"]);
  const calls = 200;
  for (let id = 1; id <= calls; id++) ws.send(JSON.stringify({ t: "call", id, action: "bump" }));
  ws.send(JSON.stringify({ t: "call", id: calls + 1, action: "nap" }));
  const frames = await received(1 + 2 * calls + 2);
  const expected = ["ready"];
  for (let id = 1; id <= calls; id++) expected.push(`event:${id}`, `reply:${id}`);
  expected.push(`reply:${calls + 1}`, "close:1001");
  assert.deepEqual(frames.map(brief), expected);
});

test("a destroyed actor's key is free as soon as the destroying reply arrives", async (t) => {
  const { client } = await start(t);
  for (let i = 0; i < 150; i++) {
    const key = [`doomed-${i}`];
    assert.equal(await client.counter.getOrCreate(key).bump(), 1);
    const oldId = await client.counter.getOrCreate(key).destroyMe();
    // Each case runs first thing after the reply: a `get` waits for the dying actor, which
    // would hide the others' race.
    if (i % 3 === 0) {
      await assert.rejects(client.counter.get(key).id(), { group: "actor", code: "not_found" }, `#${i}: get`);
    } else if (i % 3 === 1) {
      const fresh = await client.counter.create(key);
      assert.notEqual(await fresh.id(), oldId, `#${i}: create makes a new actor`);
    } else {
      assert.equal(await client.counter.getOrCreate(key).bump(), 1, `#${i}: getOrCreate makes a new actor`);
    }
  }
});

/** Opens a raw socket to `socketed` and waits for its greeting; `closed` resolves with the code. */
async function rawSocket(url, key) {
  const ws = new WebSocket(`${url.replace("http", "ws")}/v1/actors/socketed/raw/${encodeURIComponent(key)}`);
  const closed = new Promise((resolve) => ws.on("close", (code) => resolve(code)));
  await new Promise((resolve, reject) => {
    ws.on("message", (data) => String(data) === "open" && resolve());
    ws.on("error", reject);
  });
  return { ws, closed };
}

test("c.sleep() runs a raw socket's close listener in the sleeping instance, and nothing wakes it", async (t) => {
  const { registry, url, client } = await start(t);
  const { closed } = await rawSocket(url, "napper");
  await client.socketed.getOrCreate(["napper"]).nap();
  assert.equal(await closed, 1001);
  await until("the actor sleeps", () => registry.liveActors === 0);
  assert.deepEqual(await client.socketed.getOrCreate(["napper"]).history(), ["wake1", "close@1:1001", "sleep@1", "wake2"]);
});

test("a shutdown runs a raw socket's close listener before onSleep", async (t) => {
  const dataDir = tempDir(t);
  const first = await start(t, dataDir);
  const { closed } = await rawSocket(first.url, "drained");
  await first.registry.shutdown();
  await first.serving;
  assert.equal(await closed, 1001);
  const second = await start(t, dataDir);
  assert.deepEqual(await second.client.socketed.getOrCreate(["drained"]).history(), ["wake1", "close@1:1001", "sleep@1", "wake2"]);
});

test("c.destroy() runs a raw socket's close listener before onDestroy", async (t) => {
  destroyLog.length = 0;
  const { registry, url, client } = await start(t);
  const { closed } = await rawSocket(url, "doomed");
  await client.socketed.getOrCreate(["doomed"]).destroyMe();
  assert.equal(await closed, 1000);
  await until("the actor is gone", () => registry.liveActors === 0);
  assert.deepEqual(destroyLog, ["close@1:1000", "destroy@1"]);
});

/** Opens a raw socket to `closer`; `closed` resolves with the client's close code and reason. */
async function closerSocket(url, key) {
  const ws = new WebSocket(`${url.replace("http", "ws")}/v1/actors/closer/raw/${encodeURIComponent(key)}`);
  const closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve(`${code}:${reason}`)));
  await new Promise((resolve, reject) => {
    ws.on("message", (data) => String(data) === "open" && resolve());
    ws.on("error", reject);
  });
  return { ws, closed };
}

test("ws.close(code, reason) from user code reaches both the close listener and the client", async (t) => {
  const { client, url } = await start(t);
  const { ws, closed } = await closerSocket(url, "self");
  ws.send("close-me");
  assert.equal(await closed, "4001:bye");
  const actorRef = client.closer.getOrCreate(["self"]);
  await until("the close listener ran", async () => (await actorRef.closes()).length === 1);
  assert.deepEqual(await actorRef.closes(), ["4001:bye"]);
});

test("the client's close frame reaches the close listener", async (t) => {
  const { client, url } = await start(t);
  const { ws, closed } = await closerSocket(url, "peer");
  ws.close(4002, "later");
  await closed;
  const actorRef = client.closer.getOrCreate(["peer"]);
  await until("the close listener ran", async () => (await actorRef.closes()).length === 1);
  assert.deepEqual(await actorRef.closes(), ["4002:later"]);
});
