// The HTTP surface from a client's side: raw paths as sent, JSON/CBOR-only action bodies,
// origins and CORS, refusals that reach a client still sending, and stalled bodies while file
// descriptors run out.
import { test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import net from "node:net";
import { join } from "node:path";
import WebSocket from "ws";
import { setup, createClient } from "keel";
import { counter } from "./fixtures/counter.mjs";
import { room } from "./fixtures/chat.mjs";
import { fixtures, startServer, tempDir } from "./helpers.mjs";

async function start(t, options = {}) {
  const registry = setup({ use: { counter, room }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, ...options });
  const serving = registry.start();
  const { url, port } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  return { registry, url, port, client: createClient(url) };
}

/** One request with node:http; resolves { status, headers, body } or rejects with the socket error. */
function request(port, { method = "GET", path = "/", headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, method, path, headers, agent: false }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (chunk) => (text += chunk));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: text }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

/** Opens a WebSocket; resolves "open", or the HTTP status of a refused upgrade. */
function upgrade(url, path, options = {}) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${url.replace("http", "ws")}${path}`, options);
    ws.on("open", () => {
      ws.close();
      resolve("open");
    });
    ws.on("unexpected-response", (_req, res) => {
      let text = "";
      res.on("data", (chunk) => (text += chunk));
      res.on("end", () => resolve({ status: res.statusCode, body: JSON.parse(text) }));
    });
    ws.on("error", reject);
  });
}

test("the raw routes of a type without onRequest or onWebSocket answer 404 and create no actor", async (t) => {
  const { url, client } = await start(t);
  for (const method of ["GET", "POST"]) {
    const response = await fetch(`${url}/v1/actors/counter/raw/fresh/x`, { method, body: method === "POST" ? "x" : undefined });
    assert.equal(response.status, 404, method);
    assert.equal((await response.json()).code, "route_not_found", method);
  }
  const refused = await upgrade(url, "/v1/actors/counter/raw/fresh");
  assert.equal(refused.status, 404);
  assert.equal(refused.body.code, "route_not_found");
  await assert.rejects(client.counter.get(["fresh"]).increment(1), (err) => err.code === "not_found" && err.group === "actor");
});

test("onRequest sees the path and query exactly as the client sent them", async (t) => {
  const { url } = await start(t);
  for (const [tail, path, query] of [
    ["public%2F..%2Fadmin", "/public%2F..%2Fadmin", ""],
    ["a%2Fb", "/a%2Fb", ""],
    ["x%3Fy?z=%3F", "/x%3Fy", "?z=%3F"],
    ["files/report.txt?v=1&w=a%20b", "/files/report.txt", "?v=1&w=a%20b"],
  ]) {
    const response = await fetch(`${url}/v1/actors/room/raw/lobby/${tail}`);
    assert.equal(response.status, 200, tail);
    const seen = await response.json();
    assert.deepEqual([seen.path, seen.query], [path, query], tail);
  }
});

test("action bodies that are not JSON or CBOR are refused with 415", async (t) => {
  const { url, client } = await start(t);
  // What a web page can send cross-origin without a preflight: a text/plain string body.
  const plain = await fetch(`${url}/v1/actors/counter/actions/increment`, { method: "POST", body: '{"key":["csrf"],"args":[5]}' });
  assert.equal(plain.status, 415);
  assert.deepEqual(
    { ...(await plain.json()), message: undefined },
    { group: "request", code: "unsupported_media_type", message: undefined, metadata: null },
  );
  const form = await fetch(`${url}/v1/actors/counter/resolve`, { method: "POST", body: new URLSearchParams({ key: "x" }) });
  assert.equal(form.status, 415);
  // keel's own client and a JSON caller are unaffected, and the refused call changed nothing.
  assert.equal(await client.counter.getOrCreate(["csrf"]).increment(1), 1);
  const json = await fetch(`${url}/v1/actors/counter/actions/getCount`, {
    method: "POST",
    headers: { "content-type": "application/json; charset=utf-8" },
    body: '{"key":["csrf"]}',
  });
  assert.deepEqual(await json.json(), { output: 1 });
  // The serverless handler applies the same rule.
  const serverless = setup({ use: { counter }, dataDir: tempDir(t) });
  t.after(() => serverless.shutdown());
  const handled = await serverless.handler(new Request("http://host.test/v1/actors/counter/actions/increment", { method: "POST", body: '{"key":["h"]}' }));
  assert.equal(handled.status, 415);
  assert.equal((await handled.json()).code, "unsupported_media_type");
});

test("WebSocket upgrades from pages of other origins are refused unless listed", async (t) => {
  const { url } = await start(t, { allowedOrigins: ["http://app.example"] });
  for (const path of ["/v1/actors/room/connect", "/v1/actors/room/raw/lobby/socket"]) {
    const refused = await upgrade(url, path, { origin: "http://evil.example" });
    assert.equal(refused.status, 403, path);
    assert.equal(`${refused.body.group}.${refused.body.code}`, "auth.origin_not_allowed");
    assert.equal(await upgrade(url, path, { origin: "http://app.example" }), "open", `${path} listed`);
    assert.equal(await upgrade(url, path), "open", `${path} without an Origin`);
    assert.equal(await upgrade(url, path, { origin: url }), "open", `${path} same origin`);
  }
  // The TS client sends no Origin from Node, so it connects as before.
  const conn = createClient(url).room.getOrCreate(["lobby"]).connect({ name: "node" });
  await conn.ready;
  conn.dispose();
});

test("CORS preflights are answered for listed origins only", async (t) => {
  const { port } = await start(t, { allowedOrigins: ["https://app.example"] });
  const preflight = (origin) =>
    request(port, {
      method: "OPTIONS",
      path: "/v1/actors/counter/actions/increment",
      headers: { origin, "access-control-request-method": "POST", "access-control-request-headers": "content-type" },
    });
  const listed = await preflight("https://app.example");
  assert.equal(listed.status, 204);
  assert.equal(listed.headers["access-control-allow-origin"], "https://app.example");
  assert.equal(listed.headers["access-control-allow-credentials"], "true");
  assert.equal(listed.headers["access-control-allow-methods"], "POST");
  assert.equal(listed.headers["access-control-allow-headers"], "content-type");
  const unlisted = await preflight("https://evil.example");
  assert.equal(unlisted.status, 403);
  assert.equal(unlisted.headers["access-control-allow-origin"], undefined);
  const call = await request(port, {
    method: "POST",
    path: "/v1/actors/counter/actions/increment",
    headers: { origin: "https://app.example", "content-type": "application/json" },
    body: '{"key":["cors"]}',
  });
  assert.deepEqual([call.status, call.headers["access-control-allow-origin"], JSON.parse(call.body)], [200, "https://app.example", { output: 1 }]);
});

test("allowedOrigins is checked when the registry starts", async (t) => {
  for (const allowedOrigins of [["app.example"], ["https://app.example/"], "https://app.example", [5]]) {
    const registry = setup({ use: { counter }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, allowedOrigins });
    await assert.rejects(registry.start(), (err) => err.group === "registry" && err.code === "invalid_config" && /allowedOrigins/.test(err.message));
    await registry.shutdown();
  }
});

test("a body over the limit is refused with 413 while the client is still sending it", async (t) => {
  const { port, client } = await start(t, { maxBodyBytes: 1024 });
  // keel's own client sends one 64 MiB CBOR body; it gets keel's error, not a reset.
  await assert.rejects(client.counter.getOrCreate(["big"]).increment("x".repeat(64 << 20)), (err) => err.fullCode === "request.body_too_large");
  for (let attempt = 0; attempt < 3; attempt++) {
    const answer = await new Promise((resolve, reject) => {
      const req = http.request({
        host: "127.0.0.1",
        port,
        method: "POST",
        path: "/v1/actors/counter/actions/increment",
        headers: { "content-type": "application/json", "content-length": 32 << 20 },
        agent: false,
      });
      req.on("response", (res) => {
        let text = "";
        res.on("data", (chunk) => (text += chunk));
        res.on("end", () => resolve({ status: res.statusCode, body: JSON.parse(text) }));
      });
      req.on("error", reject);
      // Keeps sending until keel's answer arrives.
      const chunk = Buffer.alloc(256 * 1024, 0x20);
      const pump = () => {
        while (!req.destroyed && req.write(chunk));
      };
      req.on("drain", pump);
      pump();
    });
    assert.equal(answer.status, 413);
    assert.deepEqual([answer.body.group, answer.body.code, answer.body.metadata], ["request", "body_too_large", { limit: 1024 }]);
  }
});

test("a message over the limit closes a connection with 1009, which the client reports", async (t) => {
  const { client } = await start(t);
  const conn = client.room.getOrCreate(["big"]).connect({ name: "big" }, { reconnect: false });
  await conn.ready;
  // 8 MiB: the client is still sending when keel refuses it.
  const err = await conn.send("x".repeat(8 << 20)).then(
    () => assert.fail("an oversize message must fail"),
    (err) => err,
  );
  assert.equal(err.fullCode, "client.connection_lost");
  assert.deepEqual(err.metadata, { closeCode: 1009 });
  conn.dispose();
});

/** Opens a socket that sends a request head promising a body, and then nothing. */
function stall(port) {
  const socket = net.connect(port, "127.0.0.1");
  socket.on("error", () => {});
  socket.write("POST /v1/actors/counter/actions/increment HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n");
  let text = "";
  socket.on("data", (chunk) => (text += chunk));
  socket.answered = new Promise((resolve) => socket.on("close", () => resolve(text)));
  return socket;
}

test("stalled bodies are cut, and the server answers others while file descriptors run out", { timeout: 60_000 }, async (t) => {
  const server = await startServer(t, {
    dataDir: tempDir(t),
    script: join(fixtures, "limits.mjs"),
    env: { FIXTURE_BODY_TIMEOUT_MS: "500", KEEL_LOG: "info" },
    // The process has about 30 descriptors open once serving; 64 leaves room for about as
    // many connections, fewer than the stalled clients below.
    fdLimit: 64,
  });
  const port = Number(new URL(server.url).port);
  const stalled = Array.from({ length: 80 }, () => stall(port));
  // A fresh client waits behind the stalled ones, and is answered once they are cut.
  const health = await request(port, { path: "/health" });
  assert.equal(health.status, 200);
  for (const socket of stalled) {
    const answer = await socket.answered;
    assert.match(answer, /^HTTP\/1\.1 408 /);
    assert.match(answer, /"code":"body_timed_out"/);
  }
  const again = await request(port, { path: "/health" });
  assert.equal(again.status, 200);
  assert.match(server.stderrText, /accepting connections failed/, "the descriptors did run out");
  assert.match(server.stderrText, /accepting connections again/);
  server.kill("SIGTERM");
  await server.exited;
});
