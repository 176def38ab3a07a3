// What a run needs before it measures anything, and the context recorded next to its figures:
// bench/'s own dependencies (installed with npm when missing), the keel tree's build and its
// release addon, the git state of that tree, the open-files limit and the disk's fsync cost.
//
// What must stay true: the addon the servers load is the one release build found next to the
// tree's index.js, and one carrying DWARF debug info is refused (a debug build would make every
// figure meaningless); uncommitted engine files of that tree are recorded, since they are
// compiled into the addon.

import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { benchDir, repoRoot } from "./paths.mjs";
import { round3 } from "./stats.mjs";

/** Runs a command with inherited stdio (echoed to stderr first); throws unless it exits 0. */
export function run(cmd, args, options = {}) {
  console.error(`$ ${cmd} ${args.join(" ")}`);
  const res = spawnSync(cmd, args, { stdio: "inherit", ...options });
  if (res.error) throw res.error;
  if (res.status !== 0) throw new Error(`${cmd} ${args.join(" ")} exited with ${res.status}`);
}

/** Whether bench/'s own dependencies are installed: better-sqlite3 (built), ws, rivetkit 2.0.33 and 2.3.19 (`rivetkit-engine`). */
function canLoadDeps() {
  const res = spawnSync(process.execPath, ["-e", "new (require('better-sqlite3'))(':memory:').close(); require('ws'); require.resolve('rivetkit'); require.resolve('rivetkit-engine'); require.resolve('@hono/node-server')"], {
    cwd: benchDir,
    stdio: "ignore",
  });
  return res.status === 0;
}

/** Installs bench/'s own dependencies when they do not load. */
export function ensureDeps() {
  if (fs.existsSync(path.join(benchDir, "node_modules")) && canLoadDeps()) return;
  // better-sqlite3 compiles SQLite from source here (its prebuilt download is unreachable);
  // bench/package.json's allowScripts entry is what lets npm run that build.
  run("npm", ["install", "--prefix", "bench", "--no-audit", "--no-fund"], { cwd: repoRoot });
  if (!canLoadDeps()) {
    throw new Error("better-sqlite3, ws or rivetkit still does not load; try `npm rebuild better-sqlite3 --prefix bench`");
  }
}

/** What latest.json records about the addon the keel servers load, built in `keelDir`. */
export function addonInfo(addonPath, keelDir) {
  const stat = fs.statSync(addonPath);
  // Built in that tree (by `npm run build` above for this repo), from that tree's sources.
  return { path: addonPath, profile: "release", bytes: stat.size, builtFrom: { mtime: stat.mtime.toISOString(), ...gitInfo(keelDir) } };
}

/** Throws unless the keel tree at `keelDir` has its JS built (dist/ and napi's index.js). */
export function checkRootBuilt(keelDir) {
  for (const file of ["dist/index.js", "index.js"]) {
    if (!fs.existsSync(path.join(keelDir, file))) {
      throw new Error(
        keelDir === repoRoot
          ? `${file} is missing at the repo root: run \`npm install\` there first`
          : `${file} is missing in ${keelDir}: run \`npm run build\` there first`,
      );
    }
  }
}

/**
 * The release addon of a keel tree: napi names it `<napi.binaryName>.<platform>.node`, next to
 * the tree's index.js. A debug build (`npm run build:debug`) has the same name, so refuse one
 * that carries DWARF debug info: the release profile has none, and the debug profile keeps
 * line tables.
 */
export function treeAddon(dir) {
  const binaryName = JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8")).napi?.binaryName ?? "keel";
  const candidates = fs.readdirSync(dir).filter((f) => f.startsWith(`${binaryName}.`) && f.endsWith(".node"));
  if (candidates.length !== 1) {
    throw new Error(`expected one ${binaryName}.<platform>.node in ${dir}, found ${candidates.length ? candidates.join(", ") : "none"}; build it there with \`npm run build\``);
  }
  const file = path.join(dir, candidates[0]);
  if (fs.readFileSync(file).includes(".debug_info\0")) {
    throw new Error(`${file} has debug info, so it is not a release build; rebuild it with \`npm run build\``);
  }
  return file;
}

/** The commit of the keel tree at `keelDir`, and its uncommitted engine files. */
export function gitInfo(keelDir) {
  const git = (...args) => spawnSync("git", args, { cwd: keelDir, encoding: "utf8" }).stdout ?? "";
  return {
    commit: git("rev-parse", "HEAD").trim(),
    // Uncommitted engine changes are compiled into the addon too; record that they existed.
    dirtyEngineFiles: git("status", "--porcelain", "--", "crates", "src", "ts", "Cargo.toml", "Cargo.lock")
      .split("\n")
      .filter(Boolean),
  };
}

/** The soft limit on open files (from /proc/self/limits; children inherit it). */
export function openFilesLimit() {
  try {
    const line = fs.readFileSync("/proc/self/limits", "utf8").split("\n").find((l) => l.startsWith("Max open files"));
    return line ? Number(line.split(/\s{2,}/)[1]) : null;
  } catch {
    return null;
  }
}

/**
 * Disk context: both servers are bound by fsync latency, so record it next to the figures. The
 * p50 and p99 of a 4 KiB write plus fdatasync in the OS temp dir, where the data dirs go.
 */
export function probeDisk() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "keel-bench-fsync-"));
  try {
    const TMPFS_MAGIC = 0x01021994;
    const tmpfs = fs.statfsSync(dir).type === TMPFS_MAGIC;
    const fd = fs.openSync(path.join(dir, "probe"), "w");
    const block = Buffer.alloc(4096, 1);
    const times = [];
    for (let i = 0; i < 100; i++) {
      const t0 = performance.now();
      fs.writeSync(fd, block);
      fs.fdatasyncSync(fd);
      times.push(performance.now() - t0);
    }
    fs.closeSync(fd);
    times.sort((a, b) => a - b);
    return {
      dataDirParent: os.tmpdir(),
      tmpfs,
      writeFdatasyncMs: { p50: round3(times[49]), p99: round3(times[98]) },
    };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
