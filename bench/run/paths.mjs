// Where the bench's files are: its own directory (bench/: the servers, the load generator and
// the node_modules every child runs with), the repo around it (the default keel tree, where
// `npm run build` runs) and where a run writes its results.
//
// What must stay true: every path here comes from this file's location, never from the
// working directory, so `npm run bench` and `node bench/run.mjs` run the same from anywhere.

import path from "node:path";
import { fileURLToPath } from "node:url";

export const benchDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

export const repoRoot = path.resolve(benchDir, "..");
export const resultsDir = path.join(benchDir, "results");
