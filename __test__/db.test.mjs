// `keel/db`: each actor's SQL database, through the built addon, on real files.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { actor, setup, createClient } from "keel";
import { db } from "keel/db";
import { fixtures, startServer, tempDir, waitForLine } from "./helpers.mjs";

/** What hooks saw, for the tests to check. */
const seen = [];
/** A `c.db` kept past its call by `keepDb`. */
const kept = {};
/** Whether the `flaky` type's onMigrate throws halfway. */
let migrationFails = true;

const notes = actor({
  state: { calls: 0 },
  options: { sleepTimeoutMs: 60_000 },
  db: db({
    onMigrate: async (d) => {
      await d.execute(`CREATE TABLE IF NOT EXISTS notes (
        id INTEGER PRIMARY KEY, body TEXT NOT NULL UNIQUE, n INTEGER, x REAL, data BLOB)`);
      await d.execute("CREATE INDEX IF NOT EXISTS notes_by_n ON notes (n)");
    },
  }),
  onSleep: async (c) => {
    await c.db.execute("INSERT INTO notes (body) VALUES ('slept')");
  },
  onDestroy: async (c) => {
    const [row] = await c.db.execute("SELECT count(*) AS n FROM notes");
    seen.push(`onDestroy saw ${row.n}`);
  },
  actions: {
    id: (c) => c.actorId,
    add: async (c, body, n = null) => {
      await c.db.execute("INSERT INTO notes (body, n) VALUES (?, ?)", body, n);
      c.state.calls += 1;
    },
    addNamed: async (c, body, n) => {
      await c.db.execute("INSERT INTO notes (body, n) VALUES (:body, $n)", { body, n });
      const rows = await c.db.execute("SELECT body, n FROM notes WHERE body = @body", { body });
      return rows;
    },
    types: async (c) => {
      await c.db.execute(
        "INSERT INTO notes (body, n, x, data) VALUES (?, ?, ?, ?)",
        "types",
        9007199254740993n,
        1.5,
        new Uint8Array([1, 2, 3]),
      );
      const [row] = await c.db.execute("SELECT body, n, x, data, NULL AS empty FROM notes WHERE body = 'types'");
      return { big: row.n === 9007199254740993n, x: row.x, data: [...row.data], nothing: row.empty };
    },
    seesOwnWrites: async (c) => {
      await c.db.execute("INSERT INTO notes (body) VALUES ('own')");
      const rows = await c.db.execute("SELECT body FROM notes WHERE body = 'own'");
      return rows.length;
    },
    addThenThrow: async (c, body) => {
      await c.db.execute("INSERT INTO notes (body) VALUES (?)", body);
      c.state.calls += 1;
      throw new Error("after the insert");
    },
    addThenDuplicate: async (c, body) => {
      await c.db.execute("INSERT INTO notes (body) VALUES (?)", `${body}-first`);
      c.state.calls += 1;
      await c.db.execute("INSERT INTO notes (body) VALUES (?)", body);
      await c.db.execute("INSERT INTO notes (body) VALUES (?)", body);
    },
    run: (c, sql, ...params) => c.db.execute(sql, ...params),
    bodies: async (c) => (await c.db.execute("SELECT body FROM notes ORDER BY id")).map((row) => row.body),
    calls: (c) => c.state.calls,
    nap: (c) => c.sleep(),
    destroyMe: (c) => c.destroy(),
    later: (c) => c.schedule.after(0, "scheduled"),
    scheduled: async (c) => {
      await c.db.execute("INSERT INTO notes (body) VALUES ('scheduled')");
    },
    keepDb: (c) => {
      kept.db = c.db;
    },
  },
});

const flaky = actor({
  state: {},
  db: db({
    onMigrate: async (d) => {
      const before = await d.execute("SELECT name FROM sqlite_master WHERE name = 'half'");
      seen.push(`migrate saw ${before.length}`);
      await d.execute("CREATE TABLE IF NOT EXISTS half (id INTEGER PRIMARY KEY)");
      await d.execute("INSERT INTO half DEFAULT VALUES");
      if (migrationFails) throw new Error("halfway");
    },
  }),
  actions: {
    rows: async (c) => (await c.db.execute("SELECT count(*) AS n FROM half"))[0].n,
  },
});

const limited = actor({
  state: {},
  db: db({
    statementTimeoutMs: 200,
    maxSizeBytes: 64 * 1024,
    onMigrate: (d) => d.execute("CREATE TABLE IF NOT EXISTS blobs (data BLOB)"),
  }),
  actions: {
    runaway: (c) => c.db.execute("WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) AS n FROM r"),
    grow: (c, bytes) => c.db.execute("INSERT INTO blobs VALUES (zeroblob(?))", bytes),
    count: async (c) => (await c.db.execute("SELECT count(*) AS n FROM blobs"))[0].n,
  },
});

const plain = actor({
  state: {},
  actions: {
    query: (c) => c.db.execute("SELECT 1"),
  },
});

async function start(t) {
  const dataDir = tempDir(t);
  const registry = setup({ use: { notes, flaky, limited, plain }, port: 0, dataDir, disableSignalHandlers: true });
  const serving = registry.start();
  const { url } = await registry.listening();
  t.after(async () => {
    await registry.shutdown();
    await serving;
  });
  return { registry, client: createClient(url), dataDir };
}

async function until(what, condition, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

async function rejects(promise, fullCode) {
  await assert.rejects(promise, (err) => {
    assert.equal(`${err.group}.${err.code}`, fullCode, err.message);
    return true;
  });
}

test("queries return row objects; ? and named parameters; values keep their types; a call sees its own writes", async (t) => {
  const { client } = await start(t);
  const handle = client.notes.getOrCreate(["basic"]);
  await handle.add("a", 1);
  await handle.add("b", 2);
  assert.deepEqual(await handle.run("SELECT body, n FROM notes WHERE n >= ? ORDER BY n", 1), [
    { body: "a", n: 1 },
    { body: "b", n: 2 },
  ]);
  assert.deepEqual(await handle.addNamed("c", 3), [{ body: "c", n: 3 }]);
  assert.deepEqual(await handle.types(), { big: true, x: 1.5, data: [1, 2, 3], nothing: null });
  assert.equal(await handle.seesOwnWrites(), 1);
  assert.deepEqual(await handle.run("INSERT INTO notes (body) VALUES ('d')"), []);
  await rejects(handle.run("SELECT ?", 1, 2), "db.bad_parameter");
  await rejects(handle.run("SELECT :a", { b: 1 }), "db.bad_parameter");
  await rejects(handle.run("SELECT 1; SELECT 2"), "db.sql_error");
});

test("a throwing call's SQL is rolled back with its state; a SQL error or constraint violation changes nothing", async (t) => {
  const { client } = await start(t);
  const handle = client.notes.getOrCreate(["rollback"]);
  await handle.add("kept");
  await rejects(handle.addThenThrow("thrown"), "actor.internal_error");
  await rejects(handle.addThenDuplicate("dup"), "db.constraint");
  await rejects(handle.run("SELEC nonsense"), "db.sql_error");
  await rejects(handle.run("SELECT * FROM missing"), "db.sql_error");
  assert.deepEqual(await handle.bodies(), ["kept"]);
  assert.equal(await handle.calls(), 1);
});

test("c.db works in onSleep, onDestroy and scheduled actions; destroy deletes the file", async (t) => {
  seen.length = 0;
  const { client, dataDir } = await start(t);
  const handle = client.notes.getOrCreate(["hooks"]);
  const id = await handle.id();
  const file = join(dataDir, "keel.db.actors", `${id}.db`);
  assert.ok(existsSync(file), "the actor's database file exists while it runs");
  await handle.nap();
  assert.deepEqual(await handle.bodies(), ["slept"]);
  await handle.later();
  await until("the scheduled insert", async () => (await handle.bodies()).includes("scheduled"));
  await handle.destroyMe();
  await until("the file's removal", () => !existsSync(file));
  assert.deepEqual(seen, ["onDestroy saw 2"]);
  assert.ok(!existsSync(`${file}-wal`));
});

test("statements outside a call, or from an instance that has stopped, are refused", async (t) => {
  const { client } = await start(t);
  const handle = client.notes.getOrCreate(["late"]);
  await handle.keepDb();
  await rejects(kept.db.execute("INSERT INTO notes (body) VALUES ('between calls')"), "db.unavailable");
  await handle.nap();
  assert.deepEqual(await handle.bodies(), ["slept"]);
  await rejects(kept.db.execute("INSERT INTO notes (body) VALUES ('old instance')"), "db.unavailable");
  assert.deepEqual(await handle.bodies(), ["slept"]);
});

test("onMigrate that throws halfway applies nothing, fails the start clearly, and the next start retries", async (t) => {
  seen.length = 0;
  migrationFails = true;
  const { client } = await start(t);
  const handle = client.flaky.getOrCreate(["m"]);
  await rejects(handle.rows(), "db.migration_failed");
  migrationFails = false;
  assert.equal(await handle.rows(), 1);
  assert.deepEqual(seen, ["migrate saw 0", "migrate saw 0"]);
});

test("a runaway statement is interrupted at the time limit; the size limit holds", async (t) => {
  const { client } = await start(t);
  const handle = client.limited.getOrCreate(["l"]);
  await rejects(handle.runaway(), "db.statement_timed_out");
  await handle.grow(1000);
  await rejects(handle.grow(200 * 1024), "db.too_large");
  assert.equal(await handle.count(), 1);
});

test("hostile SQL is refused: ATTACH, settings pragmas, VACUUM INTO, transactions, keel's tables, DDL outside onMigrate", async (t) => {
  const { client, dataDir } = await start(t);
  const handle = client.notes.getOrCreate(["hostile"]);
  const outside = join(dataDir, "evil.db");
  for (const sql of [
    `ATTACH '${outside}' AS evil`,
    "PRAGMA journal_mode = DELETE",
    "PRAGMA foreign_keys = OFF",
    `VACUUM INTO '${outside}'`,
    "BEGIN",
    "COMMIT",
    "SAVEPOINT s",
    "SELECT * FROM _keel_applied",
    "UPDATE _keel_applied SET seq = 0",
    "CREATE TABLE sneaky (x)",
    "DROP TABLE notes",
    "CREATE TEMP TABLE t (x)",
  ]) {
    await rejects(handle.run(sql), "db.not_allowed");
  }
  assert.ok(!existsSync(outside), "nothing was written outside the actor's folder");
  assert.deepEqual(await handle.run("PRAGMA user_version"), [{ user_version: 0 }]);
  assert.equal((await handle.run("PRAGMA table_info(notes)")).length, 5);
  await handle.add("still works");
  assert.deepEqual(await handle.bodies(), ["still works"]);
});

test("c.db on a type without db fails with db.unavailable", async (t) => {
  const { client } = await start(t);
  await rejects(client.plain.getOrCreate(["p"]).query(), "db.unavailable");
});

test("kill -9 after acknowledged SQL writes loses none of them", async (t) => {
  const dataDir = tempDir(t);
  const script = join(fixtures, "db-server.mjs");
  const server = await startServer(t, { dataDir, script });
  const client = createClient(server.url);
  let acknowledged = 0;
  let killed = false;
  let sent = 0;
  const writer = async (w) => {
    while (!killed) {
      const body = `${w}-${sent++}`;
      try {
        await client.notes.getOrCreate(["hard"]).add(body);
        acknowledged++;
        if (acknowledged === 200) {
          killed = true;
          server.kill("SIGKILL");
        }
      } catch {
        // The server died under this request: it was never acknowledged.
      }
    }
  };
  await Promise.all([writer(0), writer(1), writer(2), writer(3)]);
  assert.equal((await server.exited).signal, "SIGKILL");
  const restarted = await startServer(t, { dataDir, script });
  const { rows, writes } = await createClient(restarted.url).notes.getOrCreate(["hard"]).count();
  assert.ok(rows >= acknowledged, `${acknowledged} acknowledged but only ${rows} rows`);
  assert.equal(rows, writes, "the rows and the state committed together");
  restarted.kill("SIGTERM");
  await waitForLine(restarted, "drained");
  await restarted.exited;
});
