// keel/client and keel/react bundle for browsers: esbuild with the browser platform takes
// neither `ws` nor any Node built-in into the bundle, and the client stays small.
import { test } from "node:test";
import assert from "node:assert/strict";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { build } from "esbuild";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");

async function bundle(entry, external = []) {
  const result = await build({
    entryPoints: [join(root, entry)],
    bundle: true,
    format: "esm",
    platform: "browser",
    minify: true,
    write: false,
    metafile: true,
    external,
    logLevel: "silent",
  });
  return { code: result.outputFiles[0].contents, inputs: Object.keys(result.metafile.inputs) };
}

for (const [entry, external] of [
  ["ts/client.ts", []],
  ["dist/client.js", []],
  ["dist/react.js", ["react"]],
]) {
  test(`${entry} bundles for browsers without ws or Node built-ins`, async () => {
    const { code, inputs } = await bundle(entry, external);
    // `(disabled):` marks a module that the package's browser field maps to nothing.
    const taken = inputs.filter((input) => !input.startsWith("(disabled):"));
    assert.deepEqual(taken.filter((input) => input.includes("node_modules/ws") || input.startsWith("node:")), []);
    assert.ok(!new TextDecoder().decode(code).includes('"node:'), "no node: import is left in the bundle");
  });
}

test("the browser client is at most 15 KB minified and gzipped", async () => {
  const { code } = await bundle("ts/client.ts");
  const size = gzipSync(code, { level: 9 }).length;
  assert.ok(size <= 15 * 1024, `the client is ${size} bytes gzipped`);
});
