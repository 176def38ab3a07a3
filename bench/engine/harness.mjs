// A Rivet Engine (2.3.19, the binary npm installs) for the engine workloads, started the way
// keel's tests start it (__test__/engine.test.mjs): every listener (guard, api_peer, metrics) on
// 127.0.0.1 at a port picked free just before, telemetry off, its RocksDB data in a new temp dir.
// Without such a config the engine binds every interface and sends telemetry, so it is never
// started any other way. Load shedding is off (`runtime.worker_load_shedding_curve`): by
// default the engine's workflow worker skips a growing share of due workflows once the CPU of
// its whole cgroup (every process on this shared machine) passes 70%, and a skipped actor
// creation waited past the gateway's 15 s route timeout (docs/engine.md).
//
// What must stay true: startEngine() resolves only once /health answers and the `default`
// pool's runner config is upserted (retried while the `default` namespace is still being
// created); stopEngine() always ends the process (SIGTERM, then SIGKILL after 10 s) and removes
// its data dir; an engine this process started is killed if this process exits first.

import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { repoRoot } from "../run/paths.mjs";

/** The engine binary: KEEL_RIVET_ENGINE, else the repo root's devDependency. */
export const engineBinary = process.env.KEEL_RIVET_ENGINE ?? path.join(repoRoot, "node_modules/@rivetkit/engine-cli-linux-x64-musl/rivet-engine");

/** Every engine started here, killed if this process exits however it exits. */
const running = new Set();
process.on("exit", () => {
  for (const child of running) if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
});

/** `count` distinct free ports on 127.0.0.1 (bound to port 0 together, then released). */
export async function freePorts(count) {
  const servers = await Promise.all(
    Array.from({ length: count }, () => new Promise((resolve, reject) => {
      const server = net.createServer();
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => resolve(server));
    })),
  );
  const ports = servers.map((s) => s.address().port);
  await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  return ports;
}

/** Retries `attempt` every 25 ms until it returns a value other than undefined, within `ms`. */
export async function until(what, ms, attempt) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await attempt().catch(() => undefined);
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`${what} did not happen within ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/** Starts an engine; resolves `{url, child, dir, log()}` once its `default` pool is configured. */
export async function startEngine() {
  if (!fs.existsSync(engineBinary)) {
    throw new Error(`the Rivet Engine binary is missing at ${engineBinary}: run \`npm install\` at the repo root (devDependency @rivetkit/engine-cli-linux-x64-musl) or set KEEL_RIVET_ENGINE`);
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "keel-bench-engine-"));
  const [guard, apiPeer, metrics] = await freePorts(3);
  const config = {
    guard: { host: "127.0.0.1", port: guard },
    api_peer: { host: "127.0.0.1", port: apiPeer },
    metrics: { host: "127.0.0.1", port: metrics },
    telemetry: { enabled: false },
    runtime: { worker_load_shedding_curve: [[999, 1000], [1000, 999]] },
    file_system: { path: path.join(dir, "db") },
  };
  fs.writeFileSync(path.join(dir, "engine.json"), JSON.stringify(config));
  const child = spawn(engineBinary, ["start", "--config", path.join(dir, "engine.json")], {
    cwd: dir,
    env: { ...process.env, RUST_LOG: "warn" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  running.add(child);
  let log = "";
  child.stderr.setEncoding("utf8").on("data", (d) => (log = (log + d).slice(-8000)));
  const exited = new Promise((resolve) => child.once("close", resolve));
  const engine = { url: `http://127.0.0.1:${guard}`, child, dir, exited, log: () => log };
  try {
    await until("the engine's /health", 60_000, async () => ((await fetch(`${engine.url}/health`)).ok ? true : undefined));
    // /health answers before the `default` namespace exists: retry the upsert until it does.
    await until("the runner config upsert", 60_000, async () => {
      const res = await fetch(`${engine.url}/runner-configs/default?namespace=default`, {
        method: "PUT",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ datacenters: { default: { normal: {}, drain_on_version_upgrade: true } } }),
      });
      return res.ok ? true : undefined;
    });
  } catch (err) {
    await stopEngine(engine);
    err.message += `\nengine log:\n${log}`;
    throw err;
  }
  return engine;
}

/** Ends an engine (SIGTERM, SIGKILL after 10 s) and removes its data dir. */
export async function stopEngine(engine) {
  const { child } = engine;
  if (child.exitCode === null && child.signalCode === null) {
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await engine.exited;
    clearTimeout(timer);
  }
  running.delete(child);
  fs.rmSync(engine.dir, { recursive: true, force: true });
}
