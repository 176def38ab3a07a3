// The web example in a real browser: headless Chromium (the system's, never a downloaded
// one) driven by playwright-core against examples/chat-web. Two pages chat; the server
// restarts and both go open → reconnecting → open with the history kept; a page of a foreign
// origin is refused; a screenshot of the page is saved to __test__/artifacts/ and must not be
// blank. Without Chromium the test fails, saying how to install it (.ci/run does).
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { chromium } from "playwright-core";
import { createClient, setup } from "keel";
import { room } from "../examples/chat/actors.mjs";
import { fixtures, startServer, tempDir } from "./helpers.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const script = join(here, "..", "examples", "chat-web", "server.mjs");
const artifacts = join(here, "artifacts");
const executablePath = process.env.KEEL_CHROMIUM ?? "/usr/bin/chromium";
/** How long a page may take to reach a state; a bound for a loaded machine, not a timing claim. */
const WAIT_MS = 60_000;

async function launch(t) {
  assert.ok(
    existsSync(executablePath),
    `Chromium is missing at ${executablePath}: install it with \`apt-get update && apt-get install -y chromium\` (.ci/run does), or set KEEL_CHROMIUM`,
  );
  const userDataDir = mkdtempSync(join(tmpdir(), "keel-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  t.after(async () => {
    await context.close();
    rmSync(userDataDir, { recursive: true, force: true });
  });
  return context;
}

/** Starts the example; resolves with the child, its page URL and its keel URL. */
async function startExample(t, dataDir, env = {}) {
  const child = await startServer(t, { script, dataDir, env: { WEB_PORT: "0", ...env } });
  const value = (prefix) => child.lines.find((line) => line.startsWith(prefix)).slice(prefix.length);
  return { child, pageUrl: value("page ").replace(/\/$/, ""), keelUrl: value("keel ") };
}

/** A static server on another loopback port that serves the example's own page and bundle. */
async function foreignCopy(t, pageUrl) {
  const html = await (await fetch(`${pageUrl}/`)).text();
  const app = Buffer.from(await (await fetch(`${pageUrl}/app.js`)).arrayBuffer());
  const server = createServer((request, response) => {
    if (request.url.startsWith("/app.js")) response.writeHead(200, { "content-type": "text/javascript" }).end(app);
    else response.writeHead(200, { "content-type": "text/html" }).end(html);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => new Promise((resolve) => server.close(resolve)));
  return `http://127.0.0.1:${server.address().port}`;
}

const statusIs = (page, status) =>
  page.waitForFunction((s) => document.querySelector("#status")?.textContent === s, status, { timeout: WAIT_MS });
const showsLine = (page, line) =>
  page.waitForFunction((l) => [...document.querySelectorAll("#messages li")].some((li) => li.textContent === l), line, { timeout: WAIT_MS });
const lines = (page) => page.$$eval("#messages li", (items) => items.map((li) => li.textContent));
const statuses = (page) => page.textContent("#statuses");

async function say(page, text) {
  await page.fill("#draft", text);
  await page.click("#send");
}

/** Whether the page may read the reply of an action call to keel over HTTP (CORS). */
const canCallOverHttp = (page, keelUrl) =>
  page.evaluate(async (url) => {
    try {
      const response = await fetch(`${url}/v1/actors/room/actions/history`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ key: ["lobby"], args: [] }),
      });
      return response.ok;
    } catch {
      return false;
    }
  }, keelUrl);

test("two browser pages chat through keel, survive a server restart and refuse a foreign origin", async (t) => {
  const context = await launch(t);
  const dataDir = tempDir(t);
  let example = await startExample(t, dataDir);
  const { pageUrl, keelUrl } = example;

  const ada = await context.newPage();
  const bob = await context.newPage();
  await ada.goto(`${pageUrl}/?name=ada`);
  await bob.goto(`${pageUrl}/?name=bob`);
  await statusIs(ada, "open");
  await statusIs(bob, "open");

  await say(ada, "hello from ada");
  await showsLine(bob, "ada: hello from ada");
  await say(bob, "hi ada");
  await showsLine(ada, "bob: hi ada");
  assert.equal(await canCallOverHttp(ada, keelUrl), true, "the example's own page is allowed");

  // A page of another origin: its WebSocket upgrade is refused (403), so it never opens, and
  // the browser keeps keel's HTTP replies from it.
  const eve = await context.newPage();
  await eve.goto(`${await foreignCopy(t, pageUrl)}/?name=eve`);
  await statusIs(eve, "reconnecting");
  assert.equal(await statuses(eve), "connecting → reconnecting");
  assert.equal(await canCallOverHttp(eve, keelUrl), false, "a foreign page cannot read keel's replies");
  assert.deepEqual(await lines(eve), []);
  await eve.close();

  // Restart on the same ports (the page's origin is what keel allows), with the same data.
  example.child.kill("SIGTERM");
  await example.child.exited;
  await statusIs(ada, "reconnecting");
  await statusIs(bob, "reconnecting");
  example = await startExample(t, dataDir, { WEB_PORT: new URL(pageUrl).port, KEEL_PORT: new URL(keelUrl).port });
  await statusIs(ada, "open");
  await statusIs(bob, "open");
  assert.equal(await statuses(ada), "connecting → open → reconnecting → open");
  assert.equal(await statuses(bob), "connecting → open → reconnecting → open");
  // The history, reloaded from the restarted server, still has the conversation.
  await showsLine(bob, "ada: hello from ada");
  await showsLine(bob, "bob: hi ada");
  assert.deepEqual((await lines(ada)).slice(0, 2), ["ada: hello from ada", "bob: hi ada"]);
  await say(bob, "back again");
  await showsLine(ada, "bob: back again");

  mkdirSync(artifacts, { recursive: true });
  const png = await ada.screenshot({ path: join(artifacts, "chat-web.png"), fullPage: true });
  // Not blank: the browser decodes the screenshot and counts its distinct colours.
  const colours = await ada.evaluate(async (base64) => {
    const image = new Image();
    image.src = `data:image/png;base64,${base64}`;
    await image.decode();
    const canvas = document.createElement("canvas");
    canvas.width = image.width;
    canvas.height = image.height;
    const context2d = canvas.getContext("2d");
    context2d.drawImage(image, 0, 0);
    const data = context2d.getImageData(0, 0, canvas.width, canvas.height).data;
    const seen = new Set();
    for (let i = 0; i < data.length; i += 4) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
    return seen.size;
  }, png.toString("base64"));
  assert.ok(colours > 20, `the screenshot has only ${colours} colours`);
});

/** Serves `entry`, bundled by esbuild, as a page whose `window.KEEL_URL` is `keelUrl()`. */
async function servePage(t, entry, keelUrl) {
  const bundle = await build({ entryPoints: [entry], bundle: true, format: "esm", platform: "browser", jsx: "automatic", write: false, logLevel: "warning" });
  const app = bundle.outputFiles[0].contents;
  const server = createServer((request, response) => {
    if (request.url.startsWith("/app.js")) return response.writeHead(200, { "content-type": "text/javascript" }).end(app);
    const html = `<!doctype html><div id="root"></div><script>window.KEEL_URL = ${JSON.stringify(keelUrl())};</script><script type="module" src="/app.js"></script>`;
    response.writeHead(200, { "content-type": "text/html" }).end(html);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => new Promise((resolve) => server.close(resolve)));
  return `http://127.0.0.1:${server.address().port}`;
}

/** Resolves when `conn` hears that `who` left. */
const leaves = (conn, who) =>
  new Promise((resolve) => {
    const stop = conn.on("left", (name) => {
      if (name !== who) return;
      stop();
      resolve();
    });
  });

test("useActor disconnects its socket when the key changes and when the component unmounts, and reports a refusal", async (t) => {
  const context = await launch(t);
  let keelUrl;
  const pageUrl = await servePage(t, join(fixtures, "react-hooks.jsx"), () => keelUrl);
  const registry = setup({ use: { room }, host: "127.0.0.1", port: 0, dataDir: tempDir(t), disableSignalHandlers: true, allowedOrigins: [pageUrl] });
  const serving = registry.start();
  keelUrl = (await registry.listening()).url;
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  // Watchers in Node, one per room, hear the page's connection leave.
  const client = createClient(keelUrl);
  const watchA = client.room.getOrCreate(["a"]).connect({ name: "watcher" });
  const watchB = client.room.getOrCreate(["b"]).connect({ name: "watcher" });
  t.after(() => {
    watchA.dispose();
    watchB.dispose();
  });
  await Promise.all([watchA.ready, watchB.ready]);

  const page = await context.newPage();
  await page.goto(`${pageUrl}/`);
  await statusIs(page, "a:open");
  await watchA.send("to a");
  await page.waitForFunction(() => document.querySelector("#heard")?.textContent === "watcher: to a", null, { timeout: WAIT_MS });

  const leftA = leaves(watchA, "page");
  await page.evaluate(() => window.setRoomKey("b"));
  await leftA;
  await statusIs(page, "b:open");
  // The event subscription moved with the connection: room b's messages arrive, a's do not.
  await watchA.send("to a again");
  // The page subscribes to room b with a `sub` frame sent when its connection opened; a message
  // sent the moment the page shows "open" can reach the actor before it: send until one is heard.
  const heardB = () => page.evaluate(() => document.querySelector("#heard")?.textContent.includes("watcher: to b"));
  for (let attempt = 0; !(await heardB()); attempt++) {
    assert.ok(attempt < 100, `the page never heard room b: ${await page.textContent("#heard")}`);
    await watchB.send("to b");
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.match(await page.textContent("#heard"), /^watcher: to a(\|watcher: to b)+$/, "room a's message after the move is not heard");

  const leftB = leaves(watchB, "page");
  await page.evaluate(() => window.setMounted(false));
  await leftB;
  await statusIs(page, "unmounted");

  // A refused connection ends closed, with the refusal as the hook's error.
  const refused = await context.newPage();
  await refused.goto(`${pageUrl}/?anonymous`);
  await statusIs(refused, "a:closed");
  assert.equal(await refused.textContent("#error"), "user.bad_name: name required");
});
