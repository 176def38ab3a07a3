// A client for keel's inspector API (docs/observability.md): lists actors, reads an actor's
// state, KV entries, schedules and connections, and calls actions. The server sends values as
// base64 in the host's encoding (CBOR for keel's JS host), which this client decodes, and KV
// keys already decoded by core (a string, or base64 bytes, by `keyType`).
import type { KvKey } from "./actor";
import { decode } from "./cbor";
import { KeelError, type ErrorBody } from "./errors";

/** How to reach an inspector. */
export interface InspectorOptions {
  /** The inspector's bearer token: `inspector.token`, `KEEL_INSPECTOR_TOKEN`, or the one printed in dev mode. */
  token: string;
  /** A `fetch` implementation (defaults to the global one). */
  fetch?: typeof fetch;
}

/** One actor, awake or asleep. */
export interface InspectedActor {
  actorId: string;
  name: string;
  key: string[];
  /** When it was created, in epoch milliseconds. */
  createdAt: number;
  /** Whether its instance is running now. */
  awake: boolean;
}

/** One pending schedule. */
export interface InspectedSchedule {
  id: string;
  /** When it falls due, in epoch milliseconds. */
  at: number;
  action: string;
  args: unknown[];
  /** How many runs have failed so far. */
  attempts: number;
}

/** One open connection. */
export interface InspectedConnection {
  id: string;
  /** When it opened, in epoch milliseconds. */
  openedAt: number;
  /** What the connection layer shows of it. */
  details: unknown;
}

/** The inspector API, decoded. Every method rejects with a `KeelError` on an error response. */
export interface Inspector {
  /** One page of actors in (name, key) order; pass `nextCursor` back for the next page. */
  actors(options?: { name?: string; limit?: number; cursor?: string }): Promise<{ actors: InspectedActor[]; nextCursor: string | null }>;
  /** One actor. */
  actor(actorId: string): Promise<InspectedActor>;
  /** The actor's last committed state (`undefined` before its state was first saved). */
  state(actorId: string): Promise<unknown>;
  /** One page of the actor's KV entries in key order. */
  kv(actorId: string, options?: { prefix?: KvKey; limit?: number; cursor?: string }): Promise<{ entries: Array<[KvKey, unknown]>; nextCursor: string | null }>;
  /** The actor's pending schedules, soonest first. */
  schedules(actorId: string): Promise<InspectedSchedule[]>;
  /** The actor's open connections. */
  connections(actorId: string): Promise<InspectedConnection[]>;
  /** Calls an action with JSON arguments, as `POST /v1/ids/{id}/actions/{action}` does. */
  call(actorId: string, action: string, ...args: unknown[]): Promise<unknown>;
}

/** The query that keeps keys starting with `prefix`: `prefix` for a string, `bytesPrefix` for bytes. */
function prefixQuery(prefix: KvKey | undefined): { prefix?: string; bytesPrefix?: string } {
  if (prefix === undefined) return {};
  if (typeof prefix === "string") return { prefix };
  if (prefix instanceof Uint8Array) return { bytesPrefix: Buffer.from(prefix).toString("base64url") };
  throw new TypeError("a KV key is a string or a Uint8Array");
}

/** A key as the inspector sends it; a key of no known format (`raw`) comes back as its bytes. */
function kvKeyOf(key: string, keyType: string): KvKey {
  return keyType === "string" ? key : new Uint8Array(Buffer.from(key, "base64"));
}

function decodeValue(base64: string, encoding: string): unknown {
  const bytes = Buffer.from(base64, "base64");
  return encoding === "cbor" ? decode(bytes) : JSON.parse(bytes.toString("utf8"));
}

/** A client for the inspector of the keel server at `url`. */
export function createInspector(url: string, options: InspectorOptions): Inspector {
  if (typeof options?.token !== "string" || options.token === "") throw new TypeError("createInspector needs { token }");
  const base = url.replace(/\/+$/, "") + "/v1/inspector";
  const doFetch = options.fetch ?? fetch;
  const authorization = `Bearer ${options.token}`;

  async function request(path: string, init: RequestInit = {}): Promise<any> {
    const response = await doFetch(base + path, {
      ...init,
      headers: { ...(init.headers as Record<string, string> | undefined), authorization },
    });
    const text = await response.text();
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      throw new KeelError({ group: "request", code: "malformed", message: `the inspector answered ${response.status} with a non-JSON body` });
    }
    if (!response.ok) throw new KeelError(body as ErrorBody);
    return body;
  }

  const id = (actorId: string) => encodeURIComponent(actorId);
  const query = (params: Record<string, string | number | undefined>) => {
    const entries = Object.entries(params).filter((entry): entry is [string, string | number] => entry[1] !== undefined);
    return entries.length === 0 ? "" : "?" + new URLSearchParams(entries.map(([k, v]) => [k, String(v)])).toString();
  };

  return {
    actors: (o = {}) => request("/actors" + query({ name: o.name, limit: o.limit, cursor: o.cursor })),
    actor: (actorId) => request(`/actors/${id(actorId)}`),
    async state(actorId) {
      const body = await request(`/actors/${id(actorId)}/state`);
      return body.state === null ? undefined : decodeValue(body.state, body.encoding);
    },
    async kv(actorId, o = {}) {
      const body = await request(`/actors/${id(actorId)}/kv` + query({ ...prefixQuery(o.prefix), limit: o.limit, cursor: o.cursor }));
      const entries = (body.entries as Array<{ key: string; keyType: string; value: string }>).map(
        ({ key, keyType, value }) => [kvKeyOf(key, keyType), decodeValue(value, body.encoding)] as [KvKey, unknown],
      );
      return { entries, nextCursor: body.nextCursor };
    },
    async schedules(actorId) {
      const body = await request(`/actors/${id(actorId)}/schedules`);
      return (body.schedules as Array<{ id: string; at: number; action: string; args: string; attempts: number }>).map((s) => ({
        ...s,
        args: decode(Buffer.from(s.args, "base64")) as unknown[],
      }));
    },
    async connections(actorId) {
      return (await request(`/actors/${id(actorId)}/connections`)).connections;
    },
    async call(actorId, action, ...args) {
      const body = await request(`/actors/${id(actorId)}/actions/${encodeURIComponent(action)}`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ args }),
      });
      return body.output;
    },
  };
}
