// Sleeping actors cost no memory: 10,000 actors wake, sleep, and leave nothing behind.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { createClient } from "keel";
import { fixtures, startServer, tempDir } from "./helpers.mjs";

const MiB = 1024 * 1024;
const settle = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

test("10,000 actors created and asleep leave memory near the baseline", async (t) => {
  const server = await startServer(t, { dataDir: tempDir(t), script: join(fixtures, "many.mjs"), nodeArgs: ["--expose-gc"] });
  const client = createClient(server.url);
  const probe = () => client.probe.getOrCreate(["probe"]).memory();
  const allAsleep = async () => {
    const deadline = Date.now() + 30_000;
    for (;;) {
      const memory = await probe();
      if (memory.live <= 1) return; // only the probe is awake
      assert.ok(Date.now() < deadline, `${memory.live} actors still awake`);
      await settle(100);
    }
  };
  // What V8 and the allocators give back after the actors left is returned in the background,
  // sometimes seconds later, so a reading is the lowest seen over `ms` (or until `enough` says
  // it is low enough): memory a sleeping actor still held would be in every reading.
  const lowest = async (ms, enough = () => false) => {
    let low = await probe();
    for (const end = Date.now() + ms; Date.now() < end && !enough(low); ) {
      await settle(200);
      const memory = await probe();
      low = { ...low, rss: Math.min(low.rss, memory.rss), heapUsed: Math.min(low.heapUsed, memory.heapUsed) };
    }
    return low;
  };
  const wave = async (prefix, count) => {
    let next = 0;
    await Promise.all(
      Array.from({ length: 64 }, async () => {
        while (next < count) {
          const i = next++;
          assert.equal(await client.tiny.getOrCreate([`${prefix}-${i}`]).touch(), 1);
        }
      }),
    );
  };

  await wave("warm", 1000);
  await allAsleep();
  const baseline = await lowest(2000);
  await wave("first", 10_000);
  const peak = await probe();
  await allAsleep();
  const afterFirst = await lowest(2000);
  await wave("second", 10_000);
  await allAsleep();
  const bound = afterFirst.rss + 12 * MiB;
  const afterSecond = await lowest(10_000, (low) => low.rss < bound && low.heapUsed < baseline.heapUsed + 4 * MiB);
  t.diagnostic(`rss MiB: baseline ${(baseline.rss / MiB).toFixed(1)}, peak ${(peak.rss / MiB).toFixed(1)}, ` +
    `asleep ${(afterFirst.rss / MiB).toFixed(1)}, after 10,000 more ${(afterSecond.rss / MiB).toFixed(1)}`);

  // No JS object of a sleeping actor survives a full GC.
  assert.ok(afterFirst.heapUsed < baseline.heapUsed + 4 * MiB, `heap ${baseline.heapUsed} -> ${afterFirst.heapUsed}`);
  assert.ok(afterSecond.heapUsed < baseline.heapUsed + 4 * MiB, `heap ${baseline.heapUsed} -> ${afterSecond.heapUsed}`);
  // The process keeps what its busiest moment needed (allocator and V8 pools): each wave's is
  // the same, 64 actors awake at a time, since each goes to sleep after its call. Sleeping
  // actors themselves cost nothing: 10,000 more of them do not grow it.
  assert.ok(afterSecond.rss < bound, `rss grew ${(afterSecond.rss - afterFirst.rss) / MiB} MiB for 10,000 more sleeping actors`);
  assert.ok(afterFirst.rss <= peak.rss + 12 * MiB);
  server.kill("SIGTERM");
  await server.exited;
});

test("every awake actor's context shares one hidden class with the others", () => {
  // V8 keeps an object's accessors in its hidden class: getters made per context gave every
  // awake actor a hidden class of its own, about 2 KB each (bench/README.md, "Memory").
  const out = execFileSync(process.execPath, ["--allow-natives-syntax", join(fixtures, "shapes.mjs")], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"], timeout: 60_000 });
  const shapes = JSON.parse(out.trim().split("\n").pop());
  assert.deepEqual(shapes, { contexts: 6, ctx: true, conns: true, kv: true, schedule: true, stable: true, own: ["actorId,name,key"] });
});

test("an awake actor whose code only uses c.state holds none of c's methods", () => {
  // `c`'s methods and method groups (log, kv, schedule, broadcast, …) are made when the
  // instance's code first uses one; made for every context they were about 1.6 KB of V8's
  // live heap per awake actor (3.6 KB with them, 2.0 KB without, here).
  const out = execFileSync(process.execPath, ["--expose-gc", join(fixtures, "heap.mjs")], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"], timeout: 120_000 });
  const heap = JSON.parse(out.trim().split("\n").pop());
  assert.equal(heap.live, 2200);
  assert.ok(heap.bytesPerActor < 2800, `V8 heap per awake actor: ${heap.bytesPerActor} bytes`);
});
