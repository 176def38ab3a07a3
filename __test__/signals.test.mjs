// Signal handling of `registry.start()`, with real signals to real child processes.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createClient } from "keel";
import { startServer, tempDir } from "./helpers.mjs";

/** Resolves once `count` slow or hanging calls are running inside the child at `url`. */
async function callsStarted(url, count) {
  const probe = createClient(url).counter.getOrCreate(["probe"]);
  const deadline = Date.now() + 10_000;
  while ((await probe.startedCalls()) < count) {
    assert.ok(Date.now() < deadline, "the calls did not start");
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

test("SIGINT drains in-flight actions, persists them, and exits by SIGINT", async (t) => {
  const dataDir = tempDir(t);
  const server = await startServer(t, { dataDir });
  const client = createClient(server.url);
  const inFlight = ["a", "b", "c"].map((key) => client.counter.getOrCreate([key]).slowIncrement(1000));
  await callsStarted(server.url, 3);
  const signalledAt = Date.now();
  server.kill("SIGINT");
  assert.deepEqual(await Promise.all(inFlight), [1, 1, 1]);
  const { code, signal } = await server.exited;
  assert.deepEqual({ code, signal }, { code: null, signal: "SIGINT" });
  // The fixture's drain timeout is 5 s: the exit comes within it plus a second.
  assert.ok(Date.now() - signalledAt < 6000, `exit took ${Date.now() - signalledAt} ms`);
  assert.ok(server.lines.includes("drained"), "the serve promise resolved before the exit");

  const again = await startServer(t, { dataDir });
  const after = createClient(again.url);
  for (const key of ["a", "b", "c"]) assert.equal(await after.counter.getOrCreate([key]).getCount(), 1);
  again.kill("SIGTERM");
  assert.equal((await again.exited).signal, "SIGTERM");
});

test("a second SIGINT during a blocked drain exits at once", async (t) => {
  const server = await startServer(t, { dataDir: tempDir(t), env: { FIXTURE_DRAIN_TIMEOUT_MS: "20000", FIXTURE_GRACE_PERIOD_MS: "30000" } });
  const client = createClient(server.url);
  client.counter.getOrCreate(["stuck"]).hang().catch(() => {});
  await callsStarted(server.url, 1);
  server.kill("SIGINT");
  // What is tested is that nothing happens for a while: the first signal waits for the drain.
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(server.exitCode, null, "the first signal waits for the drain");
  const sentAt = Date.now();
  server.kill("SIGINT");
  const { signal } = await server.exited;
  assert.equal(signal, "SIGINT");
  assert.ok(Date.now() - sentAt < 2000, `exit took ${Date.now() - sentAt} ms`);
});

test("a drain that cannot finish is forced, and the process still exits by its signal", async (t) => {
  const server = await startServer(t, {
    dataDir: tempDir(t),
    env: { FIXTURE_DRAIN_TIMEOUT_MS: "900", FIXTURE_GRACE_PERIOD_MS: "1000" },
  });
  createClient(server.url).counter.getOrCreate(["stuck"]).hang().catch(() => {});
  await callsStarted(server.url, 1);
  const sentAt = Date.now();
  server.kill("SIGTERM");
  const { signal } = await server.exited;
  const took = Date.now() - sentAt;
  assert.equal(signal, "SIGTERM");
  assert.ok(took >= 800 && took < 3000, `exit took ${took} ms`);
});

test("disableSignalHandlers installs no listeners", async (t) => {
  const server = await startServer(t, { dataDir: tempDir(t), env: { FIXTURE_NO_SIGNALS: "1", FIXTURE_REPORT_LISTENERS: "1" } });
  assert.ok(server.lines.includes("listeners SIGINT=0 SIGTERM=0"), server.lines.join("\n"));
  server.kill("SIGKILL");
  await server.exited;
});

test("start() installs one listener per signal", async (t) => {
  const server = await startServer(t, { dataDir: tempDir(t), env: { FIXTURE_REPORT_LISTENERS: "1" } });
  assert.ok(server.lines.includes("listeners SIGINT=1 SIGTERM=1"), server.lines.join("\n"));
  server.kill("SIGTERM");
  assert.equal((await server.exited).signal, "SIGTERM");
});
