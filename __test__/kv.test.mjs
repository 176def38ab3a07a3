// KV keys from JS to disk and back: JS hands core the user's keys (strings or bytes), core's
// KV key codec stores them (a tag byte, then the key), orders them, lays a call's own writes
// over what is stored, and the inspector shows them decoded.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { actor, createClient, createInspector, setup } from "keel";
import { tempDir } from "./helpers.mjs";

const PROBE = "kv-format-probe";
const BYTES = [0xfe, 0xed, 0xfa, 0xce];
const pairs = (entries) => entries.map(([key, value]) => [key instanceof Uint8Array ? [...key] : key, value]);

const store = actor({
  state: {},
  actions: {
    id: (c) => c.actorId,
    // Writes and lists in one call: the lists see the call's own uncommitted writes.
    batch: async (c) => {
      await c.kv.put("p/1", 1);
      await c.kv.put("p/2", 2);
      await c.kv.put(PROBE, "probe");
      await c.kv.put(new Uint8Array(BYTES), "bytes");
      await c.kv.delete("p/1");
      return {
        strings: pairs(await c.kv.list({ prefix: "p/" })),
        bytes: pairs(await c.kv.list({ prefix: new Uint8Array([0xfe]) })),
        all: pairs(await c.kv.list()),
        reversed: pairs(await c.kv.list({ reverse: true, limit: 2 })),
      };
    },
    list: async (c) => pairs(await c.kv.list()),
    get: async (c, key) => c.kv.get(Array.isArray(key) ? new Uint8Array(key) : key),
  },
});

async function serve(t, dataDir, token) {
  const registry = setup({ use: { store }, port: 0, dataDir, disableSignalHandlers: true, inspector: { token } });
  const serving = registry.start();
  const { url } = await registry.listening();
  return {
    url,
    async stop() {
      await registry.shutdown();
      await serving;
    },
  };
}

test("KV keys are stored by core's codec, merged with a call's own writes, and shown decoded", async (t) => {
  const dataDir = tempDir(t);
  const token = "kv-test-token-0123456789";
  const server = await serve(t, dataDir, token);
  const handle = createClient(server.url).store.getOrCreate(["k"]);
  const all = [[BYTES, "bytes"], [PROBE, "probe"], ["p/2", 2]];
  assert.deepEqual(await handle.batch(), {
    strings: [["p/2", 2]],
    bytes: [[BYTES, "bytes"]],
    // Byte keys sort before string keys.
    all,
    reversed: [["p/2", 2], [PROBE, "probe"]],
  });
  assert.deepEqual(await handle.list(), all, "the same once committed");
  assert.equal(await handle.get(BYTES), "bytes");

  const inspector = createInspector(server.url, { token });
  const id = await handle.id();
  assert.deepEqual(pairs((await inspector.kv(id)).entries), all);
  assert.deepEqual(pairs((await inspector.kv(id, { prefix: "p/" })).entries), [["p/2", 2]]);
  assert.deepEqual(pairs((await inspector.kv(id, { prefix: new Uint8Array([0xfe, 0xed]) })).entries), [[BYTES, "bytes"]]);
  const raw = await fetch(`${server.url}/v1/inspector/actors/${id}/kv?prefix=kv-`, { headers: { authorization: `Bearer ${token}` } });
  assert.deepEqual(
    (await raw.json()).entries.map(({ key, keyType }) => ({ key, keyType })),
    [{ key: PROBE, keyType: "string" }],
  );
  await server.stop();

  // On disk: one tag byte (`s` for a string key, `b` for bytes), then the key, as before.
  const files = ["keel.db", "keel.db-wal"].map((name) => join(dataDir, name)).filter(existsSync);
  const bytes = Buffer.concat(files.map((path) => readFileSync(path)));
  assert.ok(bytes.includes(Buffer.from(`s${PROBE}`)), "the string key is stored tagged");
  assert.ok(bytes.includes(Buffer.from([0x62, ...BYTES])), "the byte key is stored tagged");

  const again = await serve(t, dataDir, token);
  assert.deepEqual(await createClient(again.url).store.getOrCreate(["k"]).list(), all, "a restart reads the same keys");
  await again.stop();
});
