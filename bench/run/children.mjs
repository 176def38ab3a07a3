// The child processes of a measurement and their life cycle: a server child (servers/*.mjs) on
// a new data dir under the OS temp dir, and the load-generator child (load.mjs) that drives it,
// so the client never shares an event loop with the server.
//
// What must stay true: a server is only used once it has printed its JSON ready line; stopping
// one closes its stdin, kills it if it has not exited within 30 s, and always removes its data
// dir; a child that hangs is killed, never left running; only the tail of a child's stderr is
// kept, for error messages.

import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { benchDir } from "./paths.mjs";

/** Collects a child's output, keeping only the tail of stderr for error messages. */
function collect(child) {
  const out = { stdout: "", stderr: "" };
  child.stdout.setEncoding("utf8").on("data", (d) => (out.stdout += d));
  child.stderr.setEncoding("utf8").on("data", (d) => (out.stderr = (out.stderr + d).slice(-8000)));
  return out;
}

/** Resolves true once `child` has exited, or false after `timeoutMs`. */
function exited(child, timeoutMs) {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve(true);
    const timer = setTimeout(() => resolve(false), timeoutMs);
    child.once("exit", () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

/**
 * Starts a server child on a fresh data dir and waits for its ready line. `spec` is the keel
 * tree under test, `{addonPath, keelDir}`, which a keel server loads.
 */
export async function startServer(kind, spec, { probe = false, durability = null } = {}) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), `keel-bench-${kind}-`));
  const env = { ...process.env };
  delete env.KEEL_BENCH_PROBE;
  delete env.KEEL_BENCH_DURABILITY;
  if (durability) env.KEEL_BENCH_DURABILITY = durability;
  if (kind === "keel") {
    env.NAPI_RS_NATIVE_LIBRARY_PATH = spec.addonPath;
    env.KEEL_BENCH_KEEL_DIR = spec.keelDir;
    // The life-cycle workloads read memory and the awake count from the server's probe.
    if (probe) env.KEEL_BENCH_PROBE = "1";
  } else delete env.NAPI_RS_NATIVE_LIBRARY_PATH;
  const nodeArgs = probe ? ["--expose-gc"] : [];
  const child = spawn(process.execPath, [...nodeArgs, path.join(benchDir, "servers", `${kind}.mjs`), dataDir], {
    cwd: benchDir,
    env,
    stdio: ["pipe", "pipe", "pipe"],
  });
  const out = collect(child);
  const ready = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${kind} server not ready after 60 s`)), 60_000);
    const onData = () => {
      const line = out.stdout.split("\n").find((l) => l.startsWith("{"));
      if (!line) return;
      clearTimeout(timer);
      child.stdout.off("data", onData);
      resolve(JSON.parse(line));
    };
    child.stdout.on("data", onData);
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${kind} server exited early (${code ?? signal}):\n${out.stderr}`));
    });
  }).catch(async (err) => {
    child.kill("SIGKILL");
    fs.rmSync(dataDir, { recursive: true, force: true });
    throw err;
  });
  return { kind, child, out, dataDir, port: ready.port, probePort: ready.probePort ?? null };
}

/** Asks a server to shut down (by closing its stdin) and removes its data dir. */
export async function stopServer(server) {
  server.child.stdin.end();
  let clean = await exited(server.child, 30_000);
  if (!clean) {
    console.error(`${server.kind} server did not stop within 30 s; killing pid ${server.child.pid}`);
    server.child.kill("SIGKILL");
    await exited(server.child, 5_000);
  }
  fs.rmSync(server.dataDir, { recursive: true, force: true });
  return clean && server.child.exitCode === 0;
}

/** Runs the load generator child against a port and returns its JSON result. */
export async function runLoad(config) {
  const child = spawn(process.execPath, [path.join(benchDir, "load.mjs"), JSON.stringify(config)], {
    cwd: benchDir,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const out = collect(child);
  // The generator stops itself at timeCapMs; this is only the backstop.
  if (!(await exited(child, config.timeCapMs + 15_000))) {
    child.kill("SIGKILL");
    throw new Error(`load generator hung (pid ${child.pid})`);
  }
  if (child.exitCode !== 0) throw new Error(`load generator failed (${child.exitCode}):\n${out.stderr}`);
  return JSON.parse(out.stdout.trim().split("\n").pop());
}
