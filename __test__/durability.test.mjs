// Durability across process restarts and hard kills, with the server in a child process.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createClient } from "keel";
import { join } from "node:path";
import { fixtures, startServer, tempDir, waitForLine } from "./helpers.mjs";

test("state survives a restart of the server", async (t) => {
  const dataDir = tempDir(t);
  const first = await startServer(t, { dataDir });
  const client = createClient(first.url);
  assert.equal(await client.counter.getOrCreate(["kept"]).increment(41), 41);
  first.kill("SIGTERM");
  await first.exited;

  const second = await startServer(t, { dataDir });
  assert.equal(await createClient(second.url).counter.getOrCreate(["kept"]).increment(1), 42);
  second.kill("SIGTERM");
  await second.exited;
});

test("kill -9 during acknowledged increments loses none of them", async (t) => {
  const dataDir = tempDir(t);
  const server = await startServer(t, { dataDir });
  const client = createClient(server.url);
  const target = 1000;
  let acknowledged = 0;
  let sent = 0;
  let killed = false;
  // Four writers on one actor keep several increments in flight when the kill lands.
  const writer = async () => {
    while (sent < target && !killed) {
      sent++;
      try {
        await client.counter.getOrCreate(["hard"]).increment(1);
        acknowledged++;
        if (acknowledged === 500) {
          killed = true;
          server.kill("SIGKILL");
        }
      } catch {
        // The server died under this request: it was never acknowledged.
      }
    }
  };
  await Promise.all([writer(), writer(), writer(), writer()]);
  const { signal } = await server.exited;
  assert.equal(signal, "SIGKILL");
  assert.ok(acknowledged >= 500, `only ${acknowledged} were acknowledged`);

  const restarted = await startServer(t, { dataDir });
  const count = await createClient(restarted.url).counter.getOrCreate(["hard"]).getCount();
  assert.ok(count >= acknowledged, `${acknowledged} acknowledged but only ${count} durable`);
  assert.ok(count <= sent, `${count} durable but only ${sent} sent`);
  // Keep going to 1,000 acknowledged on the restarted server, then check the total again.
  const more = target - count;
  for (let i = 0; i < more; i++) await createClient(restarted.url).counter.getOrCreate(["hard"]).increment(1);
  assert.equal(await createClient(restarted.url).counter.getOrCreate(["hard"]).getCount(), target);
  restarted.kill("SIGKILL");
  await restarted.exited;
  const last = await startServer(t, { dataDir });
  assert.equal(await createClient(last.url).counter.getOrCreate(["hard"]).getCount(), target);
  last.kill("SIGTERM");
  await waitForLine(last, "drained");
  await last.exited;
});

test("1,000 schedules survive kill -9 before they fall due, and each fires once", async (t) => {
  const dataDir = tempDir(t);
  const script = join(fixtures, "scheduler.mjs");
  const first = await startServer(t, { dataDir, script });
  const timer = createClient(first.url).timer.getOrCreate(["t"]);
  assert.equal(await timer.setMany(1000, 1500), 1000);
  // Every schedule was made before the reply, so all are due by then.
  const dueBy = Date.now() + 1500;
  first.kill("SIGKILL");
  assert.equal((await first.exited).signal, "SIGKILL");
  // Restart after they fell due (what is tested): every one fires at start-up.
  await new Promise((resolve) => setTimeout(resolve, Math.max(0, dueBy - Date.now()) + 1));
  const second = await startServer(t, { dataDir, script });
  const restarted = createClient(second.url).timer.getOrCreate(["t"]);
  const deadline = Date.now() + 20_000;
  let report;
  for (;;) {
    report = await restarted.report();
    if (report.distinct === 1000 || Date.now() > deadline) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.equal(report.distinct, 1000, "every schedule fired");
  // Each run commits together with its schedule's removal, so nothing fires twice here.
  assert.equal(report.total, 1000, "no schedule fired twice");
  assert.equal(await restarted.pending(), 0);
  second.kill("SIGTERM");
  await second.exited;
});
