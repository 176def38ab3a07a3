// Connections, events, raw handlers and the reconnecting client, against a real server.
import { test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { join } from "node:path";
import WebSocket from "ws";
import { setup, createClient } from "keel";
import { room } from "./fixtures/chat.mjs";
import { fixtures, startServer, tempDir } from "./helpers.mjs";

async function start(t, options = {}) {
  const registry = setup({ use: { room }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, ...options });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  return { registry, url, client: createClient(url) };
}

async function until(what, condition, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function join_(client, key, name, log) {
  const conn = client.room.getOrCreate(key).connect({ name });
  for (const event of ["joined", "message", "left"]) conn.on(event, (data) => log.push(`${event}:${data}`));
  return conn;
}

test("a chat room with three clients sees joined, message and left in order", async (t) => {
  const { client } = await start(t);
  const logs = { ada: [], bob: [], cy: [] };
  const ada = join_(client, ["lobby"], "ada", logs.ada);
  await ada.ready;
  const bob = join_(client, ["lobby"], "bob", logs.bob);
  await bob.ready;
  const cy = join_(client, ["lobby"], "cy", logs.cy);
  await cy.ready;
  assert.equal(await ada.send("hello"), 1);
  assert.equal(await bob.send("hi ada"), 2);
  assert.equal(await cy.whoami(), "cy", "c.conn is the calling connection");
  await cy.whisper("ada", "psst");
  cy.dispose();
  await until("ada sees cy leave", () => logs.ada.includes("left:cy"));
  bob.dispose();
  await until("ada sees bob leave", () => logs.ada.includes("left:bob"));
  assert.deepEqual(logs.ada, ["joined:ada", "joined:bob", "joined:cy", "message:hello", "message:hi ada", "message:(whisper) psst", "left:cy", "left:bob"]);
  assert.deepEqual(logs.bob, ["joined:bob", "joined:cy", "message:hello", "message:hi ada", "left:cy"]);
  assert.deepEqual(logs.cy, ["joined:cy", "message:hello", "message:hi ada"]);
  assert.deepEqual(await client.room.getOrCreate(["lobby"]).messages(), ["hello", "hi ada"]);
  ada.dispose();
});

test("onBeforeConnect's refusal reaches the client as a structured error", async (t) => {
  const { client } = await start(t);
  const conn = client.room.getOrCreate(["lobby"]).connect({});
  const errors = [];
  conn.onError((err) => errors.push(err));
  await assert.rejects(conn.ready, { group: "user", code: "bad_name", message: "name required" });
  assert.equal(conn.status, "closed");
  assert.deepEqual(errors.map((e) => e.code), ["bad_name"]);
  await assert.rejects(conn.send("x"), { group: "client", code: "closed" });
});

test("a server-side disconnect closes the connection for good", async (t) => {
  const { client } = await start(t);
  const ada = join_(client, ["k"], "ada", []);
  await ada.ready;
  const statuses = [];
  ada.onStatusChange((s) => statuses.push(s));
  await client.room.getOrCreate(["k"]).kick("ada");
  await until("ada is closed", () => ada.status === "closed");
  assert.deepEqual(statuses, ["closed"]);
});

/** A TCP proxy whose connections the test can cut, to drop sockets without a close frame. */
async function proxyTo(t, port) {
  const sockets = new Set();
  const server = net.createServer((inbound) => {
    const outbound = net.connect(port, "127.0.0.1");
    sockets.add(inbound);
    sockets.add(outbound);
    inbound.pipe(outbound).pipe(inbound);
    const drop = () => {
      inbound.destroy();
      outbound.destroy();
    };
    inbound.on("error", drop);
    outbound.on("error", drop);
    inbound.on("close", drop);
    outbound.on("close", drop);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => server.close());
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut() {
      for (const socket of sockets) socket.destroy();
      sockets.clear();
    },
  };
}

test("the client reconnects after a dropped socket and resumes events", async (t) => {
  const { url, client } = await start(t);
  const proxy = await proxyTo(t, Number(new URL(url).port));
  const log = [];
  const ada = join_(createClient(proxy.url), ["r"], "ada", log);
  const statuses = [];
  ada.onStatusChange((s) => statuses.push(s));
  await ada.ready;
  await client.room.getOrCreate(["r"]).send("before");
  await until("the first message", () => log.includes("message:before"));
  proxy.cut();
  await until("ada reconnects", () => statuses.includes("reconnecting") && ada.status === "open");
  await client.room.getOrCreate(["r"]).send("after");
  await until("events resume", () => log.includes("message:after"));
  assert.equal(await ada.whoami(), "ada", "actions work on the new socket");
  ada.dispose();
});

async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

test("the client reconnects after a server restart and resumes events", async (t) => {
  const dataDir = tempDir(t);
  const port = await freePort();
  const script = join(fixtures, "chat.mjs");
  const first = await startServer(t, { dataDir, script, env: { KEEL_PORT: String(port) } });
  const url = `http://127.0.0.1:${port}`;
  const log = [];
  const ada = join_(createClient(url), ["restart"], "ada", log);
  await ada.ready;
  await ada.send("one");
  first.kill("SIGTERM");
  await first.exited;
  await until("ada notices", () => ada.status === "reconnecting");
  const second = await startServer(t, { dataDir, script, env: { KEEL_PORT: String(port) } });
  await until("ada reconnects", () => ada.status === "open", 15_000);
  await createClient(url).room.getOrCreate(["restart"]).send("two");
  await until("events resume", () => log.includes("message:two"));
  assert.deepEqual(await ada.messages(), ["one", "two"]);
  ada.dispose();
  second.kill("SIGTERM");
  await second.exited;
});

test("raw onRequest and onWebSocket echo", async (t) => {
  const { url } = await start(t);
  // The key ["a", "b\\c"] in its canonical form: segments joined by "/", a backslash escaped.
  const response = await fetch(`${url}/v1/actors/room/raw/${encodeURIComponent("a/b\\\\c")}/some/path?x=1`, { method: "PUT", body: "payload" });
  assert.equal(response.status, 200);
  assert.deepEqual(await response.json(), { method: "PUT", path: "/some/path", query: "?x=1", body: "payload", key: ["a", "b\\c"] });

  const ws = new WebSocket(`${url.replace("http", "ws")}/v1/actors/room/raw/lobby/socket`);
  await new Promise((resolve, reject) => {
    ws.on("open", resolve);
    ws.on("error", reject);
  });
  const replies = [];
  ws.on("message", (data, isBinary) => replies.push(isBinary ? [...data] : String(data)));
  ws.send("ping");
  ws.send(Buffer.from([1, 2, 3]));
  await until("both echoes", () => replies.length === 2);
  assert.deepEqual(replies, ["echo:ping", [1, 2, 3]]);
  ws.close();
});

/** A hand-driven socket speaking keel's JSON protocol. */
async function rawClient(url, name) {
  const ws = new WebSocket(`${url.replace("http", "ws")}/v1/actors/room/connect`);
  const messages = [];
  const closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: String(reason) })));
  ws.on("message", (data) => messages.push(JSON.parse(String(data))));
  await new Promise((resolve) => ws.on("open", resolve));
  ws.send(JSON.stringify({ t: "init", key: ["limits"], params: { name }, subs: ["message", "blob"] }));
  await until(`${name} is ready`, () => messages.some((m) => m.t === "ready"));
  return { ws, messages, closed };
}

test("oversize and malformed messages close only the offending socket", async (t) => {
  const { url, client } = await start(t);
  const healthy = join_(client, ["limits"], "healthy", []);
  await healthy.ready;

  const big = await rawClient(url, "big");
  big.ws.send(JSON.stringify({ t: "call", id: 1, action: "send", args: ["x".repeat(70 * 1024)] }));
  assert.equal((await big.closed).code, 1009);

  const garbled = await rawClient(url, "garbled");
  garbled.ws.send("{not json");
  const { code } = await garbled.closed;
  assert.equal(code, 1008);
  assert.equal(garbled.messages.at(-1).error.code, "malformed");

  const unknown = await rawClient(url, "unknown");
  unknown.ws.send(JSON.stringify({ t: "call", id: 7, action: "nope", args: [] }));
  await until("a reply", () => unknown.messages.some((m) => m.t === "reply"));
  assert.deepEqual(unknown.messages.find((m) => m.t === "reply"), {
    t: "reply",
    id: 7,
    error: { group: "actor", code: "action_not_found", message: 'actor type "room" has no action named "nope"', metadata: null },
  });
  assert.equal(await healthy.send("still fine"), 1);
  unknown.ws.close();
  healthy.dispose();
});

test("a slow consumer is closed without slowing other clients", async (t) => {
  const { url, client } = await start(t);
  const slow = await rawClient(url, "slow");
  // Stop reading: the server's queue for this socket fills up.
  slow.ws._socket.pause();
  let received = 0;
  const fast = client.room.getOrCreate(["limits"]).connect({ name: "fast" });
  // Disposed even when an assertion fails, so a reconnecting client cannot hold the file open.
  t.after(() => fast.dispose());
  fast.on("blob", () => received++);
  // The slow consumer's close runs its onDisconnect at once, which tells the others.
  let slowLeft = false;
  fast.on("left", (name) => {
    if (name !== "slow") return;
    slowLeft = true;
    // Read again at once: a client that reads nothing gets a second to take its close frame
    // (docs/protocol.md), after which the socket is dropped and it sees 1006.
    slow.ws._socket.resume();
  });
  await fast.ready;
  const handle = client.room.getOrCreate(["limits"]);
  // 400 events of 64 KiB: far past the 4 MiB per-connection bound and the socket buffers.
  for (let round = 0; round < 20; round++) await handle.blobs(20, 64 * 1024);
  // The bound is only there so a lost event fails the test instead of hanging it; 25 MiB
  // through a debug build on a loaded 2-core machine can take a while.
  await until("the fast client gets every event", () => received === 400, 120_000);
  assert.ok(slowLeft, "the slow consumer was closed while the fast client was served");
  const { code, reason } = await slow.closed;
  assert.deepEqual({ code, reason }, { code: 1013, reason: "slow consumer: outgoing buffer full" });
});

test("a broadcast is never seen before the state that produced it is durable", async (t) => {
  const dataDir = tempDir(t);
  const script = join(fixtures, "chat.mjs");
  const server = await startServer(t, { dataDir, script });
  const listener = createClient(server.url).room.getOrCreate(["durable"]).connect({ name: "listener" });
  await listener.ready;
  let seen;
  const killed = new Promise((resolve) =>
    listener.on("message", (text) => {
      if (seen !== undefined) return;
      seen = text;
      // The moment the event arrives, the server dies without any chance to flush.
      server.kill("SIGKILL");
      resolve();
    }),
  );
  const sender = createClient(server.url).room.getOrCreate(["durable"]);
  for (let i = 0; i < 50 && seen === undefined; i++) sender.send(`m${i}`).catch(() => {});
  await killed;
  listener.dispose();
  await server.exited;
  const restarted = await startServer(t, { dataDir, script });
  const messages = await createClient(restarted.url).room.getOrCreate(["durable"]).messages();
  assert.ok(messages.includes(seen), `${seen} was broadcast but is not in ${JSON.stringify(messages)}`);
  restarted.kill("SIGTERM");
  await restarted.exited;
});

test("a connection holds its actor awake; it sleeps once the last one leaves", async (t) => {
  const { registry, client } = await start(t, { sleepTimeoutMs: 150 });
  const conn = client.room.getOrCreate(["awake"]).connect({ name: "ada" });
  await conn.ready;
  // What is tested: idle past the sleep timeout (150 ms), twice over, with a connection open.
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(registry.liveActors, 1, "still awake with a connection open past the sleep timeout");
  conn.dispose();
  await until("the actor sleeps", () => registry.liveActors === 0);
});

test("calls over one connection run in the order they were sent", async (t) => {
  const { client } = await start(t);
  const conn = client.room.getOrCreate(["order"]).connect({ name: "ada" });
  await conn.ready;
  const results = await Promise.all(Array.from({ length: 300 }, (_, i) => conn.append(i)));
  assert.deepEqual(results, Array.from({ length: 300 }, (_, i) => i + 1));
  assert.deepEqual(await conn.messages(), Array.from({ length: 300 }, (_, i) => i));
  conn.dispose();
});

test("ready comes before the events of a connection's own connect", async (t) => {
  const { url } = await start(t);
  const ws = new WebSocket(`${url.replace("http", "ws")}/v1/actors/room/connect`);
  const messages = [];
  ws.on("message", (data) => messages.push(JSON.parse(String(data))));
  await new Promise((resolve) => ws.on("open", resolve));
  ws.send(JSON.stringify({ t: "init", key: ["first"], params: { name: "ada" }, subs: ["joined"] }));
  await until("ready and both events", () => messages.length >= 3);
  assert.deepEqual(messages.map((m) => m.t === "event" ? `${m.t}:${m.event}` : m.t), ["ready", "event:joined", "event:welcome"]);
  ws.close();
});

test("destroy closes connections normally after the reply, and sleep does not re-wake", async (t) => {
  const { registry, client } = await start(t);
  const conn = client.room.getOrCreate(["doomed"]).connect({ name: "ada" }, { reconnect: { initialDelayMs: 10 } });
  await conn.ready;
  assert.equal(await conn.destroyRoom(), "bye", "the reply arrives before the close");
  await until("closed for good", () => conn.status === "closed");
  await until("the actor is gone", () => registry.liveActors === 0);
  // What is tested is that nothing happens: give a stray reconnect (10 ms delay) time to try.
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.equal(registry.liveActors, 0, "nothing woke it again");

  const napper = client.room.getOrCreate(["napper"]).connect({ name: "bob" }, { reconnect: false });
  await napper.ready;
  await napper.nap();
  await until("the actor sleeps", () => registry.liveActors === 0);
  // What is tested is that nothing happens: the closing socket must not wake the actor.
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.equal(registry.liveActors, 0, "the closing socket did not wake it");
});

test("an event listener added while connecting is subscribed", async (t) => {
  const { client } = await start(t);
  const conn = client.room.getOrCreate(["late"]).connect({ name: "ada" });
  // Let the socket open and init go out, but add the listener before `ready` arrives.
  await new Promise((resolve) => setTimeout(resolve, 0));
  const seen = [];
  conn.on("message", (m) => seen.push(m));
  await conn.ready;
  await client.room.getOrCreate(["late"]).send("hi");
  await until("the late listener hears it", () => seen.includes("hi"));
  conn.dispose();
});
