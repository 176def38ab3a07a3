// The binding's tokio runtime: KEEL_WORKER_THREADS sets its worker count when the addon loads,
// and a value that is not a count is a structured error from start(), not a crash.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { startServer, tempDir, post } from "./helpers.mjs";

/** How many threads of process `pid` are tokio workers (Linux names them in /proc). */
function tokioWorkers(pid) {
  return readdirSync(`/proc/${pid}/task`).filter((tid) =>
    readFileSync(`/proc/${pid}/task/${tid}/comm`, "utf8").startsWith("tokio-runtime-w"),
  ).length;
}

test("KEEL_WORKER_THREADS sets how many tokio workers run core", { skip: process.platform !== "linux" }, async (t) => {
  for (const count of [1, 3]) {
    const server = await startServer(t, { dataDir: tempDir(t), env: { KEEL_WORKER_THREADS: String(count) } });
    // A call first, so every worker has started.
    const reply = await post(server.url, "/v1/actors/counter/actions/increment", { key: ["w"], args: [1] });
    assert.deepEqual(reply, { status: 200, body: { output: 1 } });
    assert.equal(tokioWorkers(server.pid), count);
    server.kill("SIGKILL");
    await server.exited;
  }
});

test("a KEEL_WORKER_THREADS that is not a count fails start() with registry.invalid_config", async (t) => {
  for (const bad of ["0", "two", "1.5"]) {
    await assert.rejects(
      startServer(t, { dataDir: tempDir(t), env: { KEEL_WORKER_THREADS: bad } }),
      /code 1.*start failed: registry\.invalid_config: KEEL_WORKER_THREADS must be a whole number from 1 to 256/s,
    );
  }
});
