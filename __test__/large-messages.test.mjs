// Messages far larger than a socket's first read buffer (a few KiB; buffers grow on demand)
// still arrive whole in both directions, on keel's connection protocol and on raw sockets,
// whole or fragmented, up to the 64 KiB limit; one byte over it still closes with 1009.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { setup } from "keel";
import { room } from "./fixtures/chat.mjs";
import { tempDir } from "./helpers.mjs";

const LIMIT = 64 * 1024;

async function start(t) {
  const registry = setup({ use: { room }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  return url.replace("http", "ws");
}

/** Opens a socket and collects what it receives; `next(n)` resolves once `n` have arrived. */
async function open(url) {
  const ws = new WebSocket(url, { perMessageDeflate: false });
  const received = [];
  const waiters = [];
  ws.on("message", (data, isBinary) => {
    received.push(isBinary ? Buffer.from(data) : String(data));
    for (const waiter of waiters.splice(0)) waiter();
  });
  const closed = new Promise((resolve) => ws.on("close", (code) => resolve(code)));
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", reject);
  });
  const next = async (count) => {
    while (received.length < count) {
      const more = new Promise((resolve) => waiters.push(resolve));
      const code = await Promise.race([more, closed]);
      if (received.length < count && typeof code === "number") throw new Error(`closed (${code}) after ${received.length} messages`);
    }
    return received.slice(0, count);
  };
  return { ws, received, next, closed };
}

/** Sends `data` as one message of `parts` frames: a first frame and its continuations. */
function sendFragmented(ws, data, parts, binary = false) {
  const size = Math.ceil(data.length / parts);
  for (let i = 0; i < parts; i++) {
    ws.send(data.subarray ? data.subarray(i * size, (i + 1) * size) : data.slice(i * size, (i + 1) * size), { fin: i === parts - 1, binary });
  }
}

/** The length of the text that makes a `call` frame of `send` exactly `bytes` bytes long. */
function textLength(id, bytes) {
  return bytes - JSON.stringify({ t: "call", id, action: "send", args: [""] }).length;
}

/** A `call` frame of exactly `bytes` bytes, calling `send` with a string of x's. */
function callFrame(id, bytes) {
  return JSON.stringify({ t: "call", id, action: "send", args: ["x".repeat(textLength(id, bytes))] });
}

test("a connection's messages larger than the first read buffer arrive whole, both ways", async (t) => {
  const url = await start(t);
  const conn = await open(`${url}/v1/actors/room/connect`);
  conn.ws.send(JSON.stringify({ t: "init", key: ["big"], params: { name: "ada" }, subs: ["message", "blob"] }));
  // `ready`, and `welcome` from onConnect.
  const hello = (await conn.next(2)).map((text) => JSON.parse(text));
  assert.deepEqual(hello.map((f) => f.t).sort(), ["event", "ready"]);
  let seen = 2;
  const expect = async (count) => {
    const all = await conn.next(seen + count);
    seen += count;
    return all.slice(-count).map((text) => JSON.parse(text));
  };

  // A call at exactly the limit, one made of many frames, and three pipelined back to back:
  // each is answered by its `message` event and its reply, with the text intact.
  const sizes = [LIMIT, 40 * 1024, 20 * 1024, 30 * 1024, 50 * 1024];
  conn.ws.send(callFrame(1, sizes[0]));
  sendFragmented(conn.ws, callFrame(2, sizes[1]), 7);
  for (const [i, size] of sizes.slice(2).entries()) conn.ws.send(callFrame(3 + i, size));
  const frames = await expect(sizes.length * 2);
  const events = frames.filter((f) => f.t === "event");
  const replies = frames.filter((f) => f.t === "reply");
  assert.deepEqual(replies.map((r) => [r.id, r.output]), sizes.map((_, i) => [i + 1, i + 1]));
  assert.deepEqual(
    events.map((e) => e.data.length),
    sizes.map((size, i) => textLength(i + 1, size)),
    "each event carries the whole text that was sent",
  );
  assert.ok(events.every((e) => e.event === "message" && /^x*$/.test(e.data)));

  // The server's own messages can be larger still: a 200 KiB event arrives whole.
  conn.ws.send(JSON.stringify({ t: "call", id: 9, action: "blobs", args: [1, 200 * 1024] }));
  const [blob, reply] = await expect(2);
  assert.equal(blob.event, "blob");
  assert.equal(blob.data.data, "x".repeat(200 * 1024));
  assert.deepEqual(reply, { t: "reply", id: 9, output: 1 });

  // One byte over the limit still closes the socket with 1009.
  conn.ws.send(callFrame(10, LIMIT + 1));
  assert.equal(await conn.closed, 1009);
});

test("a raw socket's messages larger than the first read buffer arrive whole, both ways", async (t) => {
  const url = await start(t);
  const raw = await open(`${url}/v1/actors/room/raw/big/socket`);
  const text = "y".repeat(LIMIT - 1) + "z";
  const binary = Buffer.alloc(LIMIT);
  for (let i = 0; i < binary.length; i++) binary[i] = (i * 7) & 0xff;
  raw.ws.send(text);
  sendFragmented(raw.ws, binary, 5, true);
  raw.ws.send(Buffer.from(binary.subarray(0, 5000)));
  const [echoText, echoBinary, echoSmall] = await raw.next(3);
  assert.equal(echoText, `echo:${text}`);
  assert.ok(Buffer.isBuffer(echoBinary) && echoBinary.equals(binary));
  assert.ok(echoSmall.equals(binary.subarray(0, 5000)));

  raw.ws.send(Buffer.alloc(LIMIT + 1));
  assert.equal(await raw.closed, 1009);
});
