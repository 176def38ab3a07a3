// `c.log`: lines from user code, written by keel's own logger inside the actor's span, so a
// JS line and a Rust line from the same actor have the same shape in every format (see
// docs/observability.md). A call above the process's most verbose enabled level returns before
// encoding anything or crossing into Rust.
import type { CoreRegistry } from "./native";

/**
 * The fields of a log line: each member becomes one field of the line, in order. A member
 * named like a key keel writes on that line (`name`, `key`, `actor_id`, `msg`, `message`, ...)
 * is written as `field.<name>`, so it never replaces the actor's identity.
 */
export type LogFields = Record<string, unknown>;

/** The levels user code logs at. `trace` is keel's own per-message level and is not offered. */
export type LogLevel = "error" | "warn" | "info" | "debug";

/**
 * `c.log`: structured lines through keel's logger, carrying the actor's `actor_id`, `name` and
 * `key` (and `action` at debug). The message should be a fixed, lowercase phrase; put values in
 * `fields`. Lines go to target `keel::js`, so `KEEL_LOG=info,keel::js=debug` shows user debug
 * lines alone.
 */
export interface ActorLog {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
}

const LEVELS: Readonly<Record<LogLevel, number>> = { error: 1, warn: 2, info: 3, debug: 4 };

/** Where lines go: the native registry and the most verbose level it can write. */
export interface LogSink {
  readonly native: CoreRegistry | undefined;
  /** 0 off, 1 error, 2 warn, 3 info, 4 debug, 5 trace (from `logMaxLevel()`). */
  readonly logMaxLevel: number;
}

/** Values JSON cannot show usefully, made readable: BigInt, Error, Map and Set. */
function replacer(_key: string, value: unknown): unknown {
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Error) return `${value.name}: ${value.message}`;
  if (value instanceof Map) return [...value.entries()];
  if (value instanceof Set) return [...value.values()];
  return value;
}

const UNSERIALIZABLE = JSON.stringify("[unserializable]");

function stringify(value: unknown): string | undefined {
  try {
    return JSON.stringify(value, replacer);
  } catch {
    return UNSERIALIZABLE;
  }
}

/** The fields as one JSON object's text; a field that cannot be encoded (a cycle) is shown as such. */
function encodeFields(fields: unknown): string | undefined {
  if (fields === undefined) return undefined;
  let isArray: boolean;
  try {
    isArray = Array.isArray(fields);
  } catch {
    // A revoked proxy: nothing in it can be read.
    return "{}";
  }
  if (fields === null || typeof fields !== "object" || isArray) {
    throw new TypeError("log fields must be an object such as { userId: 7 }");
  }
  try {
    return JSON.stringify(fields, replacer);
  } catch {
    // Field by field, so one that cannot be read or encoded does not take the others along.
    const parts: string[] = [];
    let names: string[];
    try {
      names = Object.keys(fields);
    } catch {
      names = [];
    }
    for (const name of names) {
      let encoded: string | undefined;
      try {
        encoded = stringify((fields as Record<string, unknown>)[name]);
      } catch {
        encoded = UNSERIALIZABLE;
      }
      if (encoded !== undefined) parts.push(`${JSON.stringify(name)}:${encoded}`);
    }
    return `{${parts.join(",")}}`;
  }
}

/** The message as text; one that cannot be turned into a string is logged as a fixed text. */
function messageText(msg: unknown): string {
  try {
    return typeof msg === "string" ? msg : String(msg);
  } catch {
    return "[a message that cannot be turned into a string]";
  }
}

/** Logs one line for the actor `identity`; throws a `TypeError` for an unknown level. */
export function writeLog(
  sink: LogSink,
  identity: { readonly actorId: string; readonly name: string; readonly key: readonly string[] },
  level: LogLevel,
  msg: string,
  fields?: LogFields,
): void {
  if (!Object.hasOwn(LEVELS, level)) {
    throw new TypeError(`unknown log level ${String(level)}; expected error, warn, info or debug`);
  }
  if (LEVELS[level] > sink.logMaxLevel) return;
  const native = sink.native;
  if (native === undefined) return;
  const text = messageText(msg);
  const encoded = encodeFields(fields);
  if (!native.log(identity.actorId, level, text, encoded)) {
    native.logDetached(identity.actorId, identity.name, [...identity.key], level, text, encoded);
  }
}

/** The `c.log` of one actor. */
export function createActorLog(
  sink: LogSink,
  identity: { readonly actorId: string; readonly name: string; readonly key: readonly string[] },
): ActorLog {
  return Object.freeze({
    debug: (msg: string, fields?: LogFields) => writeLog(sink, identity, "debug", msg, fields),
    info: (msg: string, fields?: LogFields) => writeLog(sink, identity, "info", msg, fields),
    warn: (msg: string, fields?: LogFields) => writeLog(sink, identity, "warn", msg, fields),
    error: (msg: string, fields?: LogFields) => writeLog(sink, identity, "error", msg, fields),
  });
}
