// Compile-time tests of the client's inferred types, checked by `tsc --noEmit` in `npm test`.
// Each `@ts-expect-error` must be an error, or tsc fails the build.
import { actor, createInspector, event, setup } from "keel";
import { createClient } from "keel/client";
import { db, type SqlRow } from "keel/db";

const counter = actor({
  state: { count: 0 },
  actions: {
    increment: (c, amount: number) => {
      c.state.count += amount;
      return c.state.count;
    },
    rename: async (c, name: string, loud?: boolean) => (loud ? name.toUpperCase() : name),
    getCount: (c) => c.state.count,
  },
});

const greeter = actor({
  createState: (_c, input: { greeting: string }) => ({ greeting: input.greeting }),
  actions: {
    greet: (c, name: string) => `${c.state.greeting}, ${name}`,
  },
});

const chat = actor({
  state: { log: [] as string[] },
  events: { message: event<string>(), joined: event<{ name: string }>() },
  actions: {
    send: (c, text: string) => {
      c.state.log.push(text);
      c.broadcast("message", text);
      return c.state.log.length;
    },
  },
});

const registry = setup({ use: { counter, greeter, chat } });
const client = createClient<typeof registry>("http://127.0.0.1:6420");

async function check(): Promise<void> {
  const room = client.counter.getOrCreate(["room-1"]);
  const n: number = await room.increment(5);
  const s: string = await room.rename("ada", true);
  const count: number = await room.getCount();
  void [n, s, count];

  // @ts-expect-error: the argument must be a number.
  await room.increment("5");
  // @ts-expect-error: a missing argument.
  await room.increment();
  // @ts-expect-error: the result is a number, not a string.
  const wrong: string = await room.getCount();
  // @ts-expect-error: no such action.
  await room.decrement(1);
  // @ts-expect-error: no such actor type.
  client.nothing.getOrCreate([]);

  client.greeter.getOrCreate(["g"], { input: { greeting: "hi" } });
  // @ts-expect-error: the input has the wrong shape.
  client.greeter.getOrCreate(["g"], { input: { greeting: 5 } });
  const greeting: string = await client.greeter.get(["g"]).greet("bob");
  void [wrong, greeting];

  const conn = client.chat.getOrCreate(["room"]).connect({ name: "ada" });
  conn.on("message", (text) => {
    const upper: string = text.toUpperCase();
    void upper;
  });
  conn.on("joined", (who) => {
    const name: string = who.name;
    void name;
  });
  // @ts-expect-error: no such event.
  conn.on("typo", () => {});
  const sent: number = await conn.send("hi");
  // @ts-expect-error: the argument must be a string.
  await conn.send(5);
  void sent;

  const inspector = createInspector("http://127.0.0.1:6420", { token: "t" });
  const { actors, nextCursor } = await inspector.actors({ name: "counter", limit: 10 });
  const awake: boolean = actors[0].awake;
  const next: string | null = nextCursor;
  void [awake, next];

  const state = actor({
    state: { items: [] as string[] },
    actions: {
      // @ts-expect-error: the state has no `count`.
      bad: (c) => c.state.count,
      good: (c) => c.state.items.length,
    },
  });
  void state;

  const logged = actor({
    createState: (c) => {
      c.log.info("creating", { key: c.key });
      return {};
    },
    actions: {
      fine: (c) => {
        c.log.debug("fixed message");
        c.log.warn("with fields", { n: 1, nested: { ok: true } });
      },
      // @ts-expect-error: there is no trace level in `c.log`.
      noTrace: (c) => c.log.trace("x"),
      // @ts-expect-error: fields are an object, not a list.
      noList: (c) => c.log.info("x", [1, 2]),
    },
  });
  void logged;

  setup({ use: { counter }, logging: { level: "info,keel::js=debug", format: "json" }, inspector: { token: "t", allowRemote: false } });
  // @ts-expect-error: an unknown log format.
  setup({ use: { counter }, logging: { format: "xml" } });
}
void check;

// keel/react: the hooks take their types from the registry.
import { createKeel, useActorEvent } from "keel/react";

const keel = createKeel<typeof registry>("http://127.0.0.1:6420");

function ChatHooks(): void {
  const room = keel.useActor({ name: "chat", key: ["lobby"], params: { name: "ada" } });
  const status: "connecting" | "open" | "reconnecting" | "closed" = room.status;
  const code: string | undefined = room.error?.code;
  void [status, code];
  const sent: Promise<number> | undefined = room.connection?.send("hi");
  void sent;
  keel.useActorEvent(room, "message", (text) => {
    const line: string = text;
    void line;
  });
  useActorEvent(room, "joined", (who) => {
    const name: string = who.name;
    void name;
  });
  // @ts-expect-error: no such event.
  keel.useActorEvent(room, "nothing", () => {});
  // @ts-expect-error: the payload is a string, not a number.
  keel.useActorEvent(room, "message", (text: number) => void text);
  // @ts-expect-error: the argument must be a string.
  void room.connection?.send(5);
  // @ts-expect-error: no such actor type.
  keel.useActor({ name: "nothing", key: [] });
  keel.useActor({ name: "greeter", key: ["g"], input: { greeting: "hi" } });
  // @ts-expect-error: the input has the wrong shape.
  keel.useActor({ name: "greeter", key: ["g"], input: { greeting: 5 } });
}
void ChatHooks;

// `c.client<typeof registry>()` inside an actor is the same typed client as `createClient`.
const caller = actor({
  state: null,
  actions: {
    callCounter: async (c) => {
      const counters = c.client<typeof registry>().counter;
      const total: number = await counters.getOrCreate(["k"]).increment(1);
      const renamed: string = await counters.get("k").rename("x", true);
      // @ts-expect-error: increment takes a number.
      await counters.getOrCreate(["k"]).increment("1");
      // @ts-expect-error: no such action.
      await counters.getOrCreate(["k"]).decrement(1);
      // @ts-expect-error: no such actor type.
      void c.client<typeof registry>().nothing;
      // @ts-expect-error: the input has the wrong shape.
      c.client<typeof registry>().greeter.getOrCreate(["g"], { input: { greeting: 5 } });
      // @ts-expect-error: the result is a number, not a string.
      const wrong: string = await counters.getOrCreate(["k"]).getCount();
      void wrong;
      return `${total} ${renamed}`;
    },
  },
});
void setup({ use: { caller } });
// Who is calling: `c.request` is a Fetch Request or undefined; Forbidden; canSubscribe; raw routes.
import { Forbidden, forbidden } from "keel";
const guarded = actor({
  state: {},
  events: {
    open: event<string>(),
    admins: event<string>({ canSubscribe: (_c, conn) => conn.params === "admin" }),
    // @ts-expect-error: canSubscribe answers with a boolean.
    wrong: event<string>({ canSubscribe: () => "yes" }),
  },
  onBeforeConnect: (c) => {
    const token: string | null | undefined = c.request?.headers.get("authorization");
    if (token === undefined) throw new Forbidden("no request");
  },
  actions: {
    method: (c) => {
      // @ts-expect-error: c.request may be undefined (over a connection, or scheduled).
      c.request.headers.get("x");
      return c.request?.method ?? "none";
    },
    deny: () => {
      throw forbidden("no");
    },
  },
});
const guardedRegistry = setup({ use: { guarded } });
const guardedClient = createClient<typeof guardedRegistry>("http://127.0.0.1:1", { headers: { authorization: "Bearer x" } });
const guardedHandle = guardedClient.guarded.getForId("id");
const response: Promise<Response> = guardedHandle.fetch("/x", { method: "POST" });
const rawSocket: WebSocket = guardedHandle.webSocket("/live");
// @ts-expect-error: fetch takes a path string.
guardedHandle.fetch(42);
const refreshing = guardedHandle.connect(undefined, { getParams: async () => ({ token: "fresh" }) });
void [response, rawSocket, refreshing];

// `keel/db`: c.db is typed on every actor; parameters are SQL values; rows can be typed.
const withDb = actor({
  state: { n: 0 },
  db: db({
    onMigrate: async (d) => {
      await d.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)");
    },
    statementTimeoutMs: 1000,
  }),
  actions: {
    add: async (c, v: string) => {
      await c.db.execute("INSERT INTO t (v) VALUES (?)", v);
      await c.db.execute("INSERT INTO t (v) VALUES (:v)", { v });
      await c.db.execute("SELECT ?, ?, ?, ?, ?", null, 1, 2n, true, new Uint8Array(1));
      // @ts-expect-error: a Date is not a SQL value.
      await c.db.execute("SELECT ?", new Date());
      // @ts-expect-error: nested objects are not SQL values.
      await c.db.execute("SELECT :a", { a: { nested: 1 } });
      // @ts-expect-error: the SQL is a string.
      await c.db.execute(42);
    },
    rows: async (c) => {
      const typed: Array<{ id: number; v: string }> = await c.db.execute<{ id: number; v: string }>("SELECT id, v FROM t");
      const loose: SqlRow[] = await c.db.execute("SELECT 1 AS one");
      // @ts-expect-error: a row's values are SQL results, not arbitrary objects.
      const wrong: Array<{ id: Date }> = await c.db.execute("SELECT id FROM t");
      return [typed, loose, wrong];
    },
  },
});
// @ts-expect-error: onMigrate is a function.
db({ onMigrate: "CREATE TABLE t (x)" });
// @ts-expect-error: `db` takes db() from keel/db, not a config object.
actor({ state: {}, db: { onMigrate: () => {} }, actions: {} });
void withDb;
