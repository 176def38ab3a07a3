// What every keel server of the bench shares: keel loaded from the tree under test, the check
// that the process really mapped the release addon it was given, and the stop wiring.
//
// The tree is KEEL_BENCH_KEEL_DIR (default: this repo); the addon is NAPI_RS_NATIVE_LIBRARY_PATH.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** keel (CommonJS, dist/index.js), loaded from the tree under test exactly as a user would. */
export function loadKeel() {
  const require = createRequire(import.meta.url);
  return require(process.env.KEEL_BENCH_KEEL_DIR || repoRoot);
}

/**
 * Exits with status 3 unless the one keel addon this process mapped is the one asked for. The
 * napi loader falls back to other addon files (a `keel-<platform>` package, say) when the
 * override fails to load, and an unchecked addon (a debug build) would make every figure
 * meaningless, so this reads /proc/self/maps instead of trusting the environment variable.
 * Returns the addon's path.
 */
export function checkAddon(server) {
  const wanted = process.env.NAPI_RS_NATIVE_LIBRARY_PATH;
  const mapped = new Set(
    readFileSync("/proc/self/maps", "utf8")
      .split("\n")
      .map((line) => line.slice(line.indexOf("/")))
      .filter((p) => p.endsWith(".node") && path.basename(p).startsWith("keel")),
  );
  if (!wanted || !mapped.has(wanted) || mapped.size !== 1) {
    console.error(`${server}: expected only ${wanted} to be loaded, found: ${[...mapped].join(", ") || "none"}`);
    process.exit(3);
  }
  return wanted;
}

/**
 * Shuts `registry` down once, when stdin closes (the parent closing it, or the parent dying)
 * or on SIGTERM; `before` runs first. A failed shutdown sets exit status 1.
 */
export function stopOnStdinEnd(server, registry, before = () => {}) {
  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    before();
    registry.shutdown().catch((err) => {
      console.error(`${server}: shutdown failed:`, err);
      process.exitCode = 1;
    });
  };
  process.stdin.on("end", stop);
  process.stdin.on("error", stop);
  process.stdin.resume();
  process.on("SIGTERM", stop);
}
