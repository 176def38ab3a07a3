// Shared helpers for keel's JS tests: temp dirs, child servers, raw HTTP.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

export const fixtures = join(dirname(fileURLToPath(import.meta.url)), "fixtures");

/** A fresh temp directory, removed by the returned cleanup. */
export function tempDir(t) {
  const dir = mkdtempSync(join(tmpdir(), "keel-test-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** POSTs JSON (or a raw string) and returns { status, body } with the body parsed when it is JSON. */
export async function post(url, path, body, headers = {}) {
  const response = await fetch(url + path, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
  const text = await response.text();
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = text;
  }
  return { status: response.status, body: parsed };
}

/**
 * Starts fixtures/server.mjs (or `script`) in a child process and resolves once it prints
 * `listening <port>`. `child.lines` collects every stdout line; `child.exited` resolves with
 * { code, signal }. With `fdLimit`, the child may open at most that many file descriptors.
 */
export function startServer(t, { dataDir, env = {}, script = join(fixtures, "server.mjs"), args = [], nodeArgs = [], fdLimit } = {}) {
  const argv = [process.execPath, ...nodeArgs, script, ...args];
  const [command, ...rest] = fdLimit === undefined ? argv : ["sh", "-c", `ulimit -n ${fdLimit} && exec "$0" "$@"`, ...argv];
  const child = spawn(command, rest, {
    env: { ...process.env, KEEL_DATA_DIR: dataDir, KEEL_PORT: "0", KEEL_LOG: process.env.KEEL_LOG ?? "warn", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  child.lines = [];
  child.stderrText = "";
  // `close` rather than `exit`: every line the child printed has been read by then.
  child.exited = new Promise((resolve) => child.on("close", (code, signal) => resolve({ code, signal })));
  child.stderr.on("data", (chunk) => (child.stderrText += chunk));
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  });
  const ready = new Promise((resolve, reject) => {
    let buffered = "";
    child.stdout.on("data", (chunk) => {
      buffered += chunk;
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        child.lines.push(line);
        child.emit("line", line);
        const match = /^listening (\d+)$/.exec(line);
        if (match) resolve(Number(match[1]));
      }
    });
    child.exited.then(({ code, signal }) =>
      reject(new Error(`server exited before listening (code ${code}, signal ${signal}): ${child.stderrText}`)),
    );
  });
  return ready.then((port) => {
    child.url = `http://127.0.0.1:${port}`;
    return child;
  });
}

/** Resolves when the child prints `line`; rejects if it exits first. */
export function waitForLine(child, line) {
  if (child.lines.includes(line)) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const onLine = (l) => {
      if (l === line) {
        child.off("line", onLine);
        resolve();
      }
    };
    child.on("line", onLine);
    child.exited.then(() => {
      if (child.lines.includes(line)) resolve();
      else reject(new Error(`the child exited without printing ${JSON.stringify(line)}`));
    });
  });
}

/**
 * Starts a registry made by keel's `setup(options)` in this process, listening on a free port,
 * and resolves with { registry, url, stop }. `stop()` shuts it down once; it also runs after
 * the test.
 */
export async function startRegistry(t, setup, options) {
  const registry = setup({ port: 0, disableSignalHandlers: true, ...options });
  const serving = registry.start();
  const { url } = await registry.listening();
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    await registry.shutdown();
    await serving;
  };
  t.after(stop);
  return { registry, url, stop };
}
