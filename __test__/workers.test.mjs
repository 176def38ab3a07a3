// The binding's tokio runtime: KEEL_WORKER_THREADS sets its worker count when the addon loads,
// and a value that is not a count is a structured error from start(), not a crash.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import { startServer, tempDir } from "./helpers.mjs";

const addon = createRequire(import.meta.url).resolve("../index.js");

test("KEEL_WORKER_THREADS sets how many tokio workers run core", () => {
  for (const count of [1, 3]) {
    const reported = execFileSync(process.execPath, ["-e", `process.stdout.write(String(require(${JSON.stringify(addon)}).workerThreads()))`], {
      env: { ...process.env, KEEL_WORKER_THREADS: String(count) },
      encoding: "utf8",
    });
    assert.equal(reported, String(count));
  }
});

test("a KEEL_WORKER_THREADS that is not a count fails start() with registry.invalid_config", async (t) => {
  for (const bad of ["0", "two", "1.5"]) {
    await assert.rejects(
      startServer(t, { dataDir: tempDir(t), env: { KEEL_WORKER_THREADS: bad } }),
      /code 1.*start failed: registry\.invalid_config: invalid configuration: KEEL_WORKER_THREADS must be a whole number from 1 to 256/s,
    );
  }
});
