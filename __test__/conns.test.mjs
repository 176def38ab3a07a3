// A type without connection hooks: core admits and closes its connections without calling
// JS, and JS still learns of them before the actor's next call, so `c.conns`, `c.conn` and
// broadcasts behave as for a type with hooks.
import { test } from "node:test";
import assert from "node:assert/strict";
import { actor, createClient, setup } from "keel";
import { tempDir } from "./helpers.mjs";

const bare = actor({
  state: {},
  actions: {
    who: (c) => ({ params: c.conn?.params ?? null, conns: c.conns.size, known: c.conn !== undefined && c.conns.has(c.conn.id) }),
    count: (c) => c.conns.size,
    shout: (c, text) => c.broadcast("shout", text),
  },
});

async function until(what, condition) {
  // Bounded polling: the close reaches the actor on its own time, and nothing announces it.
  for (let i = 0; i < 500; i++) {
    if (await condition()) return;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

test("a type without connection hooks still sees its connections in c.conns and c.conn", async (t) => {
  const registry = setup({ use: { bare }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true });
  const serving = registry.start();
  const { url } = await registry.listening();
  const client = createClient(url);
  const handle = client.bare.getOrCreate(["room"]);

  const ada = handle.connect({ name: "ada" });
  await ada.ready;
  assert.deepEqual(await ada.who(), { params: { name: "ada" }, conns: 1, known: true });
  const bob = handle.connect({ name: "bob" });
  await bob.ready;
  const heard = { ada: [], bob: [] };
  ada.on("shout", (text) => heard.ada.push(text));
  bob.on("shout", (text) => heard.bob.push(text));
  assert.equal(await handle.count(), 2);
  await ada.shout("hi");
  await until("both hear it", () => heard.ada.length === 1 && heard.bob.length === 1);
  assert.deepEqual(heard, { ada: ["hi"], bob: ["hi"] });

  bob.dispose();
  await until("bob's close reaches the actor", async () => (await handle.count()) === 1);
  assert.deepEqual(await ada.who(), { params: { name: "ada" }, conns: 1, known: true });
  ada.dispose();
  await until("ada's close reaches the actor", async () => (await handle.count()) === 0);

  await registry.shutdown();
  await serving;
});
