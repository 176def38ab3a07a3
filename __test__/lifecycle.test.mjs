// Actor life cycles from JS: hooks in order, vars, KV, value encoding, schedules and sleep.
import { test } from "node:test";
import assert from "node:assert/strict";
import { actor, setup, createClient } from "keel";
import { tempDir } from "./helpers.mjs";

/** Hook and action calls, in order, recorded by the test actors. */
const events = [];
let wakes = 0;

const lively = actor({
  createState: (c, input) => {
    events.push(`createState:${input?.tag}`);
    return { pings: 0 };
  },
  createVars: () => {
    events.push("createVars");
    return { wake: ++wakes };
  },
  onCreate: (c, input) => events.push(`onCreate:${input?.tag}`),
  onWake: () => events.push("onWake"),
  onSleep: () => events.push("onSleep"),
  onDestroy: () => events.push("onDestroy"),
  actions: {
    ping: (c) => {
      events.push("ping");
      c.state.pings += 1;
      return { pings: c.state.pings, wake: c.vars.wake };
    },
    nap: (c) => {
      events.push("nap");
      c.sleep();
    },
    destroyMe: (c) => {
      events.push("destroyMe");
      c.destroy();
    },
  },
});

const store = actor({
  state: { value: null },
  options: { sleepTimeoutMs: 150 },
  actions: {
    echo: (c, value) => value,
    keep: (c, value) => {
      c.state.value = value;
    },
    kept: (c) => c.state.value,
    put: async (c, key, value) => {
      await c.kv.put(key, value);
      return await c.kv.get(key);
    },
    get: (c, key) => c.kv.get(key),
    remove: (c, key) => c.kv.delete(key),
    list: (c, options) => c.kv.list(options),
    putThenFail: async (c, key) => {
      await c.kv.put(key, "never");
      c.state.value = "never";
      throw new Error("after a write");
    },
    returnFunction: () => () => 1,
    keepFunction: (c) => {
      c.state.value = { f() {} };
    },
    bigKey: (c) => c.kv.put("k".repeat(3000), 1),
    bigValue: (c) => c.kv.put("v", "x".repeat(200 * 1024)),
    nap: (c) => c.sleep(),
  },
});

const alarm = actor({
  state: { marks: [] },
  options: { sleepTimeoutMs: 150 },
  onWake: () => events.push("alarm:onWake"),
  onSleep: () => events.push("alarm:onSleep"),
  actions: {
    remind: (c, ms, label) => c.schedule.after(ms, "mark", label),
    remindAt: (c, at, label) => c.schedule.at(at, "mark", label),
    mark: (c, label) => {
      events.push(`alarm:mark:${label}`);
      c.state.marks.push(label);
    },
    marks: (c) => c.state.marks,
    cancel: (c, id) => c.schedule.cancel(id),
    pending: (c) => c.schedule.list(),
    scheduleAndList: async (c) => {
      const id = c.schedule.after(60_000, "mark", "later");
      return { id, listed: await c.schedule.list() };
    },
    badSchedule: (c) => c.schedule.after(10, "nope"),
  },
});

async function start(t, options = {}) {
  const registry = setup({ use: { lively, store, alarm }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, dev: true, ...options });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  return { registry, client: createClient(url) };
}

async function until(what, condition, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

test("hooks run in order across create, sleep, wake and destroy; vars are rebuilt per wake", async (t) => {
  events.length = 0;
  const { registry, client } = await start(t);
  const handle = client.lively.getOrCreate(["h"], { input: { tag: "first" } });
  const first = await handle.ping();
  await handle.nap();
  await until("the actor sleeps", () => registry.liveActors === 0);
  const second = await client.lively.getOrCreate(["h"], { input: { tag: "ignored" } }).ping();
  assert.deepEqual([first.pings, second.pings], [1, 2], "state survives sleep");
  assert.notEqual(first.wake, second.wake, "vars are rebuilt on wake");
  await handle.destroyMe();
  await until("the actor is destroyed", () => registry.liveActors === 0);
  assert.deepEqual(events, [
    "createState:first",
    "createVars",
    "onCreate:first",
    "onWake",
    "ping",
    "nap",
    "onSleep",
    "createVars",
    "onWake",
    "ping",
    "destroyMe",
    "onDestroy",
  ]);
  await assert.rejects(client.lively.get(["h"]).ping(), { group: "actor", code: "not_found" });
  const fresh = await client.lively.getOrCreate(["h"], { input: { tag: "again" } }).ping();
  assert.equal(fresh.pings, 1, "a getOrCreate after destroy makes a new actor");
});

test("KV: round trip, prefix list, delete, rollback on throw, and limits", async (t) => {
  const { client } = await start(t);
  const kv = client.store.getOrCreate(["kv"]);
  assert.equal(await kv.put("user/2", { name: "bob" }).then((v) => v.name), "bob");
  await kv.put("user/1", { name: "ada" });
  await kv.put("user/3", { name: "cy" });
  await kv.put("other", 1);
  await kv.put(new Uint8Array([1, 2]), "bytes key");
  assert.deepEqual(await kv.get("user/1"), { name: "ada" });
  assert.equal(await kv.get("missing"), undefined);
  assert.equal(await kv.get(new Uint8Array([1, 2])), "bytes key");
  const listed = await kv.list({ prefix: "user/" });
  assert.deepEqual(listed.map(([k]) => k), ["user/1", "user/2", "user/3"]);
  const reversed = await kv.list({ prefix: "user/", reverse: true, limit: 2 });
  assert.deepEqual(reversed.map(([k, v]) => [k, v.name]), [["user/3", "cy"], ["user/2", "bob"]]);
  await kv.remove("user/2");
  assert.deepEqual((await kv.list({ prefix: "user/" })).map(([k]) => k), ["user/1", "user/3"]);

  await assert.rejects(kv.putThenFail("ghost"), { code: "internal_error" });
  assert.equal(await kv.get("ghost"), undefined, "a throwing action's writes are dropped");
  assert.equal(await kv.kept(), null);

  await assert.rejects(kv.bigKey(), { group: "kv", code: "key_too_large" });
  await assert.rejects(kv.bigValue(), { group: "kv", code: "value_too_large" });

  // Survives sleep (read back from disk).
  await kv.nap();
  assert.deepEqual(await kv.get("user/3"), { name: "cy" });
});

const samples = {
  date: new Date("2024-02-29T12:34:56.789Z"),
  map: new Map([["a", 1], [2, { deep: [1, 2] }]]),
  set: new Set(["x", 3, null]),
  bytes: new Uint8Array([0, 1, 254, 255]),
  bigint: 12345678901234567890123456789n,
  negativeBigint: -42n,
  smallBigint: 7n,
  nested: { a: [1, { b: "two", c: [undefined, null, true] }], e: "" },
  numbers: [0, -0, 1.5, -3, 2 ** 53, Number.MAX_SAFE_INTEGER + 2, NaN, Infinity, -Infinity],
  text: "ünïcødé 🚀",
  missing: undefined,
};

test("values round-trip through args, results, state and KV", async (t) => {
  const { client } = await start(t);
  const handle = client.store.getOrCreate(["values"]);
  for (const [name, value] of Object.entries(samples)) {
    assert.deepEqual(await handle.echo(value), value, `echo ${name}`);
  }
  await handle.keep(samples);
  for (const [name, value] of Object.entries(samples)) await handle.put(name, value);
  await handle.nap(); // wake again from what is on disk
  assert.deepEqual(await handle.kept(), samples);
  for (const [name, value] of Object.entries(samples)) assert.deepEqual(await handle.get(name), value, `kv ${name}`);
  assert.ok((await handle.echo(samples.bytes)) instanceof Uint8Array);
  assert.equal(typeof (await handle.echo(7n)), "bigint");
});

test("unsupported values give a clear error and change nothing", async (t) => {
  const { client } = await start(t);
  const handle = client.store.getOrCreate(["bad"]);
  await handle.keep("before");
  await assert.rejects(handle.returnFunction(), (err) => {
    assert.equal(err.code, "internal_error");
    assert.match(err.message, /cannot encode a function/);
    return true;
  });
  await assert.rejects(handle.keepFunction(), /cannot encode a function at value\.f/);
  assert.equal(await handle.kept(), "before");
  await assert.rejects(handle.echo(Symbol("s")), { name: "UnsupportedValueError", message: /cannot encode a symbol at args\[0\]/ });
});

test("schedules fire on core's timer, wake a sleeping actor, and can be cancelled and listed", async (t) => {
  events.length = 0;
  const { registry, client } = await start(t);
  const handle = client.alarm.getOrCreate(["a"]);
  await handle.remind(600, "woken");
  const cancelled = await handle.remind(700, "cancelled");
  const cancelledDueBy = Date.now() + 700;
  await handle.cancel(cancelled);
  const pending = await handle.pending();
  assert.deepEqual(pending.map((p) => [p.action, p.args]), [["mark", ["woken"]]]);
  await until("the actor sleeps", () => registry.liveActors === 0);
  assert.ok(events.includes("alarm:onSleep"));
  await until("the schedule fires", () => events.includes("alarm:mark:woken"));
  const afterSleep = events.indexOf("alarm:onSleep");
  assert.ok(events.indexOf("alarm:onWake", afterSleep) > afterSleep, "the schedule woke the actor");
  // What is tested is that the cancelled schedule never fires, so let its time pass.
  await new Promise((resolve) => setTimeout(resolve, Math.max(0, cancelledDueBy - Date.now()) + 50));
  assert.deepEqual(await handle.marks(), ["woken"]);
  assert.deepEqual(await handle.pending(), []);

  const { id, listed } = await handle.scheduleAndList();
  assert.deepEqual(listed.map((s) => s.id), [id], "a schedule made in this action is listed at once");
  await assert.rejects(handle.badSchedule(), /cannot schedule unknown action "nope"/);
});
