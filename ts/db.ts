// `keel/db`: a SQL database per actor. `actor({ db: db({ onMigrate }), ... })` gives each
// actor of the type its own SQLite database, `c.db`; a call's statements commit atomically
// with its state, KV and schedules, and its reply waits for that commit (docs/actors.md,
// "SQL database"). This module holds only the definition and its types: the host runs the
// statements, so it never reaches a browser bundle.

/** A value a statement takes as a parameter. A boolean is stored as 1 or 0. */
export type SqlValue = null | number | bigint | string | Uint8Array | boolean;

/**
 * A value a query returns: an integer beyond ±(2^53 − 1) comes back as a `BigInt`, a blob as
 * a `Uint8Array`.
 */
export type SqlResult = null | number | bigint | string | Uint8Array;

/** One row of a query, by column name. */
export type SqlRow = Record<string, SqlResult>;

/** An actor's SQL database: `c.db`, and what `onMigrate` gets. */
export interface ActorDatabase {
  /**
   * Runs one statement and returns its rows (an empty array for a statement without
   * results). Parameters are positional (`?`, `?1`) or, given one object, named (`:name`,
   * `$name`, `@name`, written without the sigil in the object). Fails with a `KeelError` of
   * group `db` (`db.sql_error`, `db.constraint`, `db.not_allowed`, ...; see docs/errors.md).
   */
  execute<R extends Record<string, SqlResult> = SqlRow>(
    sql: string,
    ...params: SqlValue[] | [Readonly<Record<string, SqlValue | undefined>>]
  ): Promise<R[]>;
}

/** What `db()` takes. */
export interface DbConfig {
  /**
   * Runs on every start of the actor, before it serves its first call, in one transaction of
   * its own: if it throws, nothing of it is applied and the start fails with
   * `db.migration_failed` (the next start tries again). The only place that may change the
   * schema; write it idempotently (`CREATE TABLE IF NOT EXISTS`, `PRAGMA user_version`).
   */
  onMigrate?: (db: ActorDatabase) => void | Promise<void>;
  /** The largest an actor's database may grow, in bytes (default 1 GiB). */
  maxSizeBytes?: number;
  /** How long one statement may run before it is interrupted, in milliseconds (default 10000). */
  statementTimeoutMs?: number;
}

/** A type's database, as `actor({ db })` takes it. */
export interface DbDefinition {
  readonly kind: "keel.db";
  readonly config: Readonly<DbConfig>;
}

/** Gives each actor of a type its own SQL database: `actor({ db: db({ onMigrate }), ... })`. */
export function db(config: DbConfig = {}): DbDefinition {
  if (config === null || typeof config !== "object") throw new TypeError("db() takes a configuration object");
  if (config.onMigrate !== undefined && typeof config.onMigrate !== "function") throw new TypeError("onMigrate must be a function");
  for (const name of ["maxSizeBytes", "statementTimeoutMs"] as const) {
    const value = config[name];
    if (value !== undefined && (typeof value !== "number" || !Number.isInteger(value) || value <= 0)) {
      throw new TypeError(`db() option ${name} must be a positive whole number`);
    }
  }
  return { kind: "keel.db", config: Object.freeze({ ...config }) };
}
