// The counter end to end: the real addon, a real server on port 0, a real SQLite file.
import { test } from "node:test";
import assert from "node:assert/strict";
import { setup, createClient, KeelError } from "keel";
import { createClient as createClientFromSubpath } from "keel/client";
import { counter, greeter } from "./fixtures/counter.mjs";
import { post, tempDir } from "./helpers.mjs";

async function startRegistry(t, options = {}) {
  const registry = setup({ use: { counter, greeter }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, ...options });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  return { registry, url, serving };
}

test("the typed client increments a durable counter", async (t) => {
  const { url } = await startRegistry(t);
  const client = createClient(url);
  const room = client.counter.getOrCreate(["room-1"]);
  assert.equal(await room.increment(5), 5);
  assert.equal(await room.increment(2), 7);
  assert.equal(await room.getCount(), 7);
  // Another key is another actor.
  assert.equal(await client.counter.getOrCreate(["room-2"]).getCount(), 0);
  // The subpath export is the same client.
  assert.equal(await createClientFromSubpath(url).counter.getOrCreate("room-1").getCount(), 7);
});

test("raw HTTP with JSON is the same protocol", async (t) => {
  const { url } = await startRegistry(t);
  const health = await fetch(url + "/health");
  assert.equal(health.status, 200);
  assert.deepEqual(await health.json(), { status: "ok" });
  assert.deepEqual(await post(url, "/v1/actors/counter/actions/increment", { key: ["raw"], args: [3] }), {
    status: 200,
    body: { output: 3 },
  });
  const resolved = await post(url, "/v1/actors/counter/resolve", { key: ["raw"], mode: "get" });
  assert.equal(resolved.status, 200);
  assert.match(resolved.body.actorId, /^[0-9a-f]{32}$/);
  assert.deepEqual(await post(url, `/v1/ids/${resolved.body.actorId}/actions/getCount`, {}), {
    status: 200,
    body: { output: 3 },
  });
});

test("get, create and getForId follow their rules", async (t) => {
  const { url } = await startRegistry(t);
  const client = createClient(url);
  await assert.rejects(client.counter.get(["nobody"]).getCount(), (err) => {
    assert.ok(err instanceof KeelError);
    assert.equal(err.group, "actor");
    assert.equal(err.code, "not_found");
    return true;
  });
  const created = await client.counter.create(["fresh"]);
  assert.equal(await created.increment(1), 1);
  await assert.rejects(client.counter.create(["fresh"]), { group: "actor", code: "already_exists" });
  const id = await client.counter.getOrCreate(["fresh"]).resolve();
  assert.equal(await client.counter.getForId(id).getCount(), 1);
  assert.deepEqual(await client.counter.getForId(id).whoAmI(), { actorId: id, name: "counter", key: ["fresh"] });
  await assert.rejects(client.counter.getForId("f".repeat(32)).getCount(), { code: "not_found" });
});

test("createState receives the creation input once", async (t) => {
  const { url } = await startRegistry(t);
  const client = createClient(url);
  const hi = client.greeter.getOrCreate(["hi"], { input: { greeting: "ahoy" } });
  assert.equal(await hi.greet("ada"), "ahoy, ada");
  const again = client.greeter.getOrCreate(["hi"], { input: { greeting: "ignored" } });
  assert.equal(await again.greet("bob"), "ahoy, bob");
  assert.equal(await client.greeter.getOrCreate(["plain"]).greet("cy"), "hello, cy");
});

test("a throwing action returns a structured error and the actor keeps working", async (t) => {
  const { url } = await startRegistry(t);
  const client = createClient(url);
  const room = client.counter.getOrCreate(["oops"]);
  await room.increment(10);
  await assert.rejects(room.refuse(), (err) => {
    assert.ok(err instanceof KeelError);
    assert.deepEqual([err.group, err.code, err.message], ["user", "forbidden", "not allowed"]);
    assert.deepEqual(err.metadata, { count: -1000 });
    return true;
  });
  await assert.rejects(room.crash(), (err) => {
    assert.deepEqual([err.group, err.code], ["actor", "internal_error"]);
    assert.doesNotMatch(err.message, /secret/, "internal details stay hidden outside dev mode");
    return true;
  });
  // The throwing actions' state changes were rolled back.
  assert.equal(await room.getCount(), 10);
  assert.equal(await room.increment(1), 11);
});

test("dev mode shows internal error messages", async (t) => {
  const { url } = await startRegistry(t, { dev: true });
  await assert.rejects(createClient(url).counter.getOrCreate(["d"]).crash(), { code: "internal_error", message: "secret internal detail" });
});

test("bad requests get their documented errors", async (t) => {
  const { url } = await startRegistry(t, { maxBodyBytes: 4096 });
  const cases = [
    ["/v1/actors/nope/actions/increment", { key: [] }, 404, "actor", "type_not_found"],
    ["/v1/actors/counter/actions/nope", { key: [] }, 404, "actor", "action_not_found"],
    ["/v1/actors/counter/actions/increment", "{oops", 400, "request", "malformed"],
    ["/v1/actors/counter/actions/increment", { key: "not-an-array" }, 400, "request", "malformed"],
    ["/v1/actors/counter/actions/increment", { key: [], args: {} }, 400, "request", "malformed"],
    ["/v1/actors/counter/actions/increment", { key: ["x".repeat(200)] }, 400, "request", "invalid_key"],
    ["/v1/actors/counter/actions/increment", { key: ["a"], args: ["x".repeat(8000)] }, 413, "request", "body_too_large"],
    ["/v2/anything", {}, 404, "request", "route_not_found"],
  ];
  for (const [path, body, status, group, code] of cases) {
    const response = await post(url, path, body);
    assert.equal(response.status, status, `${path} ${JSON.stringify(body).slice(0, 40)}`);
    assert.equal(response.body.group, group);
    assert.equal(response.body.code, code);
    assert.equal(typeof response.body.message, "string");
  }
  // The server is unharmed.
  assert.equal((await post(url, "/v1/actors/counter/actions/increment", { key: ["ok"] })).body.output, 1);
});

test("many concurrent calls on many actors all land", async (t) => {
  const { url } = await startRegistry(t);
  const client = createClient(url);
  const calls = [];
  for (let actorIndex = 0; actorIndex < 16; actorIndex++) {
    for (let i = 0; i < 10; i++) calls.push(client.counter.getOrCreate([`c${actorIndex}`]).increment(1));
  }
  await Promise.all(calls);
  for (let actorIndex = 0; actorIndex < 16; actorIndex++) {
    assert.equal(await client.counter.getOrCreate([`c${actorIndex}`]).getCount(), 10);
  }
});

test("a second registry on the same data directory is refused", async (t) => {
  const dataDir = tempDir(t);
  const { url } = await startRegistry(t, { dataDir });
  assert.ok(url);
  const second = setup({ use: { counter }, port: 0, dataDir, disableSignalHandlers: true });
  await assert.rejects(second.start(), (err) => {
    assert.deepEqual([err.group, err.code], ["storage", "locked"]);
    return true;
  });
  await second.shutdown();
});
