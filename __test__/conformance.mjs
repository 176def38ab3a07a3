// The conformance core: test bodies that must pass the same way against keel's own server
// and against keel in engine mode behind a Rivet Engine's gateway. Each body takes a
// `target`: { mode: "embedded" | "engine", url, client } where `client` is keel's typed client
// for `url` (created without saying which kind of server it is). Run by
// conformance.test.mjs (embedded) and engine.test.mjs (engine).
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";

/** A key no other test uses, so one server serves every body. */
const fresh = (prefix) => `${prefix}-${randomUUID().slice(0, 8)}`;

/** Resolves with the next `count` payloads of `event` on `conn`. */
function collect(conn, event, count) {
  const seen = [];
  return new Promise((resolve) => {
    const off = conn.on(event, (data) => {
      seen.push(data);
      if (seen.length === count) {
        off();
        resolve(seen);
      }
    });
  });
}

/** Resolves once `conn`'s status becomes `status`. */
function statusOf(conn, status) {
  if (conn.status === status) return Promise.resolve();
  return new Promise((resolve) => {
    const off = conn.onStatusChange((now) => {
      if (now === status) {
        off();
        resolve();
      }
    });
  });
}

async function rejectsWith(promise, code) {
  await assert.rejects(promise, (err) => {
    assert.equal(`${err.group}.${err.code}`, code, err.message);
    return true;
  });
}

export const conformance = {
  async "actions answer in order, and errors are keel's structured errors"({ client }) {
    const counter = client.counter.getOrCreate(fresh("c"));
    const outputs = [];
    for (let i = 0; i < 5; i++) outputs.push(await counter.increment());
    assert.deepEqual(outputs, [1, 2, 3, 4, 5]);
    assert.equal(await counter.increment(10), 15);
    await rejectsWith(counter.refuse(), "user.forbidden");
    assert.equal(await counter.getCount(), 15, "a refused call changes nothing");
    await rejectsWith(counter.noSuchAction(), "actor.action_not_found");
    await rejectsWith(client.counter.get(fresh("missing")).getCount(), "actor.not_found");
  },

  async "create, resolve and getForId reach the same actor, with its input"({ client }) {
    const key = fresh("g");
    const created = await client.greeter.create(key, { input: { greeting: "hi" } });
    assert.equal(await created.greet("ada"), "hi, ada");
    const id = await client.greeter.getOrCreate(key).resolve();
    assert.equal(await created.resolve(), id);
    assert.equal(await client.greeter.getForId(id).greet("bob"), "hi, bob");
    assert.equal(await client.greeter.get(key).greet("cy"), "hi, cy");
    await rejectsWith(client.greeter.create(key), "actor.already_exists");
    await rejectsWith(client.greeter.create(key, { input: { greeting: "again" } }), "actor.already_exists");
    assert.equal(await client.greeter.getForId(id).greet("dee"), "hi, dee", "a refused create changes nothing");
    const counter = client.counter.getOrCreate(fresh("w"));
    const who = await counter.whoAmI();
    assert.equal(who.actorId, await counter.resolve());
    assert.equal(who.name, "counter");
  },

  async "connections: hooks, conn state, and events in order"({ client }) {
    const key = fresh("room");
    const ada = client.room.getOrCreate(key).connect({ name: "ada" });
    const welcome = collect(ada, "welcome", 1);
    await ada.ready;
    assert.deepEqual(await welcome, ["hello ada"]);
    assert.equal(await ada.whoami(), "ada", "conn state from createConnState");
    const joined = collect(ada, "joined", 1);
    const bob = client.room.getOrCreate(key).connect({ name: "bob" });
    await bob.ready;
    assert.deepEqual(await joined, ["bob"], "onConnect broadcast");
    const count = 30;
    const seen = collect(bob, "message", count);
    // Sent without waiting: replies and events keep the order of the calls.
    const replies = await Promise.all(Array.from({ length: count }, (_, i) => ada.send(`m${i}`)));
    assert.deepEqual(replies, Array.from({ length: count }, (_, i) => i + 1));
    assert.deepEqual(await seen, Array.from({ length: count }, (_, i) => `m${i}`));
    const left = collect(ada, "left", 1);
    bob.dispose();
    assert.deepEqual(await left, ["bob"], "onDisconnect ran");
    // The actor closes a connection on purpose: 1000, no reconnect.
    const carl = client.room.getOrCreate(key).connect({ name: "carl" });
    await carl.ready;
    await ada.kick("carl");
    await statusOf(carl, "closed");
    ada.dispose();
    // A refused connection rejects `ready` with the hook's error.
    const refused = client.room.getOrCreate(key).connect({});
    await rejectsWith(refused.ready, "user.bad_name");
    assert.equal(refused.status, "closed");
  },

  async "raw onRequest and onWebSocket"({ client }) {
    const key = fresh("raw");
    const room = client.room.getOrCreate(key);
    const response = await room.fetch("/hello/there?x=1", { method: "PUT", body: "payload" });
    assert.equal(response.status, 200);
    assert.deepEqual(await response.json(), { method: "PUT", path: "/hello/there", query: "?x=1", body: "payload", key: [key] });
    const ws = room.webSocket("/echo");
    ws.binaryType = "arraybuffer";
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error("the raw socket failed to open"));
    });
    const received = [];
    const three = new Promise((resolve) => {
      ws.onmessage = (event) => {
        received.push(typeof event.data === "string" ? event.data : Array.from(new Uint8Array(event.data)));
        if (received.length === 3) resolve();
      };
    });
    ws.send("a");
    ws.send(new Uint8Array([1, 2, 3]));
    ws.send("b");
    await three;
    assert.deepEqual(received, ["echo:a", [1, 2, 3], "echo:b"]);
    const closed = new Promise((resolve) => (ws.onclose = resolve));
    ws.close(4000, "done");
    await closed;
  },

  async "oversize and undecodable frames get the same close codes"({ client, url }) {
    const key = fresh("bad");
    const room = client.room.getOrCreate(key);
    await room.messages();
    const ws = room.webSocket("/echo");
    await new Promise((resolve) => (ws.onopen = resolve));
    const closed = new Promise((resolve) => (ws.onclose = (event) => resolve(event.code)));
    // Past the default maxWsMessageBytes (64 KiB).
    ws.send("x".repeat(70 * 1024));
    assert.equal(await closed, 1009);
    void url;
  },
  // Last: in engine runs here the first getOrCreate of a *new* key after a body that used
  // tunneled WebSockets sometimes got no start command from the engine within its 15 s route
  // timeout (`Timed out resolving actor query route`); not understood yet (docs/engine.md).
  async "an actor that sleeps closes its sockets with 1001; the client reconnects to the next activation, state kept"({ client }) {
    const key = fresh("nap");
    const conn = client.room.getOrCreate(key).connect({ name: "ada" });
    await conn.ready;
    assert.equal(await conn.send("before"), 1);
    const firstConn = conn.connId;
    const reconnecting = statusOf(conn, "reconnecting");
    await conn.nap();
    await reconnecting;
    await statusOf(conn, "open");
    assert.notEqual(conn.connId, firstConn, "a new connection");
    assert.deepEqual(await conn.messages(), ["before"], "the state survived the sleep");
    assert.equal(await conn.send("after"), 2);
    conn.dispose();
  },

};

/** Runs every body as a subtest of `t` against `target`. */
export async function runConformance(t, target) {
  for (const [name, body] of Object.entries(conformance)) {
    await t.test(name, () => body(target));
  }
}
