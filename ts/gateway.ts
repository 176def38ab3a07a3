// How the typed client reaches actors hosted by a Rivet Engine (keel's engine mode): through
// the engine's gateway, `/gateway/{name}/...?rvt-*` by key or `/gateway/{actorId}/...` by id,
// and the engine's `/actors` API to resolve and create. Bundled for browsers with client.ts:
// only `fetch`, `btoa` and keel's own CBOR here.
import { encode } from "./cbor";
import { KeelError, type ErrorBody } from "./errors";

/**
 * The response header by which keel's envoy names the actor that answered a tunneled request
 * (the engine's own answers carry none). The client learns a key's actor id from it.
 */
export const ACTOR_ID_HEADER = "x-keel-actor-id";

/** Which kind of server a client talks to. */
export type ServerKind = "keel" | "engine";

/**
 * Asks `base` which kind of server it is, with one `GET /health`: an engine answers
 * `{"runtime":"engine",...}`, keel `{"status":"ok"}` (or its JSON error while it drains).
 * `undefined` when the probe got no answer it could read: the server is unreachable, or a
 * browser withheld the answer (a page of an origin the server does not allow).
 */
export async function discover(base: string, fetchImpl: typeof fetch, headers?: Record<string, string>): Promise<ServerKind | undefined> {
  let response: Response;
  try {
    response = await fetchImpl(`${base}/health`, { headers });
  } catch {
    return undefined;
  }
  const body = await response.json().catch(() => undefined);
  return body !== null && typeof body === "object" && (body as { runtime?: unknown }).runtime === "engine" ? "engine" : "keel";
}

/** The engine's namespace and the pool (runner name) actors are created in. */
export interface EngineSettings {
  namespace: string;
  pool: string;
}

/** An actor as the engine's gateway names it. */
export type GatewayTarget =
  | { kind: "key"; name: string; key: string[]; mode: "get" | "getOrCreate"; input?: unknown }
  | { kind: "id"; id: string };

function base64(bytes: Uint8Array): string {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

/** The canonical key string (docs/protocol.md), the form the engine's `/actors` API takes. */
export function canonicalKey(key: readonly string[]): string {
  if (key.length === 0) return "/";
  return key.map((segment) => (segment === "" ? "\\0" : segment.replace(/[\\/]/g, (ch) => `\\${ch}`))).join("/");
}

/**
 * Whether the gateway's `rvt-key` can name this key: it joins segments with `,` unescaped
 * and reads `rvt-key=` as the empty key, so a segment holding `,` or the key `[""]` cannot.
 */
function queryCanName(key: readonly string[]): boolean {
  return !(key.length === 1 && key[0] === "") && key.every((segment) => !segment.includes(","));
}

/**
 * The gateway URL of `route` (such as `/action/increment`, `/connect`, `/request/x?y=1`) for
 * `target`, joining the route's own query with the `rvt-*` one. Keys the query cannot name
 * are resolved to an id through the engine's API first.
 */
export async function gatewayUrl(engine: EngineApi, target: GatewayTarget, route: string): Promise<string> {
  if (target.kind === "key" && !queryCanName(target.key)) {
    return gatewayUrlNow(engine, { kind: "id", id: await engine.resolve(target) }, route);
  }
  return gatewayUrlNow(engine, target, route);
}

/**
 * [`gatewayUrl`] without a round trip, for an id or a key the query can name; any other key
 * is `client.unsupported`.
 */
export function gatewayUrlNow(engine: EngineApi, target: GatewayTarget, route: string): string {
  const [path, ownQuery] = splitQuery(route);
  if (target.kind === "id") {
    return `${engine.base}/gateway/${encodeURIComponent(target.id)}${path}${ownQuery === undefined ? "" : `?${ownQuery}`}`;
  }
  if (!queryCanName(target.key)) {
    throw new KeelError({
      group: "client",
      code: "unsupported",
      message: "the gateway's rvt-key cannot name a key with a ',' in a segment, or the key [\"\"]; use a handle from getForId",
    });
  }
  const query = [
    ownQuery,
    `rvt-namespace=${encodeURIComponent(engine.settings.namespace)}`,
    `rvt-method=${target.mode}`,
    target.mode === "getOrCreate" ? `rvt-runner=${encodeURIComponent(engine.settings.pool)}` : undefined,
    target.key.length > 0 ? `rvt-key=${target.key.map(encodeURIComponent).join(",")}` : undefined,
    target.mode === "getOrCreate" && target.input !== undefined
      ? `rvt-input=${base64(encode(target.input)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "")}`
      : undefined,
  ].filter((part) => part !== undefined && part !== "");
  return `${engine.base}/gateway/${encodeURIComponent(target.name)}${path}?${query.join("&")}`;
}

function splitQuery(route: string): [string, string | undefined] {
  const at = route.indexOf("?");
  return at < 0 ? [route, undefined] : [route.slice(0, at), route.slice(at + 1)];
}

/** The engine's `/actors` API: resolve and create actors by name and key. */
export class EngineApi {
  constructor(
    readonly base: string,
    readonly settings: EngineSettings,
    private readonly fetchImpl: typeof fetch,
    private readonly headers: Record<string, string> | undefined,
  ) {}

  private async request(method: string, path: string, body?: unknown): Promise<any> {
    const separator = path.includes("?") ? "&" : "?";
    const url = `${this.base}${path}${separator}namespace=${encodeURIComponent(this.settings.namespace)}`;
    let response: Response;
    try {
      response = await this.fetchImpl(url, {
        method,
        headers: { "content-type": "application/json", ...this.headers },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (cause) {
      throw new KeelError(
        { group: "client", code: "unreachable", message: `cannot reach ${this.base}: ${(cause as Error)?.message ?? cause}` },
        { cause },
      );
    }
    const parsed = await response.json().catch(() => undefined);
    if (!response.ok) {
      const error = (parsed ?? {}) as Partial<ErrorBody>;
      throw engineError({
        group: error.group ?? "client",
        code: error.code ?? "bad_response",
        message: error.message ?? `the engine answered ${response.status}`,
        metadata: error.metadata ?? undefined,
      });
    }
    return parsed;
  }

  private createBody(name: string, key: readonly string[], input: unknown) {
    return {
      name,
      key: canonicalKey(key),
      runner_name_selector: this.settings.pool,
      crash_policy: "sleep",
      ...(input === undefined ? {} : { input: base64(encode(input)) }),
    };
  }

  /** The id of the actor `target` names (creating it for `getOrCreate`). */
  async resolve(target: GatewayTarget): Promise<string> {
    if (target.kind === "id") return target.id;
    if (target.mode === "getOrCreate") {
      const reply = await this.request("PUT", "/actors", this.createBody(target.name, target.key, target.input));
      return reply.actor.actor_id;
    }
    const query = `name=${encodeURIComponent(target.name)}&key=${encodeURIComponent(canonicalKey(target.key))}`;
    const reply = await this.request("GET", `/actors?${query}`);
    const actor = reply?.actors?.[0];
    if (actor === undefined) {
      throw new KeelError({ group: "actor", code: "not_found", message: `no ${target.name} actor has this key` });
    }
    return actor.actor_id;
  }

  /**
   * Creates an actor; `actor.already_exists` if the key is taken. The engine answers a taken
   * key with `actor.duplicate_key`, or at times `actor.destroyed_during_creation` (the new
   * actor lost the key to the existing one): that one is `actor.already_exists` too when an
   * actor has the key.
   */
  async create(name: string, key: readonly string[], input: unknown): Promise<string> {
    try {
      const reply = await this.request("POST", "/actors", this.createBody(name, key, input));
      return reply.actor.actor_id;
    } catch (err) {
      if (err instanceof KeelError && err.group === "actor" && err.code === "destroyed_during_creation") {
        const existing = await this.resolve({ kind: "key", name, key: [...key], mode: "get" }).catch(() => undefined);
        if (existing !== undefined) {
          throw new KeelError({
            group: "actor",
            code: "already_exists",
            message: `a ${name} actor with this key already exists`,
            metadata: { existing_actor_id: existing, key: canonicalKey(key) },
          });
        }
      }
      throw err;
    }
  }
}

/** The engine's error in keel's terms where keel has its own code for it. */
function engineError(body: ErrorBody): KeelError {
  if (body.group === "actor" && body.code === "duplicate_key") {
    return new KeelError({ ...body, code: "already_exists" });
  }
  return new KeelError(body);
}
