// User code that throws hostile values: objects without a prototype, throwing getters and
// `toString`s, revoked proxies, symbols, a `UserError` whose code cannot be a string. Each
// must fail only its own call, as `actor.internal_error`, from every place user code runs;
// the process, other actors and an open connection on another actor carry on.
//
// The registry runs in this process, so a throw that took the process down would end this
// test file too.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { actor, createClient, setup, UserError } from "keel";
import { tempDir } from "./helpers.mjs";

/** Hostile values, made fresh for each throw. */
const HOSTILE = [
  ["an object without a prototype", () => Object.create(null)],
  [
    "an object whose toString and valueOf throw",
    () => ({
      toString() {
        throw new Error("no toString");
      },
      valueOf() {
        throw new Error("no valueOf");
      },
    }),
  ],
  [
    "an object whose Symbol.toPrimitive throws",
    () => ({
      [Symbol.toPrimitive]() {
        throw new Error("no primitive");
      },
    }),
  ],
  [
    "an Error whose message getter throws",
    () =>
      Object.defineProperty(new Error("hidden"), "message", {
        get() {
          throw new Error("no message");
        },
      }),
  ],
  ["an Error whose message is a number", () => Object.assign(new Error(), { message: 42 })],
  [
    "a revoked Proxy",
    () => {
      const { proxy, revoke } = Proxy.revocable({}, {});
      revoke();
      return proxy;
    },
  ],
  [
    "a revoked Proxy of an Error",
    () => {
      const { proxy, revoke } = Proxy.revocable(new Error("revoked"), {});
      revoke();
      return proxy;
    },
  ],
  [
    "a Proxy whose every trap throws",
    () =>
      new Proxy(
        {},
        {
          get() {
            throw new Error("get");
          },
          getPrototypeOf() {
            throw new Error("getPrototypeOf");
          },
          has() {
            throw new Error("has");
          },
          ownKeys() {
            throw new Error("ownKeys");
          },
        },
      ),
  ],
  ["a symbol", () => Symbol("thrown")],
  ["a BigInt", () => 10n],
  ["a UserError whose code has no prototype", () => new UserError("bad code", { code: Object.create(null) })],
  [
    "a UserError whose code's toString throws",
    () =>
      new UserError("bad code", {
        code: {
          toString() {
            throw new Error("no code");
          },
        },
      }),
  ],
  [
    "a UserError whose message getter throws",
    () =>
      Object.defineProperty(new UserError("hidden"), "message", {
        get() {
          throw new Error("no message");
        },
      }),
  ],
];

/** Resolvers for hooks whose failure no caller sees: the test waits until they have run. */
const waiters = new Map();
function ran(name) {
  waiters.get(name)?.();
  waiters.delete(name);
}
function whenRan(name) {
  return new Promise((resolve) => waiters.set(name, resolve));
}

/** Throws hostile value `key[1]` if this actor's key names `hook`. */
function maybeThrow(hook, key) {
  if (key[0] === hook) throw HOSTILE[Number(key[1])][1]();
}

const hostile = actor({
  createState: (c) => {
    maybeThrow("createState", c.key);
    return { pings: 0 };
  },
  createVars: (c) => {
    maybeThrow("createVars", c.key);
    return {};
  },
  onCreate: (c) => maybeThrow("onCreate", c.key),
  onWake: (c) => maybeThrow("onWake", c.key),
  onSleep: (c) => {
    ran(`onSleep ${c.key[1]}`);
    maybeThrow("onSleep", c.key);
  },
  onDestroy: (c) => {
    ran(`onDestroy ${c.key[1]}`);
    maybeThrow("onDestroy", c.key);
  },
  onBeforeConnect: (c) => maybeThrow("onBeforeConnect", c.key),
  createConnState: (c) => {
    maybeThrow("createConnState", c.key);
    return {};
  },
  onConnect: (c) => maybeThrow("onConnect", c.key),
  onDisconnect: (c) => {
    ran(`onDisconnect ${c.key[1]}`);
    maybeThrow("onDisconnect", c.key);
  },
  onRequest: (c) => {
    maybeThrow("onRequest", c.key);
    return new Response("fine");
  },
  onWebSocket: (c, ws) => {
    maybeThrow("onWebSocket", c.key);
    ws.addEventListener("message", (event) => {
      if (event.data === "throw") {
        ran(`listener ${c.key[1]}`);
        throw HOSTILE[Number(c.key[1])][1]();
      }
      ws.send(`echo:${event.data}`);
    });
  },
  actions: {
    ping: (c) => ++c.state.pings,
    throws: (c, i) => {
      c.state.pings = -1;
      throw HOSTILE[i][1]();
    },
    rejects: async (c, i) => {
      await null;
      c.state.pings = -1;
      throw HOSTILE[i][1]();
    },
    thenableThrows: (c, i) => ({
      then() {
        throw HOSTILE[i][1]();
      },
    }),
    thenGetterThrows: (c, i) => ({
      get then() {
        throw HOSTILE[i][1]();
      },
    }),
    later: (c, i) => {
      c.schedule.after(0, "scheduled", i);
    },
    scheduled: (c, i) => {
      ran(`scheduled ${i}`);
      throw HOSTILE[i][1]();
    },
    logs: (c, i) => {
      c.log.error(HOSTILE[i][1]());
      c.log.error("hostile field", { value: HOSTILE[i][1](), next: 1 });
      const fields = HOSTILE[i][1]();
      if (typeof fields === "object") c.log.error("hostile fields", fields);
      return "logged";
    },
    nap: (c) => c.sleep(),
    destroyMe: (c) => c.destroy(),
    // Values of the wrong type where keel expects strings and numbers.
    scheduleByObject: (c) => {
      c.schedule.after(0, { toString: () => "ping" });
    },
    cancelByObject: (c) => {
      c.schedule.cancel({ toString: () => "some-id" });
    },
  },
});

/** Another actor, with a connection open throughout, that must not notice any of it. */
const bystander = actor({
  state: { calls: 0 },
  actions: { echo: (c, value) => ({ value, calls: ++c.state.calls }) },
});

async function start(t) {
  const registry = setup({ use: { hostile, bystander }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, logging: { level: "error" } });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  const client = createClient(url);
  const conn = client.bystander.getOrCreate(["watching"]).connect(null, { reconnect: false });
  await conn.ready;
  // Any status change (a drop, a reconnect) would mean the bystander noticed something.
  const statuses = [];
  conn.onStatusChange((status) => statuses.push(status));
  t.after(() => conn.dispose());
  return { url, client, conn, statuses };
}

/** The bystander's connection still works, and so do fresh calls to both actor types. */
async function assertUnharmed({ client, conn, statuses }, label) {
  assert.equal(conn.status, "open", `${label}: the bystander's connection is still open`);
  assert.deepEqual(statuses, [], `${label}: the bystander's connection never changed status`);
  const echoed = await conn.echo(label);
  assert.equal(echoed.value, label);
  assert.ok((await client.hostile.getOrCreate(["fine"]).ping()) > 0);
}

const INTERNAL = { group: "actor", code: "internal_error", message: "an internal error occurred" };

test("a hostile throw from an action, sync or async or through a thenable, fails only that call", async (t) => {
  const harness = await start(t);
  for (const [i, [what]] of HOSTILE.entries()) {
    const handle = harness.client.hostile.getOrCreate(["action", String(i)]);
    for (const action of ["throws", "rejects", "thenableThrows", "thenGetterThrows"]) {
      await assert.rejects(handle[action](i), INTERNAL, `${action} throwing ${what}`);
    }
    // The failed calls changed nothing, and the actor still answers.
    assert.equal(await handle.ping(), 1, what);
  }
  await assertUnharmed(harness, "actions");
});

test("a hostile throw from a start hook fails the call that started the actor", async (t) => {
  const harness = await start(t);
  for (const hook of ["createState", "createVars", "onCreate", "onWake"]) {
    for (const [i, [what]] of HOSTILE.entries()) {
      await assert.rejects(harness.client.hostile.getOrCreate([hook, String(i)]).ping(), INTERNAL, `${hook} throwing ${what}`);
    }
  }
  await assertUnharmed(harness, "start hooks");
});

test("a hostile throw from a connect hook refuses only that connection", async (t) => {
  const harness = await start(t);
  for (const hook of ["onBeforeConnect", "createConnState", "onConnect"]) {
    for (const [i, [what]] of HOSTILE.entries()) {
      const conn = harness.client.hostile.getOrCreate([hook, String(i)]).connect(null, { reconnect: false });
      await assert.rejects(conn.ready, { group: "actor", code: "internal_error" }, `${hook} throwing ${what}`);
      conn.dispose();
    }
  }
  await assertUnharmed(harness, "connect hooks");
});

test("a hostile throw from onDisconnect, onSleep, onDestroy or a schedule leaves the actor usable", async (t) => {
  const harness = await start(t);
  for (const [i, [what]] of HOSTILE.entries()) {
    const disconnected = whenRan(`onDisconnect ${i}`);
    const conn = harness.client.hostile.getOrCreate(["onDisconnect", String(i)]).connect(null, { reconnect: false });
    await conn.ready;
    conn.dispose();
    await disconnected;
    assert.ok((await harness.client.hostile.getOrCreate(["onDisconnect", String(i)]).ping()) > 0, `onDisconnect throwing ${what}`);

    const slept = whenRan(`onSleep ${i}`);
    const sleeper = harness.client.hostile.getOrCreate(["onSleep", String(i)]);
    await sleeper.nap();
    await slept;
    assert.ok((await sleeper.ping()) > 0, `onSleep throwing ${what}`);

    const destroyed = whenRan(`onDestroy ${i}`);
    const doomed = harness.client.hostile.getOrCreate(["onDestroy", String(i)]);
    await doomed.destroyMe();
    await destroyed;
    // A call to the same key may still meet the destroy in progress (`actor.not_found`), so
    // check the runtime carries on with another actor.
    assert.ok((await harness.client.hostile.getOrCreate(["after onDestroy"]).ping()) > 0, `onDestroy throwing ${what}`);

    const fired = whenRan(`scheduled ${i}`);
    const scheduler = harness.client.hostile.getOrCreate(["schedule", String(i)]);
    await scheduler.later(i);
    await fired;
    assert.ok((await scheduler.ping()) > 0, `a schedule throwing ${what}`);
  }
  await assertUnharmed(harness, "background hooks");
});

test("a hostile throw from onRequest or onWebSocket fails only that request or socket", async (t) => {
  const harness = await start(t);
  const wsUrl = harness.url.replace(/^http/, "ws");
  for (const [i, [what]] of HOSTILE.entries()) {
    const response = await fetch(`${harness.url}/v1/actors/hostile/raw/${encodeURIComponent(`onRequest/${i}`)}/x`);
    assert.equal(response.status, 500, `onRequest throwing ${what}`);
    assert.deepEqual(await response.json(), { ...INTERNAL, metadata: null });

    const refused = new WebSocket(`${wsUrl}/v1/actors/hostile/raw/${encodeURIComponent(`onWebSocket/${i}`)}`);
    const [code] = await new Promise((resolve) => refused.on("close", (...args) => resolve(args)));
    assert.equal(code, 1008, `onWebSocket throwing ${what}`);

    // A listener that throws fails only that message: the socket stays open.
    const ws = new WebSocket(`${wsUrl}/v1/actors/hostile/raw/${encodeURIComponent(`listener/${i}`)}`);
    await new Promise((resolve, reject) => {
      ws.once("open", resolve);
      ws.once("error", reject);
    });
    const threw = whenRan(`listener ${i}`);
    ws.send("throw");
    await threw;
    const echoed = new Promise((resolve) => ws.once("message", (data) => resolve(String(data))));
    ws.send("after");
    assert.equal(await echoed, "echo:after", `a listener throwing ${what}`);
    ws.close();
  }
  await assertUnharmed(harness, "raw routes");
});

test("c.log never throws because of a hostile message or field", async (t) => {
  const harness = await start(t);
  const handle = harness.client.hostile.getOrCreate(["logs"]);
  for (const [i, [what]] of HOSTILE.entries()) {
    assert.equal(await handle.logs(i), "logged", what);
  }
  await assertUnharmed(harness, "logging");
});

test("values of the wrong type where keel expects strings or numbers fail only their call", async (t) => {
  const harness = await start(t);
  const handle = harness.client.hostile.getOrCreate(["wrong-types"]);
  await assert.rejects(handle.scheduleByObject(), INTERNAL);
  await assert.rejects(handle.cancelByObject(), INTERNAL);
  // A Response subclass whose status is not a number.
  for (const [status, headers] of [
    ["abc", undefined],
    [101, undefined],
    [200.5, undefined],
    [200, [[1, 2]]],
  ]) {
    const odd = actor({
      state: null,
      actions: {},
      onRequest: () => {
        const response = new Response("odd");
        Object.defineProperty(response, "status", { get: () => status });
        if (headers) Object.defineProperty(response, "headers", { get: () => headers });
        return response;
      },
    });
    const registry = setup({ use: { odd }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, logging: { level: "error" } });
    const response = await registry.handler(new Request("http://local/v1/actors/odd/raw/a"));
    assert.equal(response.status, 500, `status ${JSON.stringify(status)}, headers ${JSON.stringify(headers)}`);
    assert.equal((await response.json()).code, "internal_error");
    await registry.shutdown();
  }
  await assertUnharmed(harness, "wrong types");
});
