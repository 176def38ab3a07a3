// A typed HTTP client for keel: `createClient<typeof registry>(url)`.
import type { ActorDefinition, AnyActorDefinition } from "./actor";
import { decode, encode } from "./cbor";
import { ActorConnectionImpl, loadWebSocket, openWebSocket, type ConnectionStatus, type ReconnectOptions } from "./connection";
import { KeelError, type ErrorBody } from "./errors";
import { ACTOR_ID_HEADER, discover, EngineApi, gatewayUrl, gatewayUrlNow, type GatewayTarget, type ServerKind } from "./gateway";

/** Anything with actor definitions, such as a `Registry` from `setup()`. */
export interface RegistryLike {
  readonly definitions: Record<string, AnyActorDefinition>;
}

/** The actions of an actor definition. */
export type ActionsOf<D> = D extends ActorDefinition<any, any, infer A, any, any> ? A : never;
/** The `input` type of an actor definition. */
export type InputOf<D> = D extends ActorDefinition<any, infer I, any, any, any> ? I : never;
/** The declared events of an actor definition. */
export type EventsOf<D> = D extends ActorDefinition<any, any, any, any, infer E> ? E : never;
/** The payload type of a declared event. */
export type EventData<T> = T extends { readonly payload?: infer P } ? P : unknown;

/** Options for `handle.connect`. */
export interface ConnectOptions {
  /**
   * Called before every connect and reconnect attempt; what it returns (or resolves to) is
   * that attempt's params, in place of the `params` argument. Use it for tokens that expire.
   */
  getParams?: () => unknown;
  /** Reconnection with backoff (the default), or `false` to give up when the socket drops. */
  reconnect?: ReconnectOptions | false;
  /** A WebSocket constructor (defaults to the global one, or the `ws` package in Node). */
  WebSocket?: typeof WebSocket;
}

/** A live connection: events, actions over the socket, status, reconnection. */
export type ActorConnection<D> = ActionMethods<ActionsOf<D>> & {
  /** Listens for a declared event; returns a function that stops listening. */
  on<K extends keyof EventsOf<D> & string>(event: K, listener: (data: EventData<EventsOf<D>[K]>) => void): () => void;
  /** Resolves once admitted; rejects with the structured error if refused. */
  readonly ready: Promise<void>;
  /** `connecting`, `open`, `reconnecting` or `closed`. */
  readonly status: ConnectionStatus;
  /** Listens for status changes. */
  onStatusChange(listener: (status: ConnectionStatus) => void): () => void;
  /** Listens for errors: a refusal, or calls lost with a dropped socket. */
  onError(listener: (err: KeelError) => void): () => void;
  /** The actor's id once connected. */
  readonly actorId: string | undefined;
  /** Closes the connection for good. */
  dispose(): void;
};

/** The client-side form of an actor's actions: the context is dropped, results are promised. */
export type ActionMethods<A> = {
  [K in keyof A]: A[K] extends (c: any, ...args: infer P) => infer R ? (...args: P) => Promise<Awaited<R>> : never;
};

/** A handle to one actor; its methods call the actor's actions. */
export type ActorHandle<D> = ActionMethods<ActionsOf<D>> & {
  /** Resolves the handle to the actor's id (creating the actor if the handle allows). */
  resolve(): Promise<string>;
  /**
   * Opens a live connection with `params`, or with `connect({ getParams })` params fetched
   * afresh on every (re)connect attempt.
   */
  connect(params?: unknown, options?: ConnectOptions): ActorConnection<D>;
  /**
   * Sends a request to the actor's `onRequest` at `path` (below its raw route, query
   * included), with the client's headers under `init`'s own. Handles by key and from
   * `create` only: the raw route names the actor by key.
   */
  fetch(path: string, init?: RequestInit): Promise<Response>;
  /** Opens a raw WebSocket to the actor's `onWebSocket` at `path` (handles by key only). */
  webSocket(path?: string, protocols?: string | string[]): WebSocket;
  /** Calls an action by name (for names the typed methods cannot reach, such as `then`). */
  action(name: string, ...args: unknown[]): Promise<unknown>;
};

/** Options for `getOrCreate` and `create`. */
export interface CreateOptions<I> {
  /** Passed to `createState` when this call creates the actor. */
  input?: I;
}

/** Finds actors of one type. */
export interface ActorAccessor<D> {
  /** A handle to the actor with this key, created on first use. */
  getOrCreate(key?: string | readonly string[], options?: CreateOptions<InputOf<D>>): ActorHandle<D>;
  /** A handle to an existing actor; calls fail with `actor.not_found` if there is none. */
  get(key?: string | readonly string[]): ActorHandle<D>;
  /** Creates the actor (`actor.already_exists` if the key is taken) and returns a handle. */
  create(key?: string | readonly string[], options?: CreateOptions<InputOf<D>>): Promise<ActorHandle<D>>;
  /** A handle to the actor with this id. */
  getForId(actorId: string): ActorHandle<D>;
}

/** The typed client for a registry. */
export type Client<R extends RegistryLike> = {
  [K in keyof R["definitions"]]: ActorAccessor<R["definitions"][K]>;
};

/** Client settings. */
export interface ClientOptions {
  /**
   * Extra headers for every request: HTTP calls, `handle.fetch`, and the WebSocket upgrade of
   * `connect()` and `handle.webSocket()` where the platform can send them (Node, Bun). A
   * browser's WebSocket cannot set headers, so in a browser they reach HTTP only: send
   * credentials for connections as `params` (or `getParams`, to refresh them).
   */
  headers?: Record<string, string>;
  /** A `fetch` implementation (defaults to the global one). */
  fetch?: typeof fetch;
  /**
   * Which kind of server `url` is: keel's own (`"keel"`) or a Rivet Engine's gateway in front
   * of keel in engine mode (`"engine"`). Left out, the client asks once, with `GET /health`
   * before its first request, and keeps the answer (see docs/engine.md).
   */
  server?: ServerKind;
  /** Engine only: the engine namespace the actors live in (default `default`). */
  namespace?: string;
  /** Engine only: the pool (runner name) that hosts the actors it creates (default `default`). */
  pool?: string;
}

type Mode = "get" | "create" | "getOrCreate";
/** An actor by key, or by id (with its key when `create` learned it, for the raw routes). */
type Target = { kind: "key"; key: string[]; mode: Mode; input?: unknown } | { kind: "id"; id: string; key?: string[] };

export function normalizeKey(key: string | readonly string[] | undefined): string[] {
  if (key === undefined) return [];
  if (typeof key === "string") return [key];
  if (!Array.isArray(key) || key.some((segment) => typeof segment !== "string")) {
    throw new KeelError({ group: "request", code: "invalid_key", message: "a key is a string or an array of strings" });
  }
  return [...key];
}

/**
 * The canonical key string of docs/protocol.md, as core's key codec writes it: segments joined
 * by `/`, a backslash or `/` inside a segment escaped by a backslash, an empty segment written
 * as a backslash and `0`, the empty key as `/`. The client runs where core does not (browsers), so it writes the string
 * itself; the server decodes it with core's codec.
 */
function canonicalKey(key: readonly string[]): string {
  if (key.length === 0) return "/";
  return key.map((segment) => (segment === "" ? "\\0" : segment.replace(/[\\/]/g, (ch) => `\\${ch}`))).join("/");
}

/** `path` below a raw route, always starting with `/`. */
function rawSubPath(path: string): string {
  return path.startsWith("/") ? path : `/${path}`;
}

class Transport {
  readonly base: string;
  readonly fetch: typeof fetch;
  /** The engine's API, used once the server is known to be an engine. */
  readonly engine: EngineApi;
  /** The kind of server, once known; a failed probe is forgotten, so the next call asks again. */
  private known: ServerKind | undefined;
  private probing: Promise<ServerKind> | undefined;
  /**
   * Engine only: the actor id each actor type and key resolved to, learned from the actor's
   * answers (keel's envoy names the answering actor in a header) and from `resolve()` and
   * `create()`. Actions by key go by that id, and the gateway no longer resolves the key on
   * every call; an id the engine answers is gone is forgotten, and the key is resolved again.
   */
  private readonly ids = new Map<string, string>();
  constructor(
    url: string,
    readonly options: ClientOptions,
  ) {
    this.base = url.replace(/\/+$/, "");
    this.fetch = options.fetch ?? ((...args) => globalThis.fetch(...args));
    this.known = options.server;
    this.engine = new EngineApi(
      this.base,
      { namespace: options.namespace ?? "default", pool: options.pool ?? "default" },
      this.fetch,
      options.headers,
    );
  }

  /** The kind of server, if already known (given, or asked). */
  get kindKnown(): ServerKind | undefined {
    return this.known;
  }

  /**
   * Which kind of server this is: asked once, then kept. A probe without an answer (the
   * server unreachable, or a browser withholding the answer from a page of a foreign origin)
   * is not kept: this request goes as to keel's own server, where it fails the way it would
   * have embedded, and the next one asks again.
   */
  async kind(): Promise<ServerKind> {
    if (this.known !== undefined) return this.known;
    this.probing ??= discover(this.base, this.fetch, this.options.headers).then((kind) => {
      this.probing = undefined;
      if (kind !== undefined) this.known = kind;
      return kind ?? "keel";
    });
    return this.probing;
  }

  /** The actor id `name`/`key` last resolved to, if known (engine only). */
  knownId(name: string, key: readonly string[]): string | undefined {
    return this.ids.get(idSlot(name, key));
  }

  /** Keeps `id` as what `name`/`key` resolves to (engine only). */
  learnId(name: string, key: readonly string[], id: string): void {
    this.ids.set(idSlot(name, key), id);
  }

  /** Forgets that `name`/`key` resolves to `id`; a newer id learned meanwhile stays. */
  forgetId(name: string, key: readonly string[], id: string): void {
    const slot = idSlot(name, key);
    if (this.ids.get(slot) === id) this.ids.delete(slot);
  }

  /** POSTs `body` (CBOR unless `json`) to `path` below the base URL and returns the decoded reply. */
  post(path: string, body: unknown, json = false): Promise<any> {
    return this.postUrl(`${this.base}${path}`, body, json);
  }

  /** POSTs `body` (CBOR unless `json`) to `url` and returns the decoded reply. */
  async postUrl(url: string, body: unknown, json = false): Promise<any> {
    const answer = await this.postAnswer(url, body, json);
    if (answer.error !== undefined) throw answer.error;
    return answer.body;
  }

  /**
   * POSTs `body` (CBOR unless `json`) to `url`: the decoded reply, or the structured error it
   * answered, with the id of the actor that answered when the answer names it (keel's envoy
   * does in engine mode; the engine's own answers do not). Throws only when no answer came or
   * it cannot be decoded.
   */
  async postAnswer(url: string, body: unknown, json = false): Promise<Answer> {
    // Encoding fails (with a TypeError naming the value) before anything is sent.
    const payload = json ? JSON.stringify(body) : encode(body);
    let response: Response;
    try {
      response = await this.fetch(url, {
        method: "POST",
        headers: json
          ? { "content-type": "application/json", ...this.options.headers }
          : { "content-type": "application/cbor", accept: "application/cbor", ...this.options.headers },
        body: payload,
      });
    } catch (cause) {
      throw new KeelError(
        { group: "client", code: "unreachable", message: `cannot reach ${this.base}: ${(cause as Error)?.message ?? cause}` },
        { cause },
      );
    }
    const bytes = new Uint8Array(await response.arrayBuffer());
    const isCbor = (response.headers.get("content-type") ?? "").startsWith("application/cbor");
    let parsed: any;
    try {
      parsed = isCbor ? decode(bytes) : JSON.parse(new TextDecoder().decode(bytes));
    } catch {
      throw new KeelError({
        group: "client",
        code: "bad_response",
        message: `the server answered ${response.status} with a body that cannot be decoded`,
      });
    }
    const actorId = response.headers.get(ACTOR_ID_HEADER) ?? undefined;
    if (!response.ok) {
      const body = (parsed ?? {}) as Partial<ErrorBody>;
      const error = new KeelError({
        group: body.group ?? "client",
        code: body.code ?? "bad_response",
        message: body.message ?? `the server answered ${response.status}`,
        metadata: body.metadata ?? undefined,
      });
      return { body: undefined, error, actorId };
    }
    return { body: parsed, error: undefined, actorId };
  }
}

/** One answer to a POST: its body, or the error it carried, and who answered if it says. */
interface Answer {
  body: any;
  error: KeelError | undefined;
  /** The id of the actor that answered; absent when the engine answered by itself. */
  actorId: string | undefined;
}

/** The slot of an actor type and key in the client's known ids. */
function idSlot(name: string, key: readonly string[]): string {
  return JSON.stringify([name, ...key]);
}

const CONNECTION_MEMBERS = new Set(["on", "ready", "status", "onStatusChange", "onError", "actorId", "dispose", "connId", "call"]);

/** Whether `connect`'s first argument is `{ getParams }` rather than params: a function cannot be sent as params. */
function isGetParamsOptions(value: unknown): value is { getParams: () => unknown } {
  return typeof value === "object" && value !== null && typeof (value as { getParams?: unknown }).getParams === "function";
}

function makeConnection(transport: Transport, name: string, target: Target, params: unknown, options: ConnectOptions = {}): any {
  const getParams = options.getParams ?? (isGetParamsOptions(params) ? params.getParams : undefined);
  const connection = new ActorConnectionImpl({
    url: async () =>
      (await transport.kind()) === "engine"
        ? { url: await gatewayUrl(transport.engine, gatewayTarget(name, target), "/connect"), protocols: ["rivet"] }
        : { url: `${transport.base}/v1/actors/${encodeURIComponent(name)}/connect` },
    ...(target.kind === "key"
      ? { key: target.key, mode: target.mode, input: target.input }
      : { key: [], mode: "get" as const, actorId: target.id }),
    params: getParams === undefined ? params : undefined,
    getParams,
    headers: transport.options.headers,
    reconnect: options.reconnect,
    WebSocket: options.WebSocket,
  });
  return new Proxy(connection, {
    get(object, property, receiver) {
      if (typeof property !== "string") return Reflect.get(object, property, receiver);
      if (property === "then") return undefined;
      if (CONNECTION_MEMBERS.has(property)) {
        const value = Reflect.get(object, property, object);
        return typeof value === "function" ? value.bind(object) : value;
      }
      return (...args: unknown[]) => object.call(property, args);
    },
  });
}

/** A target as the engine's gateway names it (`create` handles hold an id). */
function gatewayTarget(name: string, target: Target): GatewayTarget {
  if (target.kind === "id") return { kind: "id", id: target.id };
  if (target.mode === "create") {
    throw new KeelError({ group: "client", code: "unsupported", message: "a handle in create mode comes from create()" });
  }
  return { kind: "key", name, key: target.key, mode: target.mode, input: target.input };
}

/**
 * How often an action is sent to the engine's gateway in all while the engine answers that it
 * never delivered it: it could not resolve the actor's route or the actor did not become ready
 * in time (seen now and then for a new actor on a loaded engine; docs/engine.md). Those
 * answers mean the action did not run, so sending it again cannot run it twice.
 */
const GATEWAY_ATTEMPTS = 3;
const UNDELIVERED = new Set(["route_resolve_query_timeout", "actor_ready_timeout"]);
const undelivered = (err: unknown): boolean => err instanceof KeelError && UNDELIVERED.has(err.code);

/**
 * Engine answers that the actor the gateway waited for went away before the call reached it:
 * destroyed before it was ready (a call right after `c.destroy()`, while the engine finishes
 * the destroy: the key still names the old actor), or a new actor that lost its key to
 * another one created for the same key (an earlier attempt of this call that timed out). The
 * call did not run. By key, it is sent again after a short wait, so it resolves the key afresh
 * as embedded does (a fresh actor for `getOrCreate`, `actor.not_found` for `get`); by id it
 * is `actor.not_found`, as a destroyed actor's id is embedded.
 */
const GONE = new Set(["destroyed_while_waiting_for_ready", "destroyed_during_creation"]);
const GONE_ATTEMPTS = 8;
const gone = (err: unknown): err is KeelError => err instanceof KeelError && GONE.has(err.code);
/**
 * The envoy's own refusal of a call the gateway routed to an activation that is no longer
 * there (destroyed, or stopped since): it never reached an actor, and the gateway passes it on
 * instead of retrying. Sent again after a short wait, by key or by id, it reaches the actor's
 * current activation, or the engine's own answer for an actor that is gone.
 */
const ENVOY_REFUSED = new Set(["envoy.actor_not_found", "envoy.actor_generation_mismatch"]);
const envoyRefused = (err: unknown): boolean => err instanceof KeelError && ENVOY_REFUSED.has(err.fullCode);
const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The error of a call by id whose actor is gone: the engine answered, not an actor, that it
 * has no actor with this id (`actor.not_found`), or that the actor was destroyed before the
 * call reached it. The call did not run. The set holds the errors `sendAction` made for it.
 */
const goneById = new WeakSet<KeelError>();

/**
 * Sends one action to `gatewayTarget` through the engine's gateway until it is answered: the
 * answers that mean the engine never delivered it are sent again (see above). Resolves the
 * output; a by-key answer that names the actor teaches the client its id. By id, an actor
 * that is gone is `actor.not_found` (an error in `goneById`).
 */
async function sendAction(transport: Transport, name: string, target: GatewayTarget, action: string, args: unknown[]): Promise<unknown> {
  const url = await gatewayUrl(transport.engine, target, `/action/${encodeURIComponent(action)}`);
  for (let attempt = 1, goneAttempt = 1; ; attempt++) {
    const answer = await transport.postAnswer(url, { args });
    if (target.kind === "key" && answer.actorId !== undefined) transport.learnId(name, target.key, answer.actorId);
    const err = answer.error;
    if (err === undefined) return answer.body.output;
    if (target.kind === "id" && answer.actorId === undefined && (GONE.has(err.code) || err.is("actor.not_found"))) {
      const notFound = GONE.has(err.code)
        ? new KeelError({ group: "actor", code: "not_found", message: "the actor was destroyed" }, { cause: err })
        : new KeelError({ group: "actor", code: "not_found", message: err.message, metadata: err.metadata }, { cause: err });
      goneById.add(notFound);
      throw notFound;
    }
    // `actor.not_found` from the engine for getOrCreate by key: the key still named an actor
    // that is gone (being destroyed); the call did not run, and resolving afresh creates one.
    const keyNamedGone = target.kind === "key" && target.mode === "getOrCreate" && answer.actorId === undefined && err.is("actor.not_found");
    if (gone(err) || envoyRefused(err) || keyNamedGone) {
      if (goneAttempt >= GONE_ATTEMPTS) throw err;
      // 50 ms doubling: about 6 s in all for the engine to finish the destroy.
      await pause(50 * 2 ** (goneAttempt - 1));
      goneAttempt++;
      attempt--;
      continue;
    }
    if (attempt >= GATEWAY_ATTEMPTS || !undelivered(err)) throw err;
  }
}

function makeHandle(transport: Transport, name: string, target: Target): any {
  const encodedName = encodeURIComponent(name);
  const call = async (action: string, args: unknown[]) => {
    const encodedAction = encodeURIComponent(action);
    if ((await transport.kind()) === "engine") {
      if (target.kind === "key") {
        // By the id the key resolved to before, if known: the gateway then has no key to
        // resolve. Once the engine says that actor is gone (destroyed), the id is forgotten
        // and the key resolved again, as the handle's mode says: a fresh actor for
        // `getOrCreate`, `actor.not_found` for `get`.
        const known = transport.knownId(name, target.key);
        if (known !== undefined) {
          try {
            return await sendAction(transport, name, { kind: "id", id: known }, action, args);
          } catch (err) {
            if (!(err instanceof KeelError && goneById.has(err))) throw err;
            transport.forgetId(name, target.key, known);
          }
        }
      }
      return sendAction(transport, name, gatewayTarget(name, target), action, args);
    }
    const reply =
      target.kind === "key"
        ? await transport.post(`/v1/actors/${encodedName}/actions/${encodedAction}`, {
            key: target.key,
            args,
            mode: target.mode,
            input: target.input,
          })
        : await transport.post(`/v1/ids/${encodeURIComponent(target.id)}/actions/${encodedAction}`, { args });
    return reply.output;
  };
  const resolve = async (): Promise<string> => {
    if (target.kind === "id") return target.id;
    if ((await transport.kind()) === "engine") {
      const id = await transport.engine.resolve(gatewayTarget(name, target));
      transport.learnId(name, target.key, id);
      return id;
    }
    const reply = await transport.post(`/v1/actors/${encodedName}/resolve`, {
      key: target.key,
      mode: target.mode,
      input: target.input,
    });
    return reply.actorId;
  };
  const rawUrl = (path: string): string => {
    const key = target.key;
    if (key === undefined) {
      throw new KeelError({ group: "client", code: "unsupported", message: "raw routes name the actor by key; a handle from getForId has none" });
    }
    return `${transport.base}/v1/actors/${encodedName}/raw/${encodeURIComponent(canonicalKey(key))}${rawSubPath(path)}`;
  };
  const rawFetch = (path: string, init: RequestInit = {}): Promise<Response> => {
    // Against keel's own server a handle without a key throws at once, as it always has.
    if (transport.kindKnown === "keel") rawUrl(path);
    return (async () => {
      const headers = new Headers(transport.options.headers);
      new Headers(init.headers).forEach((value, header) => headers.set(header, value));
      const url =
        (await transport.kind()) === "engine"
          ? await gatewayUrl(transport.engine, gatewayTarget(name, target), `/request${rawSubPath(path)}`)
          : rawUrl(path);
      return transport.fetch(url, { ...init, headers });
    })();
  };
  const rawWebSocket = (path = "/", protocols?: string | string[]): WebSocket => {
    const kind = transport.kindKnown;
    if (kind === undefined) {
      // A WebSocket is returned at once, so the kind of server must be known already.
      throw new KeelError({
        group: "client",
        code: "server_unknown",
        message: "webSocket() needs to know which kind of server this is: make any call first, or pass the client's `server` option",
      });
    }
    if (kind === "engine") {
      const url = gatewayUrlNow(transport.engine, gatewayTarget(name, target), `/websocket${rawSubPath(path)}`);
      const offered = protocols === undefined ? [] : typeof protocols === "string" ? [protocols] : protocols;
      return openWebSocket(loadWebSocket(), url.replace(/^http/, "ws"), ["rivet", ...offered], transport.options.headers);
    }
    const url = rawUrl(path).replace(/^http/, "ws");
    return openWebSocket(loadWebSocket(), url, protocols, transport.options.headers);
  };
  return new Proxy(Object.create(null), {
    get(_target, property) {
      if (typeof property !== "string") return undefined;
      // Not a thenable: `await handle` must yield the handle itself.
      if (property === "then") return undefined;
      if (property === "resolve") return resolve;
      if (property === "fetch") return rawFetch;
      if (property === "webSocket") return rawWebSocket;
      if (property === "connect") return (params?: unknown, options?: ConnectOptions) => makeConnection(transport, name, target, params, options);
      if (property === "action") return (action: string, ...args: unknown[]) => call(action, args);
      return (...args: unknown[]) => call(property, args);
    },
  });
}

/** Creates a typed client for the registry served at `url`. */
export function createClient<R extends RegistryLike>(url: string, options: ClientOptions = {}): Client<R> {
  const transport = new Transport(url, options);
  const accessors = new Map<string, ActorAccessor<AnyActorDefinition>>();
  const accessorFor = (name: string): ActorAccessor<AnyActorDefinition> => {
    let accessor = accessors.get(name);
    if (accessor !== undefined) return accessor;
    accessor = {
      getOrCreate: (key, opts) =>
        makeHandle(transport, name, { kind: "key", key: normalizeKey(key), mode: "getOrCreate", input: opts?.input }),
      get: (key) => makeHandle(transport, name, { kind: "key", key: normalizeKey(key), mode: "get" }),
      create: async (key, opts) => {
        if ((await transport.kind()) === "engine") {
          const id = await transport.engine.create(name, normalizeKey(key), opts?.input);
          transport.learnId(name, normalizeKey(key), id);
          return makeHandle(transport, name, { kind: "id", id, key: normalizeKey(key) });
        }
        const reply = await transport.post(`/v1/actors/${encodeURIComponent(name)}/resolve`, {
          key: normalizeKey(key),
          mode: "create",
          input: opts?.input,
        });
        return makeHandle(transport, name, { kind: "id", id: reply.actorId, key: normalizeKey(key) });
      },
      getForId: (actorId) => makeHandle(transport, name, { kind: "id", id: actorId }),
    };
    accessors.set(name, accessor);
    return accessor;
  };
  return new Proxy(Object.create(null), {
    get(_target, property) {
      if (typeof property !== "string" || property === "then") return undefined;
      return accessorFor(property);
    },
  }) as Client<R>;
}

export { KeelError } from "./errors";
export type { ConnectionStatus, ReconnectOptions } from "./connection";
