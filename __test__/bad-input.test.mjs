// Bad bytes are bad input: CBOR that keel's value decoder cannot take (invalid UTF-8,
// indefinite lengths, unknown tags) is `request.malformed`, found by core before any user
// code runs, over HTTP and over a CBOR connection. And `registry.handler()` with invalid
// options answers 500 `registry.invalid_config`, as the docs say.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { actor, createClient, setup } from "keel";
import { decode } from "../dist/cbor.js";
import { tempDir } from "./helpers.mjs";

/** How many times user code ran, by what ran. */
const ran = { createState: 0, onBeforeConnect: 0, echo: 0 };

const target = actor({
  createState: () => {
    ran.createState++;
    return { n: 0 };
  },
  onBeforeConnect: () => {
    ran.onBeforeConnect++;
  },
  actions: {
    echo: (c, value) => {
      ran.echo++;
      return value;
    },
  },
});

async function start(t) {
  const registry = setup({ use: { target }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, logging: { level: "error" } });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  return url;
}

/** A CBOR text string head and its UTF-8 bytes. */
function text(value) {
  const bytes = Buffer.from(value, "utf8");
  if (bytes.length >= 24) throw new Error("the test encoder keeps text short");
  return [0x60 + bytes.length, ...bytes];
}

/** A CBOR map of text keys to already-encoded values. */
function map(entries) {
  return Buffer.from([0xa0 + entries.length, ...entries.flatMap(([key, value]) => [...text(key), ...value])]);
}

/** Arguments keel must refuse, each an encoded array. */
const BAD_ARGS = [
  ["invalid UTF-8 in a text string", [0x81, 0x62, 0xc3, 0x28]],
  ["an encoded surrogate", [0x81, 0x63, 0xed, 0xa0, 0x80]],
  ["invalid UTF-8 in a map key", [0x81, 0xa1, 0x61, 0xff, 0x01]],
  ["an indefinite-length text string", [0x81, 0x7f, 0x61, 0x61, 0xff]],
  ["an indefinite-length array", [0x9f, 0x01, 0xff]],
  ["an unknown tag", [0x81, 0xc0, 0x60]],
  ["a map with an integer key", [0x81, 0xa1, 0x01, 0x02]],
];

test("bad CBOR in an HTTP body is 400 request.malformed and runs no user code", async (t) => {
  const url = await start(t);
  const before = { ...ran };
  const post = (body) =>
    fetch(`${url}/v1/actors/target/actions/echo`, { method: "POST", headers: { "content-type": "application/cbor" }, body });
  for (const [what, args] of BAD_ARGS) {
    const response = await post(map([["key", [0x81, ...text("http")]], ["args", args]]));
    assert.equal(response.status, 400, what);
    const body = await response.json();
    assert.equal(`${body.group}.${body.code}`, "request.malformed", what);
    assert.match(body.message, /invalid CBOR body/, what);
  }
  const input = await post(map([["key", [0x81, ...text("new")]], ["input", [0x61, 0xfe]]]));
  assert.equal(input.status, 400, "invalid UTF-8 in the creation input");
  assert.deepEqual(ran, before, "no user code ran");
});

test("bad CBOR in a call over a CBOR connection is refused before the actor sees it", async (t) => {
  const url = await start(t);
  const ws = new WebSocket(`${url.replace(/^http/, "ws")}/v1/actors/target/connect`);
  const messages = [];
  let onMessage = () => {};
  ws.on("message", (data) => {
    messages.push(decode(new Uint8Array(data)));
    onMessage();
  });
  const closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: String(reason) })));
  const next = (count) =>
    new Promise((resolve) => {
      onMessage = () => messages.length >= count && resolve();
      onMessage();
    });
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", reject);
  });
  ws.send(map([["t", text("init")], ["key", [0x81, ...text("ws")]]]));
  await next(1);
  assert.equal(messages[0].t, "ready");
  const echoes = ran.echo;
  ws.send(map([["t", text("call")], ["id", [0x01]], ["action", text("echo")], ["args", [0x81, 0x62, 0xc3, 0x28]]]));
  await next(2);
  assert.equal(messages[1].t, "error");
  assert.equal(`${messages[1].error.group}.${messages[1].error.code}`, "request.malformed");
  assert.deepEqual(await closed, { code: 1008, reason: "malformed message" });
  assert.equal(ran.echo, echoes, "the action never ran");
});

test("bad CBOR in a connection's init is refused before onBeforeConnect runs", async (t) => {
  const url = await start(t);
  const before = ran.onBeforeConnect;
  const ws = new WebSocket(`${url.replace(/^http/, "ws")}/v1/actors/target/connect`);
  const received = [];
  ws.on("message", (data) => received.push(decode(new Uint8Array(data))));
  const closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: String(reason) })));
  await new Promise((resolve) => ws.once("open", resolve));
  ws.send(map([["t", text("init")], ["key", [0x81, ...text("ws")]], ["params", [0xa1, 0x61, 0x61, 0x7f, 0xff]]]));
  // The init itself is refused (its reason is the error's code), not the connection by the actor.
  assert.deepEqual(await closed, { code: 1008, reason: "request.malformed" });
  assert.equal(`${received[0].error.group}.${received[0].error.code}`, "request.malformed");
  assert.equal(ran.onBeforeConnect, before);
});

test("a string that starts with a byte order mark round-trips unchanged", async (t) => {
  const url = await start(t);
  const handle = createClient(url).target.getOrCreate(["bom"]);
  for (const value of ["\uFEFF", "\uFEFFhello", ["\uFEFFa", { "\uFEFFkey": "\uFEFF" }]]) {
    assert.deepEqual(await handle.echo(value), value);
  }
});

test("registry.handler answers 500 registry.invalid_config while the options are invalid", async (t) => {
  const invalid = [
    ["a port out of range", { port: 70000 }],
    ["a fractional timeout", { actionTimeoutMs: 1.5 }],
    ["an unknown durability", { durability: "sometimes" }],
    ["a host of the wrong type", { host: 5 }],
  ];
  for (const [what, options] of invalid) {
    const registry = setup({ use: { target }, dataDir: tempDir(t), logging: { level: "error" }, ...options });
    const response = await registry.handler(new Request("http://local/health"));
    assert.equal(response.status, 500, what);
    const body = await response.json();
    assert.deepEqual(Object.keys(body).sort(), ["code", "group", "message", "metadata"], what);
    assert.equal(`${body.group}.${body.code}`, "registry.invalid_config", what);
    assert.equal(typeof body.message, "string", what);
    assert.ok(body.message.length > 0, what);
    assert.equal(body.metadata, null, what);
    assert.equal(registry.buildCount, 0, `${what}: nothing was built`);
    await registry.shutdown();
  }
});
