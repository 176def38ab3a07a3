// keel as an app gets it: `npm pack` makes a tarball holding the prebuilt release addon, and an
// app installs that tarball with no Rust toolchain on its PATH (nothing is compiled at install
// time) and runs a counter through `keel` and `keel/client`. The app's script reports which
// addon file it mapped, so the test knows the app ran the packed addon and not the checkout's.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { accessSync, constants, readFileSync, realpathSync, writeFileSync, mkdirSync } from "node:fs";
import { delimiter, dirname, join, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { tempDir } from "./helpers.mjs";

const repoRoot = dirname(dirname(fileURLToPath(import.meta.url)));

/** Runs `cmd args` to completion and resolves with { code, signal, stdout, stderr, ms }. */
function run(cmd, args, options) {
  const started = performance.now();
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { ...options, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk) => (stdout += chunk));
    child.stderr.on("data", (chunk) => (stderr += chunk));
    child.on("error", reject);
    child.on("close", (code, signal) => resolve({ code, signal, stdout, stderr, ms: performance.now() - started }));
  });
}

const isExecutable = (file) => {
  try {
    accessSync(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
};

/**
 * The environment of a machine without Rust: PATH without any directory that holds `cargo` or
 * `rustc` (nor this checkout's node_modules/.bin, which `npm test` puts first), and without
 * the variables npm and cargo set for the scripts they run.
 */
function envWithoutRust() {
  const path = (process.env.PATH ?? "")
    .split(delimiter)
    .filter((dir) => dir !== "" && !isExecutable(join(dir, "cargo")) && !isExecutable(join(dir, "rustc")))
    .filter((dir) => !dir.endsWith(`node_modules${sep}.bin`));
  const env = Object.fromEntries(
    Object.entries(process.env).filter(([name]) => !/^(npm_|CARGO|RUSTUP|RUSTC|INIT_CWD$)/i.test(name)),
  );
  return { ...env, PATH: path.join(delimiter) };
}

/** The app's script: a counter served on port 0, called over HTTP with keel's own client. */
const appScript = `
import { readFileSync } from "node:fs";
import { actor, setup } from "keel";
import { createClient } from "keel/client";

const counter = actor({
  state: { count: 0 },
  actions: { increment: (c, by) => (c.state.count += by) },
});
const registry = setup({ use: { counter }, port: 0, dataDir: process.argv[2], disableSignalHandlers: true });
registry.start();
const { url } = await registry.listening();
const client = createClient(url);
const handle = client.counter.getOrCreate(["packed"]);
await handle.increment(2);
const count = await handle.increment(3);
const addons = readFileSync("/proc/self/maps", "utf8")
  .split("\\n")
  .map((line) => line.slice(line.indexOf("/")))
  .filter((file) => /\\/keel[^/]*\\.node$/.test(file));
console.log(JSON.stringify({ count, addons: [...new Set(addons)] }));
await registry.shutdown();
`;

test("npm pack makes a tarball that an app installs and runs without a Rust toolchain", async (t) => {
  const work = tempDir(t);
  const packs = join(work, "packs");
  mkdirSync(packs);
  // A plain `npm pack` runs `prepare` (`npm run build`) first. This one packs what `npm install`
  // already built, so that the test never rebuilds (or rewrites) the checkout it runs in.
  const pack = await run("npm", ["pack", "--ignore-scripts", "--json", "--pack-destination", packs], { cwd: repoRoot, env: process.env });
  assert.equal(pack.code, 0, pack.stderr);
  // Lifecycle output may come first; the JSON report starts at a line holding only "[".
  const [packed] = JSON.parse(pack.stdout.slice(pack.stdout.search(/^\[$/m)));
  const files = packed.files.map((file) => file.path);
  const addon = files.find((file) => /^keel\.[^/]+\.node$/.test(file));
  assert.ok(addon, `a prebuilt addon at the package root: ${files.join(", ")}`);
  for (const file of ["package.json", "index.js", "index.d.ts", "dist/index.js", "dist/index.d.ts", "dist/client.js"]) {
    assert.ok(files.includes(file), `${file} in the tarball`);
  }
  assert.ok(!files.some((file) => /\.rs$|^crates\/|^src\/|^target\//.test(file)), `no Rust sources: ${files.join(", ")}`);
  t.diagnostic(`tarball ${packed.filename}: ${(packed.size / 1e6).toFixed(1)} MB, ${files.length} files, packed in ${(pack.ms / 1000).toFixed(1)} s`);

  const app = join(work, "app");
  mkdirSync(app);
  writeFileSync(join(app, "package.json"), JSON.stringify({ name: "keel-tarball-app", version: "1.0.0", private: true, type: "module" }, null, 2));
  writeFileSync(join(app, "main.mjs"), appScript);
  const env = envWithoutRust();
  const which = await run("sh", ["-c", "command -v cargo || command -v rustc || echo none"], { env });
  assert.equal(which.stdout.trim(), "none", "the app's PATH has no Rust toolchain");

  const install = await run(
    "npm",
    ["install", join(packs, packed.filename), "--prefer-offline", "--no-audit", "--no-fund", "--foreground-scripts"],
    { cwd: app, env },
  );
  assert.equal(install.code, 0, `${install.stdout}\n${install.stderr}`);
  // npm lists the dependencies whose install scripts it skipped; keel has none to skip.
  assert.doesNotMatch(install.stdout + install.stderr, /script|cargo|napi build/i);
  t.diagnostic(`npm install of the tarball took ${(install.ms / 1000).toFixed(1)} s`);

  const installedAddon = join(app, "node_modules", "keel", addon);
  const bytes = readFileSync(installedAddon);
  assert.ok(bytes.equals(readFileSync(join(repoRoot, addon))), "the installed addon is the checkout's");
  // The release profile writes no DWARF; the debug one keeps line tables.
  assert.ok(!bytes.includes(".debug_info\0"), "the packed addon is a debug build: `npm run build` (or `npm install`) makes the release one");

  const main = await run(process.execPath, ["main.mjs", join(work, "data")], { cwd: app, env });
  assert.equal(main.code, 0, main.stderr);
  const report = JSON.parse(main.stdout.trim().split("\n").at(-1));
  assert.equal(report.count, 5);
  assert.deepEqual(report.addons, [realpathSync(installedAddon)], "the app mapped the packed addon only");
});
