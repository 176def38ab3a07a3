// The registry state machine from JS: every reachable cell of the table, serverless mode,
// idempotent shutdown, and processes that exit on their own.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { join } from "node:path";
import { setup, createClient } from "keel";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { counter, callEvents } from "./fixtures/counter.mjs";
import { fixtures, startServer, tempDir } from "./helpers.mjs";

function registryIn(t, options = {}) {
  return setup({ use: { counter }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, ...options });
}

function call(registry, action, body) {
  return registry.handler(
    new Request(`http://serverless.test/v1/actors/counter/actions/${action}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    }),
  );
}

test("serve mode: start, a second start, handler, shutdown, and start after shutdown", async (t) => {
  const registry = registryIn(t);
  assert.equal(registry.state, "idle");
  const serving = registry.start();
  const { url } = await registry.listening();
  assert.equal(registry.state, "running_serve");
  await assert.rejects(registry.start(), { group: "registry", code: "already_running" });
  const wrong = await call(registry, "increment", { key: ["a"] });
  assert.equal(wrong.status, 409);
  assert.equal((await wrong.json()).code, "wrong_mode");
  assert.equal(await createClient(url).counter.getOrCreate(["a"]).increment(1), 1);

  await registry.shutdown();
  assert.equal(await serving, undefined, "the serve promise resolves after a clean drain");
  assert.equal(registry.state, "shutting_down");
  await assert.rejects(registry.start(), { group: "registry", code: "shut_down" });
  const after = await call(registry, "increment", { key: ["a"] });
  assert.equal(after.status, 503);
  assert.equal((await after.json()).code, "shut_down");
  await registry.shutdown(); // idempotent
});

test("serverless mode: 20 concurrent first calls build once and all succeed", async (t) => {
  const registry = registryIn(t);
  const responses = await Promise.all(
    Array.from({ length: 20 }, (_, i) => call(registry, "increment", { key: [`k${i % 5}`], args: [1] })),
  );
  for (const response of responses) assert.equal(response.status, 200);
  const outputs = await Promise.all(responses.map((r) => r.json()));
  assert.equal(outputs.reduce((sum, { output }) => sum + (output === 4 ? 1 : 0), 0), 5, "each of 5 actors reached 4");
  assert.equal(registry.buildCount, 1);
  assert.equal(registry.state, "running_serverless");
  await assert.rejects(registry.start(), { group: "registry", code: "wrong_mode" });

  const health = await registry.handler(new Request("http://serverless.test/health"));
  assert.deepEqual([health.status, await health.json()], [200, { status: "ok" }]);
  const missing = await call(registry, "nope", { key: [] });
  assert.deepEqual([missing.status, (await missing.json()).code], [404, "action_not_found"]);

  await registry.shutdown();
  assert.equal(registry.state, "shutting_down");
  const after = await call(registry, "increment", { key: ["k0"] });
  assert.equal(after.status, 503);
});

test("serverless mode checks its options and resolves its host name once, not per request", async (t) => {
  // A host name, not an address, so that resolving it means a lookup.
  const registry = registryIn(t, { host: "localhost" });
  for (let i = 1; i <= 5; i++) {
    const response = await call(registry, "increment", { key: ["once"], args: [1] });
    assert.deepEqual([response.status, await response.json()], [200, { output: i }]);
  }
  const health = await registry.handler(new Request("http://serverless.test/health"));
  assert.equal(health.status, 200);
  assert.equal(registry.optionResolutions, 1, "six requests, one resolution");
  await registry.shutdown();
});

test("shutdown from idle is immediate and final", async (t) => {
  const registry = registryIn(t);
  await registry.shutdown();
  assert.equal(registry.state, "shutting_down");
  await assert.rejects(registry.start(), { code: "shut_down" });
  assert.equal(registry.buildCount, 0);
});

test("a failed serverless build leaves the registry idle, and a retry succeeds", async (t) => {
  const dataDir = tempDir(t);
  const holder = registryIn(t, { dataDir });
  holder.start();
  await holder.listening();
  const registry = registryIn(t, { dataDir });
  const failed = await Promise.all([call(registry, "increment", { key: ["r"] }), call(registry, "increment", { key: ["r"] })]);
  for (const response of failed) {
    assert.equal(response.status, 503);
    assert.equal((await response.json()).code, "locked");
  }
  assert.equal(registry.state, "idle");
  await holder.shutdown();
  const retried = await call(registry, "increment", { key: ["r"] });
  assert.equal(retried.status, 200);
  await registry.shutdown();
});

test("two concurrent shutdown() calls both resolve only after the drain", async (t) => {
  const registry = registryIn(t);
  registry.start();
  const { url } = await registry.listening();
  let finished = false;
  const running = once(callEvents, "started");
  const slow = createClient(url)
    .counter.getOrCreate(["slow"])
    .slowIncrement(400)
    .then((value) => {
      finished = true;
      return value;
    });
  // Shut down only once the action is running.
  await running;
  const order = [];
  await Promise.all([
    registry.shutdown().then(() => order.push(["first", finished])),
    registry.shutdown().then(() => order.push(["second", finished])),
  ]);
  assert.deepEqual(order.map(([, done]) => done), [true, true]);
  assert.equal(await slow, 1);
});

test("a script that starts and then awaits shutdown() exits on its own", async (t) => {
  const dataDir = tempDir(t);
  const result = await runScriptIn(dataDir, "start-then-shutdown");
  assert.equal(result.code, 0, result.stderr);
  const shutAt = Number(/shut down (\d+)/.exec(result.stdout)[1]);
  assert.ok(result.endedAt - shutAt < 1000, `exited ${result.endedAt - shutAt} ms after shutdown`);
});

test("a handler()-only app installs no signal listeners and exits on its own", async (t) => {
  const result = await runScriptIn(tempDir(t), "handler-only");
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /^200 \{"output":2\}$/m);
  assert.match(result.stdout, /^listeners SIGINT=0 SIGTERM=0$/m);
});

test("start() twice: the second is refused and one listener per signal is installed", async (t) => {
  const server = await startServer(t, { dataDir: tempDir(t), script: join(fixtures, "script.mjs"), args: ["start-twice"] });
  assert.ok(server.lines.includes("second start: registry.already_running"), server.lines.join("\n"));
  assert.ok(server.lines.includes("listeners SIGINT=1 SIGTERM=1"), server.lines.join("\n"));
  server.kill("SIGINT");
  assert.equal((await server.exited).signal, "SIGINT");
});

function runScriptIn(dataDir, scenario) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [join(fixtures, "script.mjs"), scenario], {
      env: { ...process.env, KEEL_LOG: "warn", KEEL_DATA_DIR: dataDir },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (c) => (stdout += c));
    child.stderr.on("data", (c) => (stderr += c));
    child.on("close", (code, signal) => resolve({ code, signal, stdout, stderr, endedAt: Date.now() }));
  });
}

const canUnshare = spawnSync("unshare", ["-fp", "--mount-proc", "true"]).status === 0;

test("as PID 1, SIGTERM ends the server with status 143", { skip: !canUnshare && "unshare is not available" }, async (t) => {
  const dataDir = tempDir(t);
  const child = spawn("unshare", ["-fp", "--mount-proc", process.execPath, join(fixtures, "server.mjs")], {
    env: { ...process.env, KEEL_LOG: "warn", KEEL_DATA_DIR: dataDir, KEEL_PORT: "0" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  t.after(() => child.kill("SIGKILL"));
  const exited = new Promise((resolve) => child.on("close", (code, signal) => resolve({ code, signal })));
  let stdout = "";
  await new Promise((resolve, reject) => {
    child.stdout.on("data", (c) => {
      stdout += c;
      if (/listening \d+/.test(stdout)) resolve();
    });
    exited.then(() => reject(new Error("exited before listening")));
  });
  // The node process is unshare's child; from here it has an ordinary pid.
  const pgrep = spawnSync("pgrep", ["-P", String(child.pid)], { encoding: "utf8" });
  const nodePid = Number(pgrep.stdout.trim().split("\n")[0]);
  assert.ok(nodePid > 0, "found the node process");
  process.kill(nodePid, "SIGTERM");
  const { code } = await exited;
  assert.equal(code, 143);
});

test("start-up errors are structured: a port in use, a bad option, a bad grace period", async (t) => {
  const holder = registryIn(t);
  holder.start();
  const { port } = await holder.listening();
  const clash = registryIn(t, { port });
  await assert.rejects(clash.start(), { group: "registry", code: "address_in_use" });
  await assert.rejects(clash.listening(), { code: "address_in_use" });
  await clash.shutdown();
  await holder.shutdown();

  const fractional = registryIn(t, { port: 1.5 });
  await assert.rejects(fractional.start(), { group: "registry", code: "invalid_config", message: /port must be a whole number/ });
  await assert.rejects(fractional.listening(), { code: "invalid_config" });
  const negative = registryIn(t, { actionTimeoutMs: -1 });
  await assert.rejects(negative.start(), { code: "invalid_config" });
  const grace = setup({ use: { counter }, port: 0, dataDir: tempDir(t), drainTimeoutMs: 40_000 });
  await assert.rejects(grace.start(), { code: "invalid_config", message: /gracePeriodMs \(30000\) must exceed drainTimeoutMs \(40000\)/ });
  // Without signal handlers there is no grace period to check.
  const noSignals = registryIn(t, { drainTimeoutMs: 40_000 });
  noSignals.start();
  await noSignals.listening();
  for (const r of [fractional, negative, grace, noSignals]) await r.shutdown();
});

test("the serverless handler strips its basePath, and a wrong method is 405", async (t) => {
  const registry = registryIn(t, { basePath: "/api/keel/" });
  const mounted = await registry.handler(
    new Request("http://host.test/api/keel/v1/actors/counter/actions/increment", { method: "POST", headers: { "content-type": "application/json" }, body: '{"key":["m"],"args":[3]}' }),
  );
  assert.deepEqual([mounted.status, await mounted.json()], [200, { output: 3 }]);
  const wrongMethod = await registry.handler(new Request("http://host.test/api/keel/v1/actors/counter/actions/increment"));
  assert.equal(wrongMethod.status, 405);
  assert.equal((await wrongMethod.json()).code, "method_not_allowed");
  const positional = await registry.handler(
    new Request("http://host.test/api/keel/v1/actors/counter/actions/increment", { method: "POST", headers: { "content-type": "application/json" }, body: '[["m"],[1]]' }),
  );
  assert.equal(positional.status, 400);
  await registry.shutdown();
});

test("the numeric options' defaults and ranges come from core's one table, and the docs say the same", async (t) => {
  const { optionSpecs } = createRequire(import.meta.url)("../index.js");
  const specs = new Map(optionSpecs().map((spec) => [spec.name, spec]));
  const docs = readFileSync(new URL("../docs/configuration.md", import.meta.url), "utf8");
  const source = readFileSync(new URL("../ts/registry.ts", import.meta.url), "utf8");
  for (const name of ["port", "drainTimeoutMs", "gracePeriodMs", "actionTimeoutMs", "hookTimeoutMs", "sleepTimeoutMs", "maxBodyBytes", "maxMailboxLen", "maxKeySegmentBytes", "maxKeyBytes", "bodyTimeoutMs", "lingerMs"]) {
    const spec = specs.get(name);
    assert.ok(spec, `core defines ${name}`);
    const row = docs.match(new RegExp(`^\\| \`${name}\` \\| number \\| \`(\\d+)\``, "m"));
    assert.ok(row, `configuration.md lists ${name}`);
    assert.equal(Number(row[1]), spec.default, `configuration.md's default of ${name}`);
    const comment = source.match(new RegExp(`Default (\\d[\\d_]*)\\.[^\\n]*\\n\\s*${name}\\?:`));
    if (comment) assert.equal(Number(comment[1].replaceAll("_", "")), spec.default, `registry.ts's doc comment on ${name}`);
    // The range core enforces is the one JS reports.
    const registry = registryIn(t, { [name]: spec.max + 1 });
    await assert.rejects(registry.start(), {
      code: "invalid_config",
      message: `${name} must be a whole number from ${spec.min} to ${spec.max}, not ${spec.max + 1}`,
    });
    await registry.shutdown();
  }
});
