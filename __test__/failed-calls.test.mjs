// "A failed call changes nothing" and the timeouts, attacked where they are easiest to break:
// a throw after a schedule, a cancellation or a broadcast; an output JSON cannot encode; an
// action that outlives its timeout and then writes; and hooks that never return.
import { test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import WebSocket from "ws";
import { actor, event, setup, createClient } from "keel";
import { post, startRegistry, tempDir } from "./helpers.mjs";

/** Calls the test actors made on their instances, in order. */
const seen = [];
/** Resolved by `late` once its code, run past the timeout, has tried every kind of effect. */
let lateDone;
/** Whether `stuck`'s `onWake` and `onConnect` never return. */
let hang = true;

const ledger = actor({
  state: { n: 0, marks: [] },
  onWake: () => seen.push("ledger:onWake"),
  actions: {
    count: (c) => c.state.n,
    bump: (c) => ++c.state.n,
    remind: (c, ms, label) => c.schedule.after(ms, "mark", label),
    remindThenFail: (c, ms, label) => {
      c.state.n += 100;
      c.schedule.after(ms, "mark", label);
      throw new Error("after a schedule");
    },
    cancelThenFail: (c, id) => {
      c.schedule.cancel(id);
      throw new Error("after a cancel");
    },
    mark: (c, label) => {
      c.state.marks.push(label);
    },
    marks: (c) => c.state.marks,
    pending: (c) => c.schedule.list().then((list) => list.map((s) => s.args[0])),
    say: (c, word) => c.broadcast("said", word),
    sayThenFail: (c, word) => {
      c.broadcast("said", word);
      c.state.n += 1;
      throw new Error("after a broadcast");
    },
    sayThenBigInt: (c, word) => {
      c.broadcast("said", word);
      c.state.n += 1;
      return 10n;
    },
    get: (c, key) => c.kv.get(key),
  },
});

const sluggish = actor({
  state: { n: 0 },
  options: { actionTimeoutMs: 300 },
  onWake: () => seen.push("sluggish:onWake"),
  actions: {
    count: (c) => c.state.n,
    bump: (c) => ++c.state.n,
    // Runs past its timeout, then tries to change state, KV, schedules and to broadcast.
    late: async (c) => {
      await sleep(700);
      const tried = [];
      c.state.n = 999;
      tried.push("state");
      for (const [what, effect] of [
        ["kv", () => c.kv.put("late", 1)],
        ["broadcast", () => c.broadcast("said", "late")],
        ["schedule", () => c.schedule.after(10, "bump")],
      ]) {
        try {
          await effect();
          tried.push(what);
        } catch (err) {
          tried.push(`${what} refused: ${err.code ?? err.message}`);
        }
      }
      lateDone.resolve(tried);
    },
    get: (c, key) => c.kv.get(key),
    pending: (c) => c.schedule.list(),
  },
});

const stuck = actor({
  createState: (c, input) => ({ tag: input?.tag ?? null }),
  onWake: () => (hang ? new Promise(() => {}) : undefined),
  onConnect: () => (hang ? new Promise(() => {}) : undefined),
  actions: {
    tag: (c) => c.state.tag,
  },
});

const gatekeeper = actor({
  state: {},
  events: { gated: event({ canSubscribe: () => new Promise(() => {}) }) },
  actions: {
    ping: () => "pong",
  },
});

async function start(t, { dataDir = tempDir(t), ...options } = {}) {
  const started = await startRegistry(t, setup, { use: { ledger, sluggish, stuck, gatekeeper }, dataDir, dev: true, ...options });
  return { ...started, client: createClient(started.url), dataDir };
}

function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

async function until(what, condition, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** A hand-driven JSON socket to actor `name` with `key`, subscribed to `subs`. */
async function rawSocket(url, name, key, subs) {
  const ws = new WebSocket(`${url.replace("http", "ws")}/v1/actors/${name}/connect`);
  const messages = [];
  const closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: String(reason) })));
  ws.on("message", (data) => messages.push(JSON.parse(String(data))));
  await new Promise((resolve, reject) => {
    ws.on("open", resolve);
    ws.on("error", reject);
  });
  ws.send(JSON.stringify({ t: "init", key, subs }));
  await until(`${name} socket is ready`, () => messages.some((m) => m.t === "ready" || m.t === "error"));
  return { ws, messages, closed };
}

test("a throw after a schedule or a cancellation keeps neither", async (t) => {
  const { client } = await start(t);
  const handle = client.ledger.getOrCreate(["schedules"]);
  // The schedule of a failed call would be due at once.
  await assert.rejects(handle.remindThenFail(0, "failed"), { group: "actor", code: "internal_error" });
  assert.deepEqual(await handle.pending(), [], "the failed call's schedule is not listed");
  const kept = await handle.remind(400, "kept");
  await assert.rejects(handle.cancelThenFail(kept), { code: "internal_error" });
  assert.deepEqual(await handle.pending(), ["kept"], "the failed cancellation left the schedule");
  await until("the kept schedule fires", async () => (await handle.marks()).length > 0);
  // Time for the failed call's schedule, had it been kept, to have fired long ago.
  await sleep(200);
  assert.deepEqual(await handle.marks(), ["kept"]);
  assert.equal(await handle.count(), 0, "the failed call's state change is discarded");
});

test("a failed call's broadcast never reaches a connection, over HTTP or over the connection", async (t) => {
  const { url, client } = await start(t);
  const handle = client.ledger.getOrCreate(["events"]);
  const heard = [];
  const conn = handle.connect();
  t.after(() => conn.dispose());
  conn.on("said", (word) => heard.push(word));
  await conn.ready;
  // Over the connection: events of a call come before its reply, so by the next reply any
  // leaked event would have arrived.
  await assert.rejects(conn.sayThenFail("thrown"), { code: "internal_error" });
  // Over HTTP with JSON: the output cannot be encoded, so the call fails and is discarded.
  const bigint = await post(url, "/v1/actors/ledger/actions/sayThenBigInt", { key: ["events"], args: ["unencodable"] });
  assert.equal(bigint.status, 500);
  assert.equal(bigint.body.code, "internal_error");
  await conn.say("kept");
  assert.deepEqual(heard, ["kept"]);
  assert.equal(await handle.count(), 0, "neither failed call's state change is kept");
});

test("an action past its timeout fails with 504, and nothing its late code does is kept", async (t) => {
  seen.length = 0;
  lateDone = deferred();
  const dataDir = tempDir(t);
  const first = await start(t, { dataDir });
  const handle = first.client.sluggish.getOrCreate(["late"]);
  assert.equal(await handle.bump(), 1);
  const socket = await rawSocket(first.url, "sluggish", ["late"], ["said"]);
  const started = Date.now();
  const timedOut = await post(first.url, "/v1/actors/sluggish/actions/late", { key: ["late"], args: [] });
  assert.equal(timedOut.status, 504);
  assert.equal(timedOut.body.group, "actor");
  assert.equal(timedOut.body.code, "action_timed_out");
  assert.deepEqual(timedOut.body.metadata, { timeoutMs: 300 });
  assert.ok(Date.now() - started < 650, "the reply did not wait for the late code");
  const closed = await socket.closed;
  assert.equal(closed.code, 1011);
  assert.equal(closed.reason, "actor reset after a timeout");
  // A connection of the fresh instance, listening while the late code runs.
  const listener = await rawSocket(first.url, "sluggish", ["late"], ["said"]);
  const tried = await lateDone.promise;
  assert.equal(tried.length, 4, `the late code ran to its end: ${tried.join(", ")}`);
  await sleep(200);
  assert.equal(await handle.count(), 1, "the late state change is not seen");
  assert.equal(await handle.get("late"), undefined, "the late KV write is not kept");
  assert.deepEqual(await handle.pending(), [], "the late schedule is not kept");
  assert.deepEqual(listener.messages.filter((m) => m.t === "event"), [], "the late broadcast is not delivered");
  assert.deepEqual(seen, ["sluggish:onWake", "sluggish:onWake"], "a fresh instance started from committed state");
  assert.equal(await handle.bump(), 2, "the fresh instance serves on from the committed state");
  listener.ws.close();
  // And after a restart, from disk.
  await first.stop();
  const second = await start(t, { dataDir });
  const again = second.client.sluggish.getOrCreate(["late"]);
  assert.equal(await again.count(), 2);
  assert.equal(await again.get("late"), undefined);
  assert.deepEqual(await again.pending(), []);
});

test("a start that never returns fails with hook_timed_out, and a new actor's failed start leaves no actor", async (t) => {
  hang = true;
  const { url, client } = await start(t, { hookTimeoutMs: 300 });
  const failed = await post(url, "/v1/actors/stuck/actions/tag", { key: ["s"], input: { tag: "first" }, args: [] });
  assert.equal(failed.status, 504);
  assert.equal(failed.body.code, "hook_timed_out");
  assert.deepEqual(failed.body.metadata, { hook: "start", timeoutMs: 300 });
  await assert.rejects(client.stuck.get(["s"]).tag(), { group: "actor", code: "not_found" });
  hang = false;
  assert.equal(await client.stuck.getOrCreate(["s"], { input: { tag: "second" } }).tag(), "second", "the next request creates it afresh, with its input");
  // The connect hooks are bounded too: a connection whose onConnect never returns is refused.
  hang = true;
  const socket = await rawSocket(url, "stuck", ["s"], []);
  const error = socket.messages.find((m) => m.t === "error");
  assert.ok(error, `an error message before the close: ${JSON.stringify(socket.messages)}`);
  assert.equal(error.error.code, "hook_timed_out");
  assert.deepEqual(error.error.metadata, { hook: "connect", timeoutMs: 300 });
  assert.equal((await socket.closed).code, 1008);
  hang = false;
  assert.equal(await client.stuck.get(["s"]).tag(), "second", "the actor serves on");
});

test("a canSubscribe that never returns refuses the subscription with hook_timed_out, and the connection serves on", async (t) => {
  const { client } = await start(t, { hookTimeoutMs: 300 });
  const conn = client.gatekeeper.getOrCreate(["g"]).connect();
  t.after(() => conn.dispose());
  const errors = [];
  conn.onError((err) => errors.push(err));
  await conn.ready;
  conn.on("gated", () => assert.fail("a refused subscription delivered an event"));
  await until("the subscription is refused", () => errors.length > 0);
  assert.equal(errors[0].code, "hook_timed_out", String(errors[0]));
  assert.deepEqual(errors[0].metadata, { hook: "canSubscribe", timeoutMs: 300 });
  assert.equal(await conn.ping(), "pong", "the connection stays open and serves calls");
});
