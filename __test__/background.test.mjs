// onStateChange (sees the new state, broadcasts, may not change it) and c.abortSignal (fires
// when the actor stops and when a call times out), against the real addon.
import { test } from "node:test";
import assert from "node:assert/strict";
import { actor, setup, createClient } from "keel";
import { tempDir } from "./helpers.mjs";

/** What `onStateChange` was handed, in order. */
const seen = [];

/** A promise with its resolver, so a test awaits what an actor's code reports. */
function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

const watched = actor({
  state: { count: 0, mutate: "" },
  onStateChange: (c, state) => {
    seen.push(state.count);
    c.broadcast("changed", state.count);
    if (state.mutate === "assign") c.state = { count: -1, mutate: "" };
    if (state.mutate === "deep") state.count += 100;
  },
  actions: {
    add: (c, n) => {
      c.state.count += n;
      return c.state.count;
    },
    read: (c) => c.state.count,
    mutateIn: (c, how) => {
      c.state.count += 1;
      c.state.mutate = how;
      return c.state.count;
    },
  },
});

/** Set by each abort test before it starts its actor's work. */
let aborts = { background: deferred(), duringSleep: deferred(), timedOut: deferred() };

const stoppable = actor({
  state: null,
  options: { actionTimeoutMs: 300 },
  onSleep: (c) => aborts.duringSleep.resolve(c.aborted),
  actions: {
    // Starts work that outlives the call and stops when the actor does.
    startLoop: (c) => {
      const before = c.aborted;
      c.abortSignal.addEventListener("abort", () => aborts.background.resolve(c.abortSignal.reason));
      return before;
    },
    nap: (c) => c.sleep(),
    // Waits for nothing but its own abort, which the call's timeout must fire.
    hang: (c) =>
      new Promise((resolve) => {
        c.abortSignal.addEventListener("abort", () => {
          aborts.timedOut.resolve(c.abortSignal.reason);
          resolve("late");
        });
      }),
    alive: () => "yes",
  },
});

/** What `lateLooker` saw of its abort signal in onSleep, the first time it looked. */
let lateLook = deferred();

const lateLooker = actor({
  state: null,
  onSleep: (c) => {
    const signal = c.abortSignal;
    lateLook.resolve({ aborted: signal.aborted, reason: signal.reason, same: signal === c.abortSignal, flag: c.aborted });
  },
  actions: {
    // The context's methods are made for its instance (on first use): they work taken off it.
    nap: (c) => {
      const { sleep, broadcast, log } = c;
      broadcast("napping", 1);
      log.info("going to sleep");
      sleep();
      return c.aborted;
    },
  },
});

/** What the waitUntil actor's background work and hooks did, in order. */
const order = [];
let waits = { slept: deferred() };

const waiting = actor({
  state: { background: "" },
  onSleep: (c) => {
    order.push(`onSleep:${c.state.background}`);
    waits.slept.resolve();
  },
  actions: {
    // Background work that goes on after the actor begins to stop (its abort signal fires
    // first), then naps: without the wait, onSleep would run before the work ends.
    later: (c) => {
      c.waitUntil(
        (async () => {
          await new Promise((resolve) => c.abortSignal.addEventListener("abort", resolve));
          await new Promise((resolve) => setImmediate(resolve));
          c.state.background = "done";
          await c.kv.put("background", "kv too");
          order.push("background done");
        })(),
      );
      c.sleep();
    },
    // Background work that never finishes.
    forever: (c) => {
      c.waitUntil(new Promise(() => {}));
      c.sleep();
    },
    background: (c) => c.state.background,
    kv: (c, key) => c.kv.get(key),
    // A KV write between calls: no call carries it.
    writeBetweenCalls: (c) => {
      setImmediate(() => {
        void c.kv.put("between", 1).then(() => waits.written.resolve());
      });
    },
    notAPromise: (c) => c.waitUntil(5),
  },
});

/** The keep-awake test's hold and which of its two actors went to sleep. */
let awake = { release: deferred(), heldSlept: deferred(), idleSlept: deferred(), heldAsleep: false };

const held = actor({
  state: null,
  options: { sleepTimeoutMs: 100 },
  onSleep: () => {
    awake.heldAsleep = true;
    awake.heldSlept.resolve();
  },
  actions: {
    hold: (c) => {
      const promise = awake.release.promise;
      return c.keepAwake(promise) === promise;
    },
  },
});

const idle = actor({
  state: null,
  options: { sleepTimeoutMs: 100 },
  onSleep: () => awake.idleSlept.resolve(),
  actions: { ping: () => "pong" },
});

async function start(t, options = {}) {
  const registry = setup({ use: { watched, stoppable, waiting, held, idle, lateLooker }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, dev: true, ...options });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  return { registry, client: createClient(url) };
}

test("onStateChange sees the new state before the reply, only when the state changed, and may broadcast", async (t) => {
  seen.length = 0;
  const { client } = await start(t);
  const handle = client.watched.getOrCreate(["s"]);
  const conn = handle.connect();
  await conn.ready;
  const broadcast = deferred();
  conn.on("changed", (count) => broadcast.resolve(count));
  assert.equal(await handle.add(2), 2);
  assert.deepEqual(seen, [2], "the hook ran with the changed state before the reply was sent");
  assert.equal(await broadcast.promise, 2, "the hook's broadcast reaches connections");
  assert.equal(await handle.read(), 2);
  assert.deepEqual(seen, [2], "a call that changes nothing does not run the hook");
  conn.dispose();
});

test("onStateChange changing the state fails the call with actor.state_change_mutation and rolls it back", async (t) => {
  seen.length = 0;
  const { client } = await start(t);
  const handle = client.watched.getOrCreate(["m"]);
  assert.equal(await handle.add(1), 1);
  // The hook broadcasts before it mutates: a listener would see a failed call's event leak.
  const conn = handle.connect();
  t.after(() => conn.dispose());
  const heard = [];
  conn.on("changed", (count) => heard.push(count));
  await conn.ready;
  await assert.rejects(conn.mutateIn("assign"), { group: "actor", code: "state_change_mutation", message: /assigned c\.state/ });
  await assert.rejects(conn.mutateIn("deep"), { group: "actor", code: "state_change_mutation", message: /changed a value inside c\.state/ });
  assert.equal(await handle.read(), 1, "the failed calls' changes are rolled back");
  // Over the connection, a call's events arrive before its reply.
  assert.equal(await conn.add(1), 2, "the actor keeps working");
  assert.deepEqual(heard, [2], "the failed calls' broadcasts never left");
});

test("c.abortSignal fires when the actor sleeps, before onSleep runs", async (t) => {
  aborts = { background: deferred(), duringSleep: deferred(), timedOut: deferred() };
  const { client } = await start(t);
  const handle = client.stoppable.getOrCreate(["sleep"]);
  assert.equal(await handle.startLoop(), false, "not aborted while the actor runs");
  await handle.nap();
  const reason = await aborts.background.promise;
  assert.equal(reason.group, "actor");
  assert.equal(reason.code, "stopped");
  assert.equal(await aborts.duringSleep.promise, true, "onSleep sees c.aborted");
  assert.equal(await handle.startLoop(), false, "the next wake has a fresh signal");
});

test("c.abortSignal first looked at while the actor stops is already aborted, and c's methods work taken off it", async (t) => {
  lateLook = deferred();
  const { client } = await start(t);
  const handle = client.lateLooker.getOrCreate(["late"]);
  assert.equal(await handle.nap(), false, "not aborted while the call runs");
  const seen = await lateLook.promise;
  assert.equal(seen.aborted, true, "the signal is made aborted");
  assert.equal(seen.reason.code, "stopped");
  assert.equal(seen.same, true, "one signal per instance");
  assert.equal(seen.flag, true);
});

test("c.abortSignal fires when the call's timeout expires", async (t) => {
  aborts = { background: deferred(), duringSleep: deferred(), timedOut: deferred() };
  const { client } = await start(t);
  const handle = client.stoppable.getOrCreate(["timeout"]);
  await assert.rejects(handle.hang(), { group: "actor", code: "action_timed_out" });
  const reason = await aborts.timedOut.promise;
  assert.equal(reason.code, "action_timed_out");
  assert.equal(await handle.alive(), "yes", "a fresh instance serves the next call");
});

test("c.waitUntil work finishes before the actor sleeps, and what it changed is saved", async (t) => {
  order.length = 0;
  waits = { slept: deferred() };
  const { client } = await start(t);
  const handle = client.waiting.getOrCreate(["w"]);
  await handle.later();
  await waits.slept.promise;
  assert.deepEqual(order, ["background done", "onSleep:done"]);
  assert.equal(await handle.background(), "done", "the background change was committed with onSleep");
  assert.equal(await handle.kv("background"), "kv too", "and so was its KV write");
  await assert.rejects(handle.notAPromise(), { code: "internal_error", message: /c\.waitUntil takes a promise/ });
});

test("c.waitUntil is bounded by waitUntilGraceMs", async (t) => {
  order.length = 0;
  waits = { slept: deferred() };
  const { client } = await start(t, { waitUntilGraceMs: 50 });
  await client.waiting.getOrCreate(["forever"]).forever();
  await waits.slept.promise;
  assert.deepEqual(order, ["onSleep:"], "the actor slept without the work that never finished");
});

test("a KV write made between calls is dropped, not committed by the next call", async (t) => {
  waits = { slept: deferred(), written: deferred() };
  const { client } = await start(t);
  const handle = client.waiting.getOrCreate(["between"]);
  await handle.writeBetweenCalls();
  await waits.written.promise;
  assert.equal(await handle.kv("between"), undefined);
});

test("c.keepAwake blocks idle sleep until its promise settles, and returns the same promise", async (t) => {
  awake = { release: deferred(), heldSlept: deferred(), idleSlept: deferred(), heldAsleep: false };
  const { client } = await start(t);
  assert.equal(await client.held.getOrCreate(["h"]).hold(), true, "keepAwake returns its promise");
  // Same sleep timeout, started later: it goes to sleep after the held actor would have.
  await client.idle.getOrCreate(["i"]).ping();
  await awake.idleSlept.promise;
  assert.equal(awake.heldAsleep, false, "the held actor stays awake past its sleep timeout");
  awake.release.resolve();
  await awake.heldSlept.promise;
});
