// Observability from JS against the real addon: `c.log` lines share the schema of Rust lines,
// `setup({ logging })` configures the process once, the inspector's token rules (and the
// token never reaching a log), and `/metrics` as strict Prometheus text whose counters move.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { join } from "node:path";
import { setup, actor, createClient, createInspector, KeelError, UserError } from "keel";
import { fixtures, post, startServer, tempDir } from "./helpers.mjs";
import { parsePrometheus, sample } from "./prometheus.mjs";

const observed = join(fixtures, "observed.mjs");

/** Starts the fixture server with `env`, runs `work(server)`, stops it and returns every stderr line. */
async function run(t, env, work) {
  const server = await startServer(t, { dataDir: tempDir(t), script: observed, env });
  await work(server);
  server.kill("SIGTERM");
  await server.exited;
  return server.stderrText.split("\n").filter((line) => line !== "");
}

/** A logfmt line as its [key, value] pairs: bare values end at a space, quoted ones take JSON escapes. */
function parseLogfmt(line) {
  const pairs = [];
  let i = 0;
  while (i < line.length) {
    const eq = line.indexOf("=", i);
    assert.ok(eq > i, `a key in ${line}`);
    const key = line.slice(i, eq);
    let value;
    if (line[eq + 1] === '"') {
      let end = eq + 2;
      while (line[end] !== '"') end += line[end] === "\\" ? 2 : 1;
      value = JSON.parse(line.slice(eq + 1, end + 1));
      i = end + 1;
    } else {
      const end = line.indexOf(" ", eq);
      value = line.slice(eq + 1, end < 0 ? line.length : end);
      i = end < 0 ? line.length : end;
    }
    pairs.push([key, value]);
    assert.ok(i === line.length || line[i] === " ", `one space between pairs in ${line}`);
    i += 1;
  }
  return pairs;
}

function keysOf(format, line) {
  return format === "json" ? Object.keys(JSON.parse(line)) : parseLogfmt(line).map(([key]) => key);
}

function fieldsOf(format, line) {
  return format === "json" ? JSON.parse(line) : Object.fromEntries(parseLogfmt(line));
}

for (const format of ["json", "logfmt"]) {
  for (const level of ["", "debug"]) {
    test(`a c.log warning and a Rust warning from one actor have the same keys (${format}, KEEL_LOG=${level || "default"})`, async (t) => {
      const lines = await run(t, { KEEL_LOG_FORMAT: format, KEEL_LOG: level }, async (server) => {
        const response = await post(server.url, "/v1/actors/watched/actions/warnAndThrow", { key: ["w", "x/y"] });
        assert.equal(response.status, 500);
      });
      const warnings = lines.filter((line) => fieldsOf(format, line).level === "warn");
      const js = warnings.find((line) => fieldsOf(format, line).target === "keel::js");
      const rust = warnings.find((line) => {
        const fields = fieldsOf(format, line);
        return fields.target !== "keel::js" && fields.msg === "user code threw";
      });
      assert.ok(js && rust, lines.join("\n"));
      assert.deepEqual(keysOf(format, js), keysOf(format, rust));
      const [jsFields, rustFields] = [fieldsOf(format, js), fieldsOf(format, rust)];
      for (const key of ["actor_id", "name", "key", "msg", "call"]) assert.equal(jsFields[key], rustFields[key], key);
      assert.equal(jsFields.name, "watched");
      assert.equal(jsFields.key, "w/x\\/y", "the canonical key string");
      assert.match(jsFields.actor_id, /^[0-9a-f]{32}$/);
      assert.equal(jsFields.error, "from js");
      if (level === "debug") {
        assert.equal(jsFields.action, "warnAndThrow", "at debug the action span shows in both");
        assert.ok(lines.some((line) => fieldsOf(format, line).msg === "woke"), "c.log.debug in a hook");
      } else {
        assert.ok(!("action" in jsFields));
        assert.ok(!lines.some((line) => fieldsOf(format, line).level === "debug"));
      }
    });
  }
}

for (const format of ["json", "logfmt", "pretty"]) {
  test(`c.log fields named like keel's keys never replace them (${format})`, async (t) => {
    const lines = await run(t, { KEEL_LOG_FORMAT: format }, async (server) => {
      const response = await post(server.url, "/v1/actors/watched/actions/logSpread", { key: ["w"] });
      assert.equal(response.body.output, "logged");
    });
    const marker = "keel::js: charge failed ";
    const line = lines.find((l) => (format === "pretty" ? l.includes(marker) : fieldsOf(format, l).msg === "charge failed"));
    assert.ok(line, lines.join("\n"));
    // Pretty writes `ts level target: msg` and then the same pairs as logfmt.
    const pairs = format === "json" ? Object.entries(JSON.parse(line)) : parseLogfmt(format === "pretty" ? line.slice(line.indexOf(marker) + marker.length) : line);
    const keys = pairs.map(([key]) => key);
    assert.equal(new Set(keys).size, keys.length, `every key once: ${line}`);
    const fields = Object.fromEntries(pairs);
    if (format !== "pretty") {
      assert.equal(fields.level, "warn");
      assert.equal(fields.target, "keel::js");
      assert.equal(fields.msg, "charge failed");
    }
    assert.equal(fields.name, "watched", "the actor type, not the error's name");
    assert.equal(fields.key, "w");
    assert.match(fields.actor_id, /^[0-9a-f]{32}$/);
    assert.equal(fields["field.name"], "UserError");
    assert.equal(fields["field.key"], "from user");
    assert.equal(fields["field.actor_id"], "spoofed");
    assert.equal(fields["field.message"], "card declined");
    assert.equal(fields.code, "declined", "a name keel does not use is kept");
    assert.equal(String(fields.amount), "3");
    const userKeys = keys.slice(keys.indexOf("key") + 1);
    assert.deepEqual(userKeys, ["code", "field.name", "field.key", "field.actor_id", "field.message", "amount"], "the user's order");
  });
}

test("setup({ logging }) wins over the environment and is installed once per process", async (t) => {
  const lines = await run(
    t,
    {
      KEEL_LOG_FORMAT: "logfmt",
      KEEL_LOG: "error",
      FIXTURE_LOGGING: JSON.stringify({ format: "json", level: "info,keel::js=debug" }),
      FIXTURE_LOGGING_AGAIN: JSON.stringify([{ format: "logfmt" }, { format: "json", level: "info,keel::js=debug" }, {}]),
    },
    async (server) => {
      assert.equal((await post(server.url, "/v1/actors/watched/actions/bump", { key: ["a"], args: [2] })).body.output, 2);
    },
  );
  const objects = lines.map((line) => JSON.parse(line));
  const ignored = objects.filter((o) => o.msg === "logging is configured once per process; ignoring different settings");
  assert.equal(ignored.length, 1, "one warning for the one different config");
  assert.equal(ignored[0].ignored_format, "logfmt");
  assert.equal(ignored[0].installed_format, "json");
  assert.ok(objects.some((o) => o.msg === "listening"), "info milestones pass the configured filter");
  const bumped = objects.find((o) => o.msg === "bumped");
  assert.deepEqual([bumped.level, bumped.target, bumped.count], ["debug", "keel::js", 2]);
  assert.ok(!objects.some((o) => o.level === "debug" && o.target !== "keel::js"), "core stays at info");
});

test("a span directive lets one actor's c.log debug lines through, as it does its Rust lines", async (t) => {
  const lines = await run(t, { KEEL_LOG: "warn,[actor{key=loud}]=debug", KEEL_LOG_FORMAT: "json" }, async (server) => {
    for (const key of ["loud", "quiet"]) await post(server.url, "/v1/actors/watched/actions/bump", { key: [key] });
  });
  const debug = lines.map((line) => JSON.parse(line)).filter((o) => o.level === "debug");
  const bumped = debug.filter((o) => o.msg === "bumped");
  assert.deepEqual(bumped.map((o) => [o.key, o.action, o.count]), [["loud", "bump", 1]]);
  assert.ok(debug.some((o) => o.msg === "actor started" && o.key === "loud"), "the Rust debug line passes too");
  assert.ok(debug.every((o) => o.key === "loud"), "nothing at debug outside the loud actor");
});

test("malformed logging settings and c.log misuse are clear errors", async (t) => {
  const counter = actor({ state: {}, actions: { noop: () => null } });
  assert.throws(() => setup({ use: { counter }, logging: { format: "xml" } }), (err) => {
    assert.ok(err instanceof KeelError);
    assert.equal(err.fullCode, "registry.invalid_config");
    assert.match(err.message, /xml/);
    return true;
  });
  assert.throws(() => setup({ use: { counter }, logging: { level: "[oops" } }), { code: "invalid_config" });

  const { CoreRegistry } = createRequire(import.meta.url)("../index.js");
  const native = new CoreRegistry(() => {});
  for (const level of ["trace", "WARN", "fatal", ""]) {
    assert.throws(() => native.log("some-actor", level, "msg"), TypeError, level);
    assert.throws(() => native.logDetached("some-actor", "t", [], level, "msg"), TypeError, level);
  }
  assert.equal(native.log("not-live", "warn", "msg"), false, "an actor that is not live is reported");

  const misuse = actor({
    state: {},
    actions: {
      arrayFields: (c) => c.log.warn("bad", [1, 2]),
      oddValues: (c) => {
        const cyclic = {};
        cyclic.self = cyclic;
        c.log.warn("odd", { big: 10n, err: new Error("x"), cyclic, map: new Map([["a", 1]]) });
        return "logged";
      },
    },
  });
  const registry = setup({
    use: { misuse },
    port: 0,
    dataDir: tempDir(t),
    disableSignalHandlers: true,
    dev: true,
    inspector: { token: "misuse-test-token-0123" },
  });
  registry.start();
  const { url } = await registry.listening();
  t.after(() => registry.shutdown());
  const client = createClient(url);
  await assert.rejects(client.misuse.getOrCreate(["m"]).arrayFields(), { code: "internal_error", message: /log fields must be an object/ });
  assert.equal(await client.misuse.getOrCreate(["m"]).oddValues(), "logged", "odd values never make c.log throw");
});

test("the inspector wants its token, and the token never reaches a trace log", async (t) => {
  let token;
  const lines = await run(t, { KEEL_LOG: "trace", KEEL_LOG_FORMAT: "json", FIXTURE_DEV: "1" }, async (server) => {
    // The dev token is printed once, on stderr, as a plain line.
    const printed = () => /inspector token \(dev mode, generated for this run\): ([0-9a-f]{64})$/m.exec(server.stderrText)?.[1];
    token = printed() ?? (await new Promise((resolve) => {
      // helpers.mjs appends each chunk to stderrText in an earlier listener.
      const onData = () => {
        if (printed() === undefined) return;
        server.stderr.off("data", onData);
        resolve(printed());
      };
      server.stderr.on("data", onData);
      server.exited.then(() => resolve(printed()));
    }));
    assert.ok(token, server.stderrText);
    const actors = `${server.url}/v1/inspector/actors`;
    const wrong = token.slice(0, -1) + (token.endsWith("0") ? "1" : "0");
    for (const headers of [{}, { authorization: `Bearer ${wrong}` }, { authorization: `Bearer ${token.slice(0, 32)}` }, { authorization: `Basic ${token}` }]) {
      const response = await fetch(actors, { headers });
      assert.equal(response.status, 401, JSON.stringify(headers));
      assert.equal(response.headers.get("www-authenticate"), 'Bearer realm="keel-inspector"');
      assert.deepEqual(await response.json(), {
        group: "auth",
        code: "unauthorized",
        message: "a valid inspector token is required",
        metadata: null,
      });
    }
    assert.equal((await fetch(actors, { headers: { authorization: `Bearer ${token}` } })).status, 200);

    const client = createClient(server.url);
    assert.equal(await client.watched.getOrCreate(["i"]).bump(5), 5);
    const inspector = createInspector(server.url, { token });
    const { actors: listed, nextCursor } = await inspector.actors();
    assert.equal(nextCursor, null);
    assert.deepEqual(
      listed.map(({ name, key, awake }) => ({ name, key, awake })),
      [{ name: "watched", key: ["i"], awake: true }],
    );
    const id = listed[0].actorId;
    assert.deepEqual(await inspector.state(id), { count: 5 });
    assert.equal(await inspector.call(id, "bump", 2), 7);
    assert.deepEqual(await inspector.state(id), { count: 7 });
    assert.deepEqual(await inspector.kv(id), { entries: [], nextCursor: null });
    assert.deepEqual(await inspector.schedules(id), []);
    assert.deepEqual(await inspector.connections(id), []);
    await assert.rejects(createInspector(server.url, { token: wrong }).actors(), { group: "auth", code: "unauthorized" });
    await assert.rejects(inspector.state("f".repeat(32)), { group: "actor", code: "not_found" });
  });

  const tokenLines = lines.filter((line) => line.includes(token));
  assert.equal(tokenLines.length, 1, "the token shows exactly once: the dev-mode announcement");
  assert.ok(!tokenLines[0].startsWith("{"), "and that line is not a log line");
  const logLines = lines.filter((line) => line !== tokenLines[0]);
  assert.ok(logLines.length > 20, `a full trace log (${logLines.length} lines)`);
  for (const line of logLines) {
    const object = JSON.parse(line);
    assert.ok(!/bearer/i.test(line), `a log line mentions the scheme: ${line}`);
    assert.ok(!line.includes(token.slice(0, 16)), `a log line holds part of the token: ${line}`);
    assert.ok(typeof object.msg === "string");
  }
  assert.ok(
    logLines.some((line) => JSON.parse(line).msg.startsWith("inspector enabled with a generated token")),
    "an info line says where the token went",
  );
});

test("the inspector is off without a token outside dev mode, and takes KEEL_INSPECTOR_TOKEN", async (t) => {
  const token = "configured-token-0123456789";
  await run(t, { KEEL_INSPECTOR_TOKEN: "" }, async (server) => {
    const response = await fetch(`${server.url}/v1/inspector/actors`, { headers: { authorization: `Bearer ${token}` } });
    assert.equal(response.status, 404);
    assert.equal((await response.json()).code, "route_not_found");
  });
  await run(t, { KEEL_INSPECTOR_TOKEN: token }, async (server) => {
    assert.equal((await fetch(`${server.url}/v1/inspector/actors`)).status, 401);
    const response = await fetch(`${server.url}/v1/inspector/actors`, { headers: { authorization: `Bearer ${token}` } });
    assert.equal(response.status, 200);
  });
  const short = await startServer(t, { dataDir: tempDir(t), script: observed, env: { KEEL_INSPECTOR_TOKEN: "tooShortTok" } }).catch((err) => err);
  assert.match(short.message, /start failed: registry\.invalid_config: .*inspector token must be 16 to 512/);
  assert.doesNotMatch(short.message, /tooShortTok/, "the message does not repeat the token");
});

test("serverless requests reach the inspector only with allowRemote", async (t) => {
  const token = "serverless-token-0123456789";
  const counter = actor({ state: { n: 0 }, actions: { inc: (c) => ++c.state.n } });
  const request = (registry) =>
    registry.handler(new Request("http://local/v1/inspector/actors", { headers: { authorization: `Bearer ${token}` } }));
  const closed = setup({ use: { counter }, dataDir: tempDir(t), inspector: { token } });
  t.after(() => closed.shutdown());
  const refused = await request(closed);
  assert.equal(refused.status, 403);
  assert.equal((await refused.json()).code, "forbidden");
  const open = setup({ use: { counter }, dataDir: tempDir(t), inspector: { token, allowRemote: true } });
  t.after(() => open.shutdown());
  assert.equal((await request(open)).status, 200);
});

test("/metrics is Prometheus text and its counters move with actions", async (t) => {
  const work = actor({
    state: { n: 0 },
    actions: {
      inc: (c) => ++c.state.n,
      refuse: () => {
        throw new UserError("no", { code: "nope" });
      },
      crash: () => {
        throw new Error("crash");
      },
      later: (c) => c.schedule.after(60_000, "inc"),
    },
  });
  const registry = setup({ use: { work }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true });
  const serving = registry.start();
  const { url } = await registry.listening();
  const scrape = async () => {
    const response = await fetch(`${url}/metrics`);
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/plain; version=0.0.4; charset=utf-8");
    return parsePrometheus(await response.text());
  };
  const before = await scrape();
  const families = [...before.keys()].sort();
  assert.deepEqual(families, [
    "keel_action_duration_seconds",
    "keel_actions_total",
    "keel_actors_awake",
    "keel_commit_duration_seconds",
    "keel_commits_total",
    "keel_connections_hibernated",
    "keel_connections_open",
    "keel_runtime_builds_total",
    "keel_schedules_fired_total",
    "keel_schedules_pending",
    "keel_shutdown_phase",
  ]);
  assert.equal(before.get("keel_actions_total").type, "counter");
  assert.equal(before.get("keel_actors_awake").type, "gauge");
  assert.equal(before.get("keel_commit_duration_seconds").type, "histogram");
  assert.equal(sample(before, "keel_runtime_builds_total"), 1);
  assert.equal(sample(before, "keel_shutdown_phase", { phase: "running" }), 1);

  const client = createClient(url);
  for (let i = 0; i < 10; i++) await client.work.getOrCreate([`k${i % 3}`]).inc();
  await assert.rejects(client.work.getOrCreate(["k0"]).refuse(), { code: "nope" });
  await assert.rejects(client.work.getOrCreate(["k0"]).crash(), { code: "internal_error" });
  await client.work.getOrCreate(["k0"]).later();

  const after = await scrape();
  const moved = (name, labels) => sample(after, name, labels) - sample(before, name, labels);
  assert.equal(moved("keel_actions_total", { outcome: "ok" }), 11);
  assert.equal(moved("keel_actions_total", { outcome: "user_error" }), 1);
  assert.equal(moved("keel_actions_total", { outcome: "error" }), 1);
  assert.equal(moved("keel_actions_total", { outcome: "timeout" }), 0);
  assert.equal(moved("keel_action_duration_seconds_count"), 13);
  assert.equal(sample(after, "keel_actors_awake"), 3);
  assert.equal(sample(after, "keel_schedules_pending"), 1);
  assert.ok(moved("keel_commits_total") >= 4, "new actors, state changes and the schedule were committed");
  assert.equal(sample(after, "keel_commit_duration_seconds_count"), sample(after, "keel_commits_total"));
  assert.equal(registry.metrics().split("\n").find((l) => l.startsWith("keel_actors_awake ")), "keel_actors_awake 3");

  await registry.shutdown();
  await serving;
  const drained = parsePrometheus(registry.metrics());
  assert.equal(sample(drained, "keel_shutdown_phase", { phase: "stopped" }), 1);
  assert.equal(sample(drained, "keel_shutdown_phase", { phase: "running" }), 0);
  assert.equal(sample(drained, "keel_actions_total", { outcome: "ok" }), sample(after, "keel_actions_total", { outcome: "ok" }));
});

test("open connections show in /metrics and in the inspector until they close", async (t) => {
  const { room } = await import("./fixtures/chat.mjs");
  const token = "connections-token-0123456789";
  const registry = setup({ use: { room }, port: 0, dataDir: tempDir(t), disableSignalHandlers: true, inspector: { token } });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  const open = () => sample(parsePrometheus(registry.metrics()), "keel_connections_open");
  const until = async (what, condition) => {
    for (let i = 0; i < 500 && !(await condition()); i++) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.ok(await condition(), `timed out waiting for ${what}`);
  };
  const client = createClient(url);
  const ada = client.room.getOrCreate(["lobby"]).connect({ name: "ada" });
  const bob = client.room.getOrCreate(["lobby"]).connect({ name: "bob" });
  await Promise.all([ada.ready, bob.ready]);
  assert.equal(open(), 2);
  const inspector = createInspector(url, { token });
  const [{ actorId }] = (await inspector.actors()).actors;
  const listed = await inspector.connections(actorId);
  assert.equal(listed.length, 2);
  for (const conn of listed) {
    assert.match(conn.id, /^[0-9a-f]{16}$/);
    assert.ok(conn.openedAt > 0);
    assert.deepEqual(conn.details, { encoding: "cbor" }, "params stay out: they may hold credentials");
  }
  ada.dispose();
  await until("ada's connection leaves", () => open() === 1);
  assert.equal((await inspector.connections(actorId)).length, 1);
  bob.dispose();
  await until("bob's connection leaves", () => open() === 0);
  assert.deepEqual(await inspector.connections(actorId), []);
});
