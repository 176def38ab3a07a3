// How the binding wakes the JS thread for a batch of calls: keel's own libuv handle by
// default, Node's threadsafe function with KEEL_UV_DISPATCH=0. The handle must never keep a
// process (or a worker thread) alive, nor a registry that was let go of, and a throw from the
// JS host's dispatch fails the calls of its batch, as a structured error, on either route.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import { join } from "node:path";
import { setup } from "keel";
import { counter } from "./fixtures/counter.mjs";
import { fixtures, tempDir } from "./helpers.mjs";

const { JsHost } = createRequire(import.meta.url)("../dist/host.js");

function runScenario(t, scenario, { env = {}, nodeArgs = [] } = {}) {
  const dataDir = tempDir(t);
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...nodeArgs, join(fixtures, "wakeup.mjs"), scenario], {
      env: { ...process.env, KEEL_LOG: "warn", KEEL_DATA_DIR: dataDir, ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    // A child that hangs is the failure this file looks for: end it rather than the test run.
    const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (c) => (stdout += c));
    child.stderr.on("data", (c) => (stderr += c));
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      const facts = Object.fromEntries(stdout.trim().split("\n").map((line) => {
        const space = line.lastIndexOf(" ");
        return [line.slice(0, space), line.slice(space + 1)];
      }));
      resolve({ code, signal, stdout, stderr, facts, endedAt: Date.now() });
    });
  });
}

for (const [route, env] of [
  ["uv", {}],
  ["threadsafe", { KEEL_UV_DISPATCH: "0" }],
]) {
  test(`${route}: a serverless app that never shuts down exits on its own`, async (t) => {
    const result = await runScenario(t, "handler-no-shutdown", { env });
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.facts.route, route);
    assert.equal(result.facts.output, "3");
    const done = Number(result.facts.done);
    assert.ok(result.endedAt - done < 2000, `exited ${result.endedAt - done} ms after its work was done`);
  });

  test(`${route}: a worker thread's registry ends with its thread, and the process goes on`, async (t) => {
    const result = await runScenario(t, "worker", { env });
    assert.equal(result.code, 0, `${result.signal ?? ""} ${result.stderr}`);
    assert.equal(result.facts["worker route"], route);
    assert.equal(result.facts["worker output"], "3");
    assert.equal(result.facts["worker exit"], "0");
    assert.equal(result.facts.output, "3", "the main thread's own registry serves after the worker's ended");
  });
}

test("uv: a registry let go of without a shutdown is garbage collected", async (t) => {
  const result = await runScenario(t, "collect", { nodeArgs: ["--expose-gc"] });
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.facts.route, "uv");
  assert.equal(result.facts.collected, "true", "the binding kept the registry's JS side alive");
});

test("uv: a registry let go of after its shutdown is garbage collected", async (t) => {
  const result = await runScenario(t, "collect-after-shutdown", { nodeArgs: ["--expose-gc"] });
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.facts.collected, "true", "the binding kept the registry's JS side alive");
});

test("the route is read per registry: unset or 1 is the libuv handle, 0 the threadsafe function", (t) => {
  const saved = process.env.KEEL_UV_DISPATCH;
  t.after(() => {
    if (saved === undefined) delete process.env.KEEL_UV_DISPATCH;
    else process.env.KEEL_UV_DISPATCH = saved;
  });
  for (const [value, route] of [
    [undefined, "uv"],
    ["1", "uv"],
    ["0", "threadsafe"],
  ]) {
    if (value === undefined) delete process.env.KEEL_UV_DISPATCH;
    else process.env.KEEL_UV_DISPATCH = value;
    const registry = setup({ use: { counter }, dataDir: tempDir(t), disableSignalHandlers: true });
    assert.equal(registry.native.dispatchRoute, route, `KEEL_UV_DISPATCH=${value}`);
  }
});

for (const [route, value] of [
  ["uv", "1"],
  ["threadsafe", "0"],
]) {
  test(`${route}: a throw from the JS host's dispatch fails its call as actor.internal_error; the next call runs`, async (t) => {
    const saved = process.env.KEEL_UV_DISPATCH;
    process.env.KEEL_UV_DISPATCH = value;
    const registry = setup({ use: { counter }, dataDir: tempDir(t), disableSignalHandlers: true });
    if (saved === undefined) delete process.env.KEEL_UV_DISPATCH;
    else process.env.KEEL_UV_DISPATCH = saved;
    assert.equal(registry.native.dispatchRoute, route);
    t.after(() => registry.shutdown());
    const call = (amount) =>
      registry.handler(
        new Request("http://local/v1/actors/counter/actions/increment", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ key: ["boom"], args: [amount] }),
        }),
      );
    assert.equal((await (await call(1)).json()).output, 1);
    // `run` is what dispatch calls for each invocation; a synchronous throw escapes dispatch.
    const run = JsHost.prototype.run;
    let thrown = 0;
    JsHost.prototype.run = function (invocation) {
      if (invocation.kind === "action" && thrown === 0) {
        thrown += 1;
        throw new Error("dispatch broke");
      }
      return run.call(this, invocation);
    };
    t.after(() => (JsHost.prototype.run = run));
    const failed = await call(10);
    assert.equal(thrown, 1);
    assert.equal(failed.status, 500);
    const body = await failed.json();
    assert.equal(body.group, "actor");
    assert.equal(body.code, "internal_error");
    // The failed call never ran: the next one sees the state before it.
    assert.equal((await (await call(1)).json()).output, 2);
  });
}
