// Damage inside a stored state reaches the caller as storage.corrupt for its actor, never as
// an error of user code: the real addon, a real SQLite file damaged between two runs. SQLite
// does not notice either damage (the row keeps its length); core's check of the value, with
// the rules of keel's decoder, does.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { actor, setup, createClient, KeelError } from "keel";
import { tempDir } from "./helpers.mjs";

// 20 bytes each, so their CBOR text heads are 0x74.
const MARKER = "damage-me-0123456789";
const TRUNCATED = "truncate-0123456789!";

const notebook = actor({
  state: { note: "" },
  actions: {
    write: (c, note) => {
      c.state.note = note;
      return note;
    },
    read: (c) => c.state.note,
  },
});

async function run(dataDir, body) {
  const registry = setup({ use: { notebook }, port: 0, dataDir, disableSignalHandlers: true, dev: true });
  const serving = registry.start();
  try {
    const { url } = await registry.listening();
    return await body(createClient(url));
  } finally {
    await registry.shutdown();
    await serving;
  }
}

/** Replaces every copy of `original` in keel.db and its WAL with `damaged`, of the same length. */
function damage(dataDir, original, damaged) {
  assert.equal(damaged.length, original.length);
  let replaced = 0;
  for (const name of ["keel.db", "keel.db-wal"]) {
    const path = join(dataDir, name);
    if (!existsSync(path)) continue;
    const bytes = readFileSync(path);
    for (let at = bytes.indexOf(original); at >= 0; at = bytes.indexOf(original, at + 1)) {
      damaged.copy(bytes, at);
      replaced++;
    }
    writeFileSync(path, bytes);
  }
  assert.ok(replaced > 0, "the state was found in the files");
}

const text20 = (text) => Buffer.concat([Buffer.of(0x74), Buffer.from(text)]);

test("a stored state with a tag keel's decoder does not know is storage.corrupt for its actor", async (t) => {
  const dataDir = tempDir(t);
  const actorId = await run(dataDir, async (client) => {
    assert.equal(await client.notebook.getOrCreate(["damaged"]).write(MARKER), MARKER);
    assert.equal(await client.notebook.getOrCreate(["intact"]).write("fine"), "fine");
    return client.notebook.getOrCreate(["damaged"]).resolve();
  });
  // The marker's text string becomes tag 99 around an 18-byte text string: the same length
  // and well-formed CBOR, but keel's decoder knows no tag 99.
  damage(dataDir, text20(MARKER), Buffer.concat([Buffer.of(0xd8, 99, 0x72), Buffer.from(MARKER.slice(0, 18))]));

  await run(dataDir, async (client) => {
    for (let attempt = 0; attempt < 2; attempt++) {
      await assert.rejects(client.notebook.get(["damaged"]).read(), (err) => {
        assert.ok(err instanceof KeelError);
        assert.equal(err.fullCode, "storage.corrupt");
        assert.deepEqual(err.metadata, { actorId });
        assert.match(err.message, /the stored state of actor [0-9a-f]{32} \(27 bytes\) is not well-formed cbor/);
        return true;
      });
    }
    // Only that actor is affected.
    assert.equal(await client.notebook.get(["intact"]).read(), "fine");
  });
});

test("a truncated stored state is storage.corrupt for its actor", async (t) => {
  const dataDir = tempDir(t);
  const actorId = await run(dataDir, async (client) => {
    assert.equal(await client.notebook.getOrCreate(["cut"]).write(TRUNCATED), TRUNCATED);
    return client.notebook.getOrCreate(["cut"]).resolve();
  });
  // The text head now claims 21 bytes, one more than the state holds.
  damage(dataDir, text20(TRUNCATED), Buffer.concat([Buffer.of(0x75), Buffer.from(TRUNCATED)]));

  await run(dataDir, async (client) => {
    await assert.rejects(client.notebook.get(["cut"]).read(), (err) => {
      assert.ok(err instanceof KeelError);
      assert.equal(err.fullCode, "storage.corrupt");
      assert.deepEqual(err.metadata, { actorId });
      assert.match(err.message, /is not well-formed cbor/);
      return true;
    });
  });
});
