// What one call carries across the host: KV keys checked against core's limits, client
// payloads and stored state decoded and encoded, and failures turned into error bodies.
//
// What must stay true: a payload a client sent that cannot be decoded is the client's error
// (`MalformedPayload`), stored state that cannot be decoded is damage (`CorruptState`), and
// anything user code throws becomes a structured `{ group, code, message }` body.
import { decode, encode } from "./cbor";
import { KeelError, errorInfoOf, type ErrorBody } from "./errors";
import type { KvKey } from "./actor";
import { kvLimits, type Completion } from "./native";

// Core enforces these on every commit; checking here too gives the caller the error at the
// `c.kv` call rather than when the action's effects are committed.
export const { maxKeyBytes: MAX_KV_KEY_BYTES, maxValueBytes: MAX_KV_VALUE_BYTES } = kvLimits();
export const DEFAULT_KV_LIST_LIMIT = 1000;

/**
 * A KV key as the binding takes it: a string, or a copy of the bytes (the caller may change
 * its array later). How keys are stored and ordered is core's KV key codec's business
 * (`crates/core/src/kv_key.rs`); the limit counts the key's own bytes.
 */
export function kvKey(key: KvKey): string | Buffer {
  let passed: string | Buffer;
  let length: number;
  if (typeof key === "string") {
    passed = key;
    length = Buffer.byteLength(key, "utf8");
  } else if (key instanceof Uint8Array) {
    passed = Buffer.from(key);
    length = passed.length;
  } else {
    throw new TypeError("a KV key is a string or a Uint8Array");
  }
  if (length > MAX_KV_KEY_BYTES) {
    throw new KeelError({
      group: "kv",
      code: "key_too_large",
      message: `a KV key is ${length} bytes; the limit is ${MAX_KV_KEY_BYTES}`,
      metadata: { limit: MAX_KV_KEY_BYTES },
    });
  }
  return passed;
}

/** Which pending write of the current call a key names: only an identity within this map. */
export function pendingId(key: string | Buffer): string {
  return typeof key === "string" ? `string:${key}` : `bytes:${key.toString("hex")}`;
}

export function failOn(result: { error?: { group: string; code: string; message: string; metadata?: unknown } | null }): void {
  if (result.error) throw new KeelError(result.error);
}

/** The error `onStateChange` gets, or makes its call fail with, when it changes the state. */
export function stateChangeMutation(how: string): KeelError {
  return new KeelError({ group: "actor", code: "state_change_mutation", message: `onStateChange may not change the state: it ${how}` });
}

/** Why an instance's `c.abortSignal` fires, by the reason core stops it. */
export function abortReason(reason: string): KeelError {
  if (reason === "reset") {
    return new KeelError({ group: "actor", code: "action_timed_out", message: "the call timed out; the actor's instance is discarded" });
  }
  return new KeelError({ group: "actor", code: "stopped", message: `the actor is stopping (${reason})` });
}

export function decodePayload(bytes: Buffer | undefined, encoding: string | undefined): unknown {
  if (bytes === undefined) return undefined;
  return encoding === "cbor" ? decode(bytes) : JSON.parse(bytes.toString("utf8"));
}

/**
 * A payload the client sent that the decoder refuses. Core checks CBOR before any JS runs (see
 * `crates/core/src/cbor.rs`), so this is a backstop: whatever slips past that check is still
 * the client's bad input, `request.malformed`, and not a throw of user code. Only the host
 * creates it, before any user code of the call runs.
 */
export class MalformedPayload extends Error {}

/** Decodes what a client sent: arguments, creation input or connection parameters. */
export function decodeClientPayload(bytes: Buffer | undefined, encoding: string | undefined, what: string): unknown {
  try {
    return decodePayload(bytes, encoding);
  } catch (err) {
    throw new MalformedPayload(`the ${what} cannot be decoded: ${errorInfoOf(err).message}`);
  }
}

/**
 * The error a failed call reports: the client's bad input, a damaged stored state, or whatever
 * user code threw.
 */
export function failureOf(err: unknown): ErrorBody {
  let known: MalformedPayload | CorruptState | undefined;
  try {
    // `instanceof` itself throws for a revoked proxy; `errorInfoOf` handles that one.
    known = err instanceof MalformedPayload || err instanceof CorruptState ? err : undefined;
  } catch {
    known = undefined;
  }
  if (known instanceof CorruptState) {
    return { group: "storage", code: "corrupt", message: known.message, metadata: { actorId: known.actorId } };
  }
  if (known !== undefined) return { group: "request", code: "malformed", message: known.message };
  return errorInfoOf(err);
}

/** A fixed error for a completion the binding refused, so its call still gets an answer. */
export function unsendable(id: number): Completion {
  return { kind: "failed", id, error: { group: "actor", code: "internal_error", message: "the call's result could not be handed to keel" } };
}

export function encodePayload(value: unknown, encoding: string | undefined): Buffer {
  if (encoding === "cbor") return Buffer.from(encode(value));
  const text = JSON.stringify(value);
  return Buffer.from(text === undefined ? "null" : text, "utf8");
}

/**
 * A stored state the decoder refuses. Core checks the state with this decoder's rules before
 * the host sees it (see `crates/core/src/cbor.rs`), so this is a backstop: whatever slips past
 * that check is damage on disk too, `storage.corrupt` for the actor, and not a throw of user
 * code. Only the host creates it, before any user code of the call runs.
 */
export class CorruptState extends Error {
  constructor(
    readonly actorId: string,
    reason: string,
  ) {
    super(`the stored state of actor ${actorId} cannot be decoded: ${reason}`);
  }
}

/** Decodes an actor's stored state. */
export function decodeStoredState(actorId: string, bytes: Buffer): unknown {
  try {
    return decode(bytes);
  } catch (err) {
    throw new CorruptState(actorId, errorInfoOf(err).message);
  }
}

export function encodeState(state: unknown): Buffer {
  return Buffer.from(encode(state));
}
