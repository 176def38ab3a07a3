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

/** Metadata as plain JSON data, or `undefined` if it cannot be expressed as JSON. */
function plainMetadata(metadata: unknown): unknown {
  if (metadata === undefined) return undefined;
  try {
    const text = JSON.stringify(metadata);
    return text === undefined ? undefined : JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** Converts an error thrown by user code into the structured form core expects. */
export function errorInfoOf(err: unknown): ErrorBody {
  if (err instanceof UserError) {
    return { group: "user", code: String(err.code), message: String(err.message), metadata: plainMetadata(err.metadata) };
  }
  if (err instanceof KeelError) {
    return { group: err.group, code: err.code, message: err.message, metadata: plainMetadata(err.metadata) };
  }
  const message = err instanceof Error ? err.message : String(err);
  return { group: "actor", code: "internal_error", message };
}
