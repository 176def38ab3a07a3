// A real full disk: a small tmpfs holds the data directory. Commits refused for lack of
// space change nothing (not the database, not the actor's memory), keel commits again once
// space is freed, without a restart, and a restart finds exactly the acknowledged writes.
// Mounting needs root; without it the test is skipped with a message.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, unlinkSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { actor, setup, createClient, KeelError } from "keel";

const tally = actor({
  state: { count: 0 },
  actions: {
    add: async (c) => {
      c.state.count += 1;
      await c.kv.put(`n${c.state.count}`, c.state.count);
      return c.state.count;
    },
    count: (c) => c.state.count,
    keys: async (c) => (await c.kv.list()).map(([key]) => key),
  },
});

/** Mounts a tmpfs of `size` on a fresh directory, or returns undefined if that is not allowed. */
function mountTmpfs(t, size) {
  const dir = mkdtempSync(join(tmpdir(), "keel-full-"));
  const mnt = join(dir, "mnt");
  mkdirSync(mnt);
  try {
    execFileSync("mount", ["-t", "tmpfs", "-o", `size=${size}`, "tmpfs", mnt], { stdio: "pipe" });
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    return { skipped: String(err.stderr || err.message).trim() };
  }
  t.after(() => {
    // Lazy, so that a file still open somewhere cannot keep the mount around.
    execFileSync("umount", ["-l", mnt]);
    rmSync(dir, { recursive: true, force: true });
  });
  return { mnt };
}

/** Writes a file until the filesystem has no space left. */
function fill(path) {
  const fd = openSync(path, "w");
  try {
    for (const size of [1 << 16, 512, 1]) {
      const chunk = Buffer.alloc(size, 0x5a);
      try {
        for (;;) writeSync(fd, chunk);
      } catch (err) {
        if (err.code !== "ENOSPC") throw err;
      }
    }
  } finally {
    closeSync(fd);
  }
}

async function start(dataDir) {
  const registry = setup({ use: { tally }, port: 0, dataDir, disableSignalHandlers: true });
  const serving = registry.start();
  const { url } = await registry.listening();
  return {
    handle: createClient(url).tally.getOrCreate(["disk"]),
    stop: async () => {
      await registry.shutdown();
      await serving;
    },
  };
}

test("a full disk refuses commits without changing anything, and keel recovers when space is freed", async (t) => {
  const { mnt, skipped } = mountTmpfs(t, "4m");
  if (skipped !== undefined) {
    t.skip(`cannot mount a tmpfs (needs root): ${skipped}`);
    return;
  }
  const dataDir = join(mnt, "data");
  const filler = join(mnt, "filler");
  const first = await start(dataDir);
  try {
    const { handle } = first;
    for (let i = 1; i <= 3; i++) assert.equal(await handle.add(), i);

    fill(filler);
    for (let i = 0; i < 3; i++) {
      await assert.rejects(handle.add(), (err) => {
        assert.ok(err instanceof KeelError, String(err));
        assert.equal(`${err.group}.${err.code}`, "storage.sqlite");
        return true;
      });
    }
    // The refused increments are gone from the actor's memory as well as from disk.
    assert.equal(await handle.count(), 3);
    assert.deepEqual(await handle.keys(), ["n1", "n2", "n3"]);

    // Space comes back: the same process commits again.
    unlinkSync(filler);
    assert.equal(await handle.add(), 4);
    assert.equal(await handle.count(), 4);
  } finally {
    await first.stop();
  }

  const second = await start(dataDir);
  try {
    assert.equal(await second.handle.count(), 4);
    assert.deepEqual(await second.handle.keys(), ["n1", "n2", "n3", "n4"]);
  } finally {
    await second.stop();
  }
});
