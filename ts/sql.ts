// How `c.db.execute` crosses to core: the parameters go as one CBOR value (an array for `?`
// placeholders, a map for named ones), the result comes back as the CBOR array
// `[columns, values, changes, lastInsertRowid]`, every row's values one after another
// (core's `actor_db.rs` reads and writes the other side).
import { decode, encode } from "./cbor";
import type { SqlRow, SqlValue } from "./db";
import { KeelError } from "./errors";

function badParameter(message: string): KeelError {
  return new KeelError({ group: "db", code: "bad_parameter", message: `invalid SQL parameters: ${message}` });
}

function checkValue(value: unknown, where: string): SqlValue {
  if (value === undefined || value === null) return null;
  switch (typeof value) {
    case "number":
    case "bigint":
    case "string":
    case "boolean":
      return value;
    default:
      if (value instanceof Uint8Array) return value;
      throw badParameter(`${where} is ${value === null ? "null" : typeof value === "object" ? (value.constructor?.name ?? "an object") : typeof value}; a parameter is null, a boolean, a number, a BigInt, a string or a Uint8Array`);
  }
}

function isNamed(params: unknown[]): params is [Record<string, unknown>] {
  if (params.length !== 1) return false;
  const only = params[0];
  return only !== null && typeof only === "object" && !(only instanceof Uint8Array);
}

/** The parameters of one statement, encoded; throws `db.bad_parameter` for what is not a SQL value. */
export function encodeSqlParams(params: unknown[]): Buffer {
  if (isNamed(params)) {
    const named = new Map<string, SqlValue>();
    for (const [name, value] of Object.entries(params[0])) {
      if (value !== undefined) named.set(name, checkValue(value, `parameter ${JSON.stringify(name)}`));
    }
    // A map with text keys; built as a plain object so the encoder writes a CBOR map.
    return Buffer.from(encode(Object.fromEntries(named)));
  }
  return Buffer.from(encode(params.map((value, index) => checkValue(value, `parameter ${index + 1}`))));
}

/** The rows of one statement's result, each an object by column name. */
export function decodeSqlRows(bytes: Buffer): SqlRow[] {
  const [columns, values] = decode(bytes) as [string[], SqlRow[string][], number, number];
  const rows: SqlRow[] = [];
  const width = columns.length;
  if (width === 0) return rows;
  for (let start = 0; start < values.length; start += width) {
    // `fromEntries` defines own properties, so a column named `__proto__` is just a column.
    rows.push(Object.fromEntries(columns.map((column, i) => [column, values[start + i]])) as SqlRow);
  }
  return rows;
}
