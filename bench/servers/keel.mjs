// keel server for the bench, run as a child process by run.mjs.
//
// Usage: node servers/keel.mjs <dataDir>
// Expects NAPI_RS_NATIVE_LIBRARY_PATH to point at the release addon. Prints one JSON line
// `{"ready":true,"port":N,"addon":"..."}` on stdout once listening, then serves until its
// stdin closes (the parent closing it, or the parent dying) or it gets SIGTERM.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { actions, initialState } from "./counter.mjs";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const dataDir = process.argv[2];
if (!dataDir) {
  console.error("usage: node servers/keel.mjs <dataDir>");
  process.exit(2);
}

// keel is CommonJS (dist/index.js); load it from the repo root exactly as a user would.
const require = createRequire(import.meta.url);
const { actor, setup } = require(repoRoot);

// The napi loader falls back to the debug addon at the repo root when the override fails to
// load, and a debug build would make every figure meaningless. So check which addon file
// this process really mapped instead of trusting the environment variable.
const wanted = process.env.NAPI_RS_NATIVE_LIBRARY_PATH;
const mapped = new Set(
  readFileSync("/proc/self/maps", "utf8")
    .split("\n")
    .map((line) => line.slice(line.indexOf("/")))
    .filter((p) => p.endsWith(".node") && path.basename(p).startsWith("keel")),
);
if (!wanted || !mapped.has(wanted) || mapped.size !== 1) {
  console.error(`keel server: expected only ${wanted} to be loaded, found: ${[...mapped].join(", ") || "none"}`);
  process.exit(3);
}

const counter = actor({ state: initialState(), actions });
const registry = setup({
  use: { counter },
  host: "127.0.0.1",
  port: 0,
  dataDir,
  durability: "full",
  disableSignalHandlers: true,
});

const serving = registry.start();
const { port } = await registry.listening();
process.stdout.write(JSON.stringify({ ready: true, port, addon: wanted }) + "\n");

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  registry.shutdown().catch((err) => {
    console.error("keel server: shutdown failed:", err);
    process.exitCode = 1;
  });
}
process.stdin.on("end", stop);
process.stdin.on("error", stop);
process.stdin.resume();
process.on("SIGTERM", stop);

await serving;
// stdin keeps the event loop alive; nothing else is left to do.
process.exit();
