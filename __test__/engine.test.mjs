// keel in engine mode against the real Rivet Engine binary (the npm devDependency): the
// engine on loopback-only random ports with a temp data dir and telemetry off, keel as a
// child process serving the counter app through the engine's gateway.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "keel/client";
import { fixtures, startServer, tempDir } from "./helpers.mjs";
import { runConformance } from "./conformance.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const engineBinary =
  process.env.KEEL_RIVET_ENGINE ?? join(root, "node_modules/@rivetkit/engine-cli-linux-x64-musl/rivet-engine");
const engineServer = join(fixtures, "engine-server.mjs");
const conformanceServer = join(fixtures, "conformance-server.mjs");

/** How long one harness step may take before the test fails: a bound on a hang. */
const STEP_MS = 30_000;

/** Every child started here, killed when this process exits however it exits. */
const children = new Set();
process.on("exit", () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
});

async function freePorts(count) {
  const servers = await Promise.all(
    Array.from({ length: count }, () => new Promise((resolve) => {
      const server = createServer();
      server.listen(0, "127.0.0.1", () => resolve(server));
    })),
  );
  const ports = servers.map((server) => server.address().port);
  await Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve))));
  return ports;
}

/** Retries `attempt` until it returns a value other than undefined, within STEP_MS. */
async function until(what, attempt) {
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    const value = await attempt().catch(() => undefined);
    if (value !== undefined) return value;
    assert.ok(Date.now() < deadline, `${what} did not happen within ${STEP_MS} ms`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/** Starts an engine, waits for /health and upserts the `default` pool's runner config. */
async function startEngine(t, pegboard = {}) {
  assert.ok(
    existsSync(engineBinary),
    `the Rivet Engine binary is missing at ${engineBinary}: run \`npm install\` in the repository root ` +
      "(it is the devDependency @rivetkit/engine-cli-linux-x64-musl), or set KEEL_RIVET_ENGINE",
  );
  const dir = tempDir(t);
  const [guard, apiPeer, metrics] = await freePorts(3);
  // Every listener on 127.0.0.1 (the engine binds all interfaces by default), no telemetry
  // (on by default).
  writeFileSync(
    join(dir, "engine.json"),
    JSON.stringify({
      guard: { host: "127.0.0.1", port: guard },
      api_peer: { host: "127.0.0.1", port: apiPeer },
      metrics: { host: "127.0.0.1", port: metrics },
      telemetry: { enabled: false },
      pegboard,
      file_system: { path: join(dir, "db") },
    }),
  );
  const child = spawn(engineBinary, ["start", "--config", join(dir, "engine.json")], {
    cwd: dir,
    env: { ...process.env, RUST_LOG: "warn" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  child.stderr.on("data", (chunk) => (log = (log + chunk).slice(-8000)));
  children.add(child);
  const exited = new Promise((resolve) => child.on("close", resolve));
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    await exited;
    children.delete(child);
  });
  const url = `http://127.0.0.1:${guard}`;
  try {
    await until("the engine's /health", async () => ((await fetch(`${url}/health`)).ok ? true : undefined));
    // `/health` answers before the `default` namespace exists: retry until it does.
    await until("the runner config upsert", async () => {
      const response = await fetch(`${url}/runner-configs/default?namespace=default`, {
        method: "PUT",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ datacenters: { default: { normal: {}, drain_on_version_upgrade: true } } }),
      });
      return response.ok ? true : undefined;
    });
  } catch (err) {
    err.message += `\nengine log:\n${log}`;
    throw err;
  }
  return { url, guard };
}

/** keel in engine mode, as a child process; resolves once the engine accepted it. */
async function startKeel(t, engine, env = {}, script = engineServer) {
  const keel = await startServer(t, {
    dataDir: tempDir(t),
    script,
    env: { KEEL_ENGINE_ENDPOINT: engine.url, ...env },
  });
  children.add(keel);
  keel.exited.then(() => children.delete(keel));
  return keel;
}

/** Calls `action` on the actor `name`/`key` through the gateway (getOrCreate by key). */
async function gateway(engine, name, key, action, args = []) {
  const query = `rvt-namespace=default&rvt-method=getOrCreate&rvt-runner=default&rvt-key=${encodeURIComponent(key)}`;
  const response = await fetch(`${engine.url}/gateway/${name}/action/${action}?${query}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ args }),
  });
  const text = await response.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  return { status: response.status, body };
}

test("100 increments through the engine's gateway answer 1..100, and errors are keel's JSON bodies", async (t) => {
  const engine = await startEngine(t);
  await startKeel(t, engine);
  const outputs = [];
  for (let i = 0; i < 100; i++) {
    const { status, body } = await gateway(engine, "counter", "k1", "increment");
    assert.equal(status, 200, JSON.stringify(body));
    outputs.push(body.output);
  }
  assert.deepEqual(outputs, Array.from({ length: 100 }, (_, i) => i + 1));
  const refused = await gateway(engine, "counter", "k1", "refuse");
  assert.equal(refused.status, 400);
  assert.equal(refused.body.group, "user");
  assert.equal(refused.body.code, "forbidden");
  // The refused call changed nothing.
  assert.deepEqual((await gateway(engine, "counter", "k1", "getCount")).body, { output: 100 });
  const unknown = await gateway(engine, "counter", "k1", "noSuchAction");
  assert.equal(unknown.status, 404);
  assert.equal(typeof unknown.body.code, "string");
});

test("c.sleep() puts the actor to sleep through the engine, and the next call wakes it with its state", async (t) => {
  const engine = await startEngine(t);
  await startKeel(t, engine);
  for (let i = 1; i <= 3; i++) assert.deepEqual((await gateway(engine, "napper", "n1", "increment")).body, { output: i });
  const before = (await gateway(engine, "napper", "n1", "status")).body.output;
  assert.equal(before.wakes, 1);
  assert.deepEqual((await gateway(engine, "napper", "n1", "nap")).body, { output: 3 });
  // The engine records the sleep once keel's intent reached it and the stop completed.
  await until("the engine marking the actor asleep", async () => {
    const response = await fetch(`${engine.url}/actors?namespace=default&actor_ids=${before.actorId}`);
    const { actors } = await response.json();
    return actors?.[0]?.sleep_ts ? true : undefined;
  });
  const after = (await gateway(engine, "napper", "n1", "status")).body.output;
  assert.equal(after.actorId, before.actorId);
  assert.equal(after.count, 3, "the state survived the sleep");
  assert.equal(after.wakes, 2, "a new activation ran onWake");
  assert.deepEqual((await gateway(engine, "napper", "n1", "increment")).body, { output: 4 });
});

test("a schedule fires through engine storage while its actor is awake", async (t) => {
  const engine = await startEngine(t);
  await startKeel(t, engine);
  assert.equal((await gateway(engine, "napper", "s1", "later", [20])).status, 200);
  await until("the scheduled increment", async () => {
    const { body } = await gateway(engine, "napper", "s1", "status");
    return body.output.count === 1 ? true : undefined;
  });
});

test("a schedule that fell due while its actor slept fires when the actor is started again", async (t) => {
  const engine = await startEngine(t);
  await startKeel(t, engine);
  const { actorId } = (await gateway(engine, "napper", "s2", "status")).body.output;
  // Due in 1 ms, asleep at once: it falls due after this activation has stopped (no engine
  // alarm wakes the actor yet), so only the next start can fire it.
  assert.equal((await gateway(engine, "napper", "s2", "laterAsleep", [1])).status, 200);
  await until("the engine marking the actor asleep", async () => {
    const { actors } = await (await fetch(`${engine.url}/actors?namespace=default&actor_ids=${actorId}`)).json();
    return actors?.[0]?.sleep_ts ? true : undefined;
  });
  await until("the overdue increment after the wake", async () => {
    const { body } = await gateway(engine, "napper", "s2", "status");
    return body.output.count === 1 ? true : undefined;
  });
});

test("kill -9 of keel during acknowledged increments loses none of them: the pool's other keel takes over", async (t) => {
  // The engine declares a vanished envoy lost after 2 s (15 s by default), then starts its
  // actors on another envoy of the pool.
  const engine = await startEngine(t, { envoy_lost_threshold: 2000 });
  const owner = await startKeel(t, engine);
  assert.deepEqual((await gateway(engine, "counter", "k2", "increment")).body, { output: 1 });
  // Started after the actor is placed, so the actor lives on `owner`.
  const standby = await startKeel(t, engine);
  let acknowledged = 1;
  let stop = false;
  const calls = (async () => {
    while (!stop) {
      const { status, body } = await gateway(engine, "counter", "k2", "increment").catch(() => ({ status: 0 }));
      if (status === 200) acknowledged = Math.max(acknowledged, body.output);
    }
  })();
  await until("20 acknowledged increments", async () => (acknowledged >= 20 ? true : undefined));
  owner.kill("SIGKILL");
  await owner.exited;
  stop = true;
  await calls;
  const { status, body } = await gateway(engine, "counter", "k2", "getCount");
  assert.equal(status, 200, JSON.stringify(body) + standby.stderrText);
  // Every acknowledged increment is there; the one in flight at the kill may have landed.
  assert.ok(body.output >= acknowledged && body.output <= acknowledged + 1, `count ${body.output}, acknowledged ${acknowledged}`);
  assert.equal(standby.exitCode, null);
});

test("SIGTERM tells the engine, stops the actors as going away, and exits by the signal", async (t) => {
  const engine = await startEngine(t);
  const keel = await startKeel(t, engine);
  for (let i = 1; i <= 5; i++) assert.deepEqual((await gateway(engine, "counter", "k3", "increment")).body, { output: i });
  keel.kill("SIGTERM");
  const { code, signal } = await keel.exited;
  assert.deepEqual({ code, signal }, { code: null, signal: "SIGTERM" });
  assert.ok(keel.lines.includes("drained"), "the start() promise resolved before the exit");
  // Left asleep, not destroyed: the next envoy wakes it with its state.
  await startKeel(t, engine);
  assert.deepEqual((await gateway(engine, "counter", "k3", "getCount")).body, { output: 5 });
});

test("conformance: through the engine's gateway, the typed client not told it is an engine", async (t) => {
  const engine = await startEngine(t);
  await startKeel(t, engine, {}, conformanceServer);
  await runConformance(t, { mode: "engine", url: engine.url, client: createClient(engine.url) });
});
