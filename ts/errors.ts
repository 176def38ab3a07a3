/** Structured details of an error, as sent on the wire. */
export interface ErrorBody {
  group: string;
  code: string;
  message: string;
  metadata?: unknown;
}

/**
 * Every error keel reports: from the runtime, from the wire, or a `UserError` thrown by an
 * action and relayed to the client. Match on `group` and `code`, never on the message.
 */
export class KeelError extends Error {
  /** The error's group, such as `actor`, `registry`, `request` or `user`. */
  readonly group: string;
  /** The code within the group, such as `not_found`. */
  readonly code: string;
  /** Structured details, if any. */
  readonly metadata: unknown;

  constructor(body: ErrorBody, options?: { cause?: unknown }) {
    super(body.message, options);
    this.name = "KeelError";
    this.group = body.group;
    this.code = body.code;
    this.metadata = body.metadata ?? undefined;
  }

  /** `group.code`, the name the docs list errors by. */
  get fullCode(): string {
    return `${this.group}.${this.code}`;
  }

  /** Whether this error has the given `group.code`. */
  is(fullCode: string): boolean {
    return this.fullCode === fullCode;
  }
}

/**
 * Thrown by user code to send a deliberate error to the client. Its `code`, `message` and
 * `metadata` reach the caller as a `KeelError` with group `user`; the actor keeps running.
 */
export class UserError extends Error {
  readonly code: string;
  readonly metadata: unknown;

  constructor(message: string, options?: { code?: string; metadata?: unknown }) {
    super(message);
    this.name = "UserError";
    this.code = options?.code ?? "user_error";
    this.metadata = options?.metadata;
  }
}

/**
 * Thrown by user code to refuse the caller: it reaches the client as `auth.forbidden` (HTTP
 * 403, or the connection's `error` frame), with this message. RivetKit's name; `forbidden()`
 * makes one.
 */
export class Forbidden extends Error {
  constructor(message = "forbidden") {
    super(message);
    this.name = "Forbidden";
  }
}

/** A `Forbidden` error to throw: `throw forbidden("admins only")`. */
export function forbidden(message?: string): Forbidden {
  return new Forbidden(message);
}

/** Metadata as plain JSON data, or `undefined` if it cannot be read or expressed as JSON. */
function plainMetadata(read: () => unknown): unknown {
  try {
    const metadata = read();
    if (metadata === undefined) return undefined;
    const text = JSON.stringify(metadata);
    return text === undefined ? undefined : JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** The message of a throw whose own message cannot be read or turned into a string. */
const UNREADABLE_MESSAGE = "user code threw a value whose message cannot be read";

/** `value` as a string, or `undefined` if turning it into one throws. */
function stringOf(value: unknown): string | undefined {
  try {
    return typeof value === "string" ? value : String(value);
  } catch {
    return undefined;
  }
}

function internalError(message: string): ErrorBody {
  return { group: "actor", code: "internal_error", message };
}

/**
 * What user code threw, as core takes it. Any value at all may arrive here: objects without
 * a prototype, getters and `toString`s that throw, revoked proxies (on which even
 * `instanceof` throws). So every read is guarded, and what cannot be read becomes
 * `actor.internal_error` with a fixed message: a hostile throw fails its call, never the
 * process. A `UserError` keeps its code and message if both can be turned into strings; a
 * `Forbidden` is `auth.forbidden` with its message; a `KeelError` keeps its code only for the
 * `kv` limit errors, the `db` errors of the actor's SQL database, the `user` and
 * `auth.forbidden` errors of another actor,
 * `actor.state_change_mutation` and `actor.call_cycle`, the kinds core relays. Everything
 * else is `actor.internal_error`.
 */
export function errorInfoOf(err: unknown): ErrorBody {
  let kind: "user" | "forbidden" | "keel" | "error" | "other";
  try {
    kind =
      err instanceof UserError
        ? "user"
        : err instanceof Forbidden
          ? "forbidden"
          : err instanceof KeelError ? "keel" : err instanceof Error ? "error" : "other";
  } catch {
    return internalError(UNREADABLE_MESSAGE);
  }
  const read = (field: "code" | "group" | "message"): string | undefined => {
    try {
      return stringOf((err as Record<string, unknown>)[field]);
    } catch {
      return undefined;
    }
  };
  const metadata = () => plainMetadata(() => (err as { metadata: unknown }).metadata);
  if (kind === "user") {
    const code = read("code");
    const message = read("message");
    if (code === undefined) return internalError("a UserError was thrown whose code cannot be turned into a string");
    if (message === undefined) return internalError("a UserError was thrown whose message cannot be turned into a string");
    return { group: "user", code, message, metadata: metadata() };
  }
  const message = kind === "other" ? stringOf(err) : read("message");
  if (kind === "forbidden") return { group: "auth", code: "forbidden", message: message ?? "forbidden" };
  if (kind === "keel") {
    const group = read("group");
    const code = read("code");
    const relayed =
      group === "user" ||
      (group === "auth" && code === "forbidden") ||
      (group === "kv" && (code === "key_too_large" || code === "value_too_large")) ||
      group === "db" ||
      (group === "actor" && (code === "state_change_mutation" || code === "call_cycle"));
    if (relayed && code !== undefined && message !== undefined) return { group, code, message, metadata: metadata() };
  }
  return internalError(message ?? UNREADABLE_MESSAGE);
}
