// Who is calling: `c.request` over HTTP and on connect, the client's `headers` on HTTP and on
// the WebSocket upgrade, `getParams` on every (re)connect, `Forbidden`; and the client's
// connections by id and raw routes with keys that need encoding.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer, connect as tcpConnect } from "node:net";
import { actor, createClient, event, Forbidden, forbidden, KeelError, setup } from "keel";
import { post, tempDir } from "./helpers.mjs";

const door = actor({
  state: { opened: 0 },
  onBeforeConnect: (c, params) => {
    // The upgrade must carry the token header; params alone do not get in.
    if (c.request?.headers.get("x-token") !== "open-sesame") throw new Forbidden("no token on the upgrade");
    if (params?.token === "expired") throw forbidden("expired token");
  },
  createConnState: (c, params) => ({
    token: params?.token ?? null,
    agent: c.request?.headers.get("x-agent") ?? null,
    method: c.request?.method ?? null,
    path: c.request === undefined ? null : new URL(c.request.url).pathname,
  }),
  actions: {
    whoami: (c) => ({
      via: c.conn === undefined ? "http" : "conn",
      token: c.request?.headers.get("x-token") ?? null,
      agent: c.request?.headers.get("x-agent") ?? null,
      method: c.request?.method ?? null,
      path: c.request === undefined ? null : new URL(c.request.url).pathname,
      hasRequest: c.request !== undefined,
      connState: c.conn?.state ?? null,
    }),
    admin: (c) => {
      // Changed before the check, so a refusal that kept it would show in the count.
      c.state.opened++;
      if (c.request?.headers.get("x-role") !== "admin") throw new Forbidden("admins only");
      return c.state.opened;
    },
    deny: () => {
      throw forbidden();
    },
    opened: (c) => c.state.opened,
    ring: (c, text) => c.broadcast("ring", text),
  },
});

const raw = actor({
  state: {},
  actions: { key: (c) => c.key },
  onRequest: async (c, request) =>
    Response.json({ key: c.key, url: new URL(request.url).pathname + new URL(request.url).search, agent: request.headers.get("x-agent"), body: await request.text() }),
  onWebSocket: (c, ws) => {
    ws.send(JSON.stringify({ key: c.key, path: ws.path, agent: ws.headers["x-agent"] ?? null }));
  },
});

async function serve(t) {
  const registry = setup({ use: { door, raw }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  return url;
}

function nextEvent(connection, event) {
  return new Promise((resolve) => {
    const off = connection.on(event, (data) => {
      off();
      resolve(data);
    });
  });
}

test("c.request carries the HTTP request's method, URL and headers; the client's headers option is sent", async (t) => {
  const url = await serve(t);
  const client = createClient(url, { headers: { "x-token": "t1", "x-agent": "cli/1" } });
  const me = await client.door.getOrCreate(["a"]).whoami();
  assert.deepEqual(me, {
    via: "http",
    token: "t1",
    agent: "cli/1",
    method: "POST",
    path: "/v1/actors/door/actions/whoami",
    hasRequest: true,
    connState: null,
  });
  // By id too.
  const id = await client.door.getOrCreate(["a"]).resolve();
  assert.equal((await client.door.getForId(id).whoami()).agent, "cli/1");
  // And with curl-style JSON, without keel's client.
  const reply = await post(url, "/v1/actors/door/actions/whoami?x=1", { key: ["a"], args: [] }, { "x-agent": "curl" });
  assert.equal(reply.status, 200);
  assert.equal(reply.body.output.agent, "curl");
});

test("onBeforeConnect reads c.request: a connection without the header is refused, one with it admitted", async (t) => {
  const url = await serve(t);
  const bare = createClient(url).door.getOrCreate(["b"]).connect({ token: "x" }, { reconnect: false });
  await assert.rejects(bare.ready, (err) => err instanceof KeelError && err.is("auth.forbidden") && err.message === "no token on the upgrade");

  const client = createClient(url, { headers: { "x-token": "open-sesame", "x-agent": "ws/2" } });
  const conn = client.door.getOrCreate(["b"]).connect({ token: "fresh" });
  await conn.ready;
  const me = await conn.whoami();
  // Over the connection there is no request; the upgrade's headers live on in the conn state.
  assert.equal(me.via, "conn");
  assert.equal(me.hasRequest, false);
  assert.deepEqual(me.connState, { token: "fresh", agent: "ws/2", method: "GET", path: "/v1/actors/door/connect" });
  conn.dispose();
});

test("Forbidden becomes auth.forbidden 403 over HTTP and a structured error over a connection; nothing is committed", async (t) => {
  const url = await serve(t);
  const denied = await post(url, "/v1/actors/door/actions/admin", { key: ["f"], args: [] });
  assert.equal(denied.status, 403);
  assert.deepEqual(denied.body, { group: "auth", code: "forbidden", message: "admins only", metadata: null });
  const bare = await post(url, "/v1/actors/door/actions/deny", { key: ["f"], args: [] });
  assert.equal(bare.status, 403);
  assert.equal(bare.body.code, "forbidden");
  const admin = await post(url, "/v1/actors/door/actions/admin", { key: ["f"], args: [] }, { "x-role": "admin" });
  assert.deepEqual([admin.status, admin.body.output], [200, 1]);

  const client = createClient(url, { headers: { "x-token": "open-sesame" } });
  const conn = client.door.getOrCreate(["f"]).connect();
  await conn.ready;
  // Over the connection there is no request, so no role: refused, and the actor goes on.
  await assert.rejects(conn.admin(), (err) => err instanceof KeelError && err.is("auth.forbidden") && err.message === "admins only");
  assert.equal(await conn.opened(), 1);
  // A refusal in onBeforeConnect from forbidden() is the same error.
  const expired = client.door.getOrCreate(["f"]).connect({ token: "expired" }, { reconnect: false });
  await assert.rejects(expired.ready, (err) => err.is("auth.forbidden") && err.message === "expired token");
  conn.dispose();
});

test("getParams runs before every (re)connect attempt, so a reconnect carries fresh params", async (t) => {
  const url = await serve(t);
  // A TCP relay in front of keel lets the test cut the socket from the server side, as a
  // proxy or a restarted load balancer would.
  const upstream = new URL(url);
  const relayed = new Set();
  const relay = createServer((socket) => {
    const onward = tcpConnect(Number(upstream.port), "127.0.0.1");
    socket.pipe(onward).pipe(socket);
    const pair = { socket, onward };
    relayed.add(pair);
    const drop = () => {
      relayed.delete(pair);
      socket.destroy();
      onward.destroy();
    };
    socket.on("error", drop).on("close", drop);
    onward.on("error", drop).on("close", drop);
  });
  await new Promise((resolve) => relay.listen(0, "127.0.0.1", resolve));
  t.after(() => new Promise((resolve) => relay.close(resolve)));

  const client = createClient(`http://127.0.0.1:${relay.address().port}`, { headers: { "x-token": "open-sesame" } });
  const calls = [];
  const conn = client.door.getOrCreate(["p"]).connect({
    getParams: async () => {
      calls.push(calls.length + 1);
      return { token: `token-${calls.length}` };
    },
  }, { reconnect: { initialDelayMs: 1, maxDelayMs: 5 } });
  await conn.ready;
  assert.equal((await conn.whoami()).connState.token, "token-1");
  const firstConn = conn.connId;

  const reopened = new Promise((resolve) => {
    const off = conn.onStatusChange((status) => {
      if (status === "open") {
        off();
        resolve();
      }
    });
  });
  for (const pair of relayed) pair.socket.destroy();
  await reopened;
  assert.notEqual(conn.connId, firstConn);
  assert.deepEqual(calls, [1, 2]);
  assert.equal((await conn.whoami()).connState.token, "token-2");
  conn.dispose();
});

test("getForId(id).connect() and (await create(key)).connect() get events", async (t) => {
  const url = await serve(t);
  const client = createClient(url, { headers: { "x-token": "open-sesame" } });
  const id = await client.door.getOrCreate(["events"]).resolve();
  const byId = client.door.getForId(id).connect();
  await byId.ready;
  assert.equal(byId.actorId, id);
  const created = await client.door.create(["made", "new"]);
  const byCreate = created.connect();
  await byCreate.ready;
  assert.equal(byCreate.actorId, await created.resolve());

  const heard = nextEvent(byId, "ring");
  await client.door.getOrCreate(["events"]).ring("by id");
  assert.equal(await heard, "by id");
  const heardCreated = nextEvent(byCreate, "ring");
  await created.ring("by create");
  assert.equal(await heardCreated, "by create");

  // An id of another type's actor is not found on this type's route.
  const rawId = await client.raw.getOrCreate(["x"]).resolve();
  const wrong = client.door.getForId(rawId).connect(undefined, { reconnect: false });
  await assert.rejects(wrong.ready, (err) => err.is("actor.not_found"));
  byId.dispose();
  byCreate.dispose();
});

const awkwardKeys = [["with space", "a/b"], ["ünïcødé ✓", "back\\slash", ""], [], ["?#%"]];

test("handle.fetch and handle.webSocket reach onRequest and onWebSocket with keys that need encoding", async (t) => {
  const url = await serve(t);
  const client = createClient(url, { headers: { "x-agent": "raw/1" } });
  for (const key of awkwardKeys) {
    const handle = client.raw.getOrCreate(key);
    const response = await handle.fetch("/some/path?q=1", { method: "POST", body: "hello" });
    assert.equal(response.status, 200);
    assert.deepEqual(await response.json(), { key, url: "/some/path?q=1", agent: "raw/1", body: "hello" });
    // The raw route reached the same actor that actions reach.
    assert.deepEqual(await handle.key(), key);

    const socket = handle.webSocket("/live?x=2");
    const first = await new Promise((resolve, reject) => {
      socket.onmessage = (event) => resolve(JSON.parse(String(event.data)));
      socket.onerror = (event) => reject(event.error ?? new Error("socket error"));
    });
    assert.deepEqual(first, { key, path: "/live?x=2", agent: "raw/1" });
    socket.close();
  }
  const created = await client.raw.create(["made here"]);
  assert.deepEqual(await (await created.fetch("x")).json(), { key: ["made here"], url: "/x", agent: "raw/1", body: "" });
  const id = await created.resolve();
  assert.throws(() => client.raw.getForId(id).fetch("/"), (err) => err.is("client.unsupported"));
});

const club = actor({
  state: { checks: 0 },
  events: {
    news: event(),
    vip: event({
      canSubscribe: (c, conn) => {
        c.state.checks++;
        return conn.params?.vip === true;
      },
    }),
    secret: event({
      canSubscribe: () => {
        throw new Forbidden("nobody hears secrets");
      },
    }),
  },
  actions: {
    announce: (c) => {
      c.broadcast("vip", "for vips");
      c.broadcast("secret", "hush");
      c.broadcast("news", "for all");
    },
    checks: (c) => c.state.checks,
  },
});

test("canSubscribe refuses a subscription with auth.forbidden and delivers none of its events", async (t) => {
  const registry = setup({ use: { club }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  const handle = createClient(url).club.getOrCreate(["room"]);
  const heard = { guest: [], vip: [] };
  const errors = { guest: [], vip: [] };

  // The guest subscribes before it is admitted (the subscription travels in init)...
  const guest = handle.connect({ vip: false });
  guest.onError((err) => errors.guest.push(err));
  guest.on("vip", (data) => heard.guest.push(`vip:${data}`));
  guest.on("secret", (data) => heard.guest.push(`secret:${data}`));
  const guestNews = nextEvent(guest, "news");
  await guest.ready;
  // ...the VIP after (a `sub` frame).
  const vip = handle.connect({ vip: true });
  vip.onError((err) => errors.vip.push(err));
  await vip.ready;
  vip.on("vip", (data) => heard.vip.push(`vip:${data}`));
  vip.on("secret", (data) => heard.vip.push(`secret:${data}`));
  const vipNews = nextEvent(vip, "news");
  t.after(() => {
    guest.dispose();
    vip.dispose();
  });
  // Subscriptions go through the actor's mailbox in order, so they are settled by the time
  // a later call of the same connection runs. A refusal is a failed call and changes
  // nothing: only the VIP's granted check is counted.
  assert.equal(await vip.checks(), 1);

  await handle.announce();
  // Each connection's events arrive in the order they were broadcast, so once `news` is in,
  // anything `vip` or `secret` would have sent has been.
  assert.equal(await guestNews, "for all");
  assert.equal(await vipNews, "for all");
  assert.deepEqual(heard, { guest: [], vip: ["vip:for vips"] });
  assert.deepEqual(
    errors.guest.map((err) => [err.fullCode, err.message]).sort(),
    [
      ["auth.forbidden", "nobody hears secrets"],
      ["auth.forbidden", "this connection may not subscribe to vip"],
    ],
  );
  assert.deepEqual(errors.vip.map((err) => [err.fullCode, err.message]), [["auth.forbidden", "nobody hears secrets"]]);
  // A refused subscription leaves the connection open and working.
  assert.equal(guest.status, "open");
  assert.equal(await guest.checks(), 1);
});
