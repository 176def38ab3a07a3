// The conformance core (conformance.mjs) against keel's own server: the same bodies run
// through the Rivet Engine in engine.test.mjs.
import { test } from "node:test";
import { join } from "node:path";
import { createClient } from "keel/client";
import { fixtures, startServer, tempDir } from "./helpers.mjs";
import { runConformance } from "./conformance.mjs";

test("conformance: embedded", async (t) => {
  const server = await startServer(t, { dataDir: tempDir(t), script: join(fixtures, "conformance-server.mjs") });
  await runConformance(t, { mode: "embedded", url: server.url, client: createClient(server.url) });
});
