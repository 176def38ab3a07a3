// Actors calling actors in process with c.client(): typed calls with durable replies, the
// self-call and cycle errors at once, calls from onWake and schedules, and a failed caller.
import { test } from "node:test";
import assert from "node:assert/strict";
import { actor, setup, createClient } from "keel";
import { tempDir } from "./helpers.mjs";

/** Set by `ledger.onWake`'s call to `counter`, for the test that awaits it. */
let woke = deferred();
/** Set by `ledger.tick`, the scheduled action, with what its call returned. */
let ticked = deferred();

function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

const counter = actor({
  state: { count: 0 },
  actions: {
    increment: (c, n) => (c.state.count += n),
    count: (c) => c.state.count,
    // Calls back the actor whose call is waiting for this one: a cycle.
    callBack: (c, key) => c.client().relay.getOrCreate(key).count(),
  },
});

const relay = actor({
  state: { calls: 0, note: "" },
  actions: {
    bump: async (c, key, n) => {
      c.state.calls += 1;
      return await c.client().counter.getOrCreate(key).increment(n);
    },
    self: (c) => c.client().relay.getOrCreate(c.key).count(),
    count: (c) => c.state.calls,
    cycle: (c, key) => c.client().counter.getOrCreate(key).callBack(c.key),
    bumpThenFail: async (c, key) => {
      c.state.note = "failed call";
      const inner = await c.client().counter.getOrCreate(key).increment(10);
      throw new Error(`failed after the inner call returned ${inner}`);
    },
    note: (c) => c.state.note,
    byId: async (c, key) => {
      const id = await c.client().counter.getOrCreate(key).resolve();
      return await c.client().counter.getForId(id).count();
    },
  },
});

const ledger = actor({
  state: null,
  onWake: async (c) => woke.resolve(await c.client().counter.getOrCreate(["from-wake"]).increment(1)),
  actions: {
    later: (c) => c.schedule.after(0, "tick"),
    tick: async (c) => ticked.resolve(await c.client().counter.getOrCreate(["from-schedule"]).increment(5)),
  },
});

async function start(t, dataDir = tempDir(t)) {
  const registry = setup({ use: { counter, relay, ledger }, port: 0, dataDir, disableSignalHandlers: true, dev: true });
  const serving = registry.start();
  const { url } = await registry.listening();
  const stop = async () => {
    await registry.shutdown();
    await serving;
  };
  t.after(stop);
  return { registry, client: createClient(url), stop, dataDir };
}

test("an actor calls another in process and gets its durable reply", async (t) => {
  const first = await start(t);
  assert.equal(await first.client.relay.getOrCreate(["r"]).bump(["c"], 2), 2);
  assert.equal(await first.client.relay.getOrCreate(["r"]).bump(["c"], 3), 5);
  assert.equal(await first.client.relay.getOrCreate(["r"]).byId(["c"]), 5, "getForId and resolve work in process");
  await first.stop();
  const second = await start(t, first.dataDir);
  assert.equal(await second.client.counter.getOrCreate(["c"]).count(), 5, "the inner calls' effects were durable");
});

test("a call from an actor to itself fails at once with actor.call_cycle", async (t) => {
  const { client } = await start(t);
  await assert.rejects(client.relay.getOrCreate(["me"]).self(), { group: "actor", code: "call_cycle" });
  assert.equal(await client.relay.getOrCreate(["me"]).count(), 0, "the actor keeps serving");
});

test("a cycle A → B → A fails at once with actor.call_cycle", async (t) => {
  const { client } = await start(t);
  await assert.rejects(client.relay.getOrCreate(["a"]).cycle(["b"]), { group: "actor", code: "call_cycle" });
  assert.equal(await client.counter.getOrCreate(["b"]).count(), 0, "both actors keep serving");
});

test("a failed caller's inner call stays done and its reply does not leak", async (t) => {
  const { client } = await start(t);
  const failed = await client.relay
    .getOrCreate(["f"])
    .bumpThenFail(["inner"])
    .then(
      () => assert.fail("the call should fail"),
      (err) => err,
    );
  assert.equal(failed.group, "actor");
  assert.equal(failed.code, "internal_error");
  assert.match(failed.message, /failed after the inner call returned 10/);
  assert.equal(await client.relay.getOrCreate(["f"]).note(), "", "the caller's own changes are rolled back");
  assert.equal(await client.counter.getOrCreate(["inner"]).count(), 10, "the inner call is not undone");
});

test("calls from onWake and from a scheduled action work", async (t) => {
  woke = deferred();
  ticked = deferred();
  const { client } = await start(t);
  await client.ledger.getOrCreate(["l"]).later();
  assert.equal(await woke.promise, 1);
  assert.equal(await ticked.promise, 5);
});

test("connect() on an in-process handle is a structured error", async (t) => {
  const probe = actor({ state: null, actions: { tryConnect: (c) => c.client().counter.getOrCreate(["x"]).connect() } });
  const registry = setup({ use: { probe, counter }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, dev: true });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  await assert.rejects(createClient(url).probe.getOrCreate(["p"]).tryConnect(), { group: "actor", code: "internal_error", message: /connections are for clients outside/ });
});
