// Runs user code for core. Core sends invocations in batches; results go back in batches
// through `complete`, flushed once per microtask turn, so a burst of actions costs one hop
// each way. Each actor's instance (its live state and vars) lives here between invocations.
//
// Everything a call changes (state, KV writes, schedules, sleep/destroy requests) is collected
// per call and reported with its completion; core commits it atomically with the reply. A
// call that throws reports nothing, and its state changes are rolled back.
import { createActorClient } from "./actor-client";
import type { Client, RegistryLike } from "./client";
import type { ActorContext, AnyActorDefinition, Conn, KvKey, KvListOptions, RawWebSocket, ScheduledCall } from "./actor";
import { decode, encode } from "./cbor";
import type { ActorDatabase, SqlRow } from "./db";
import { decodeSqlRows, encodeSqlParams } from "./sql";
import { Forbidden, KeelError, errorInfoOf } from "./errors";
import { CallerRequest } from "./caller";
import { createActorLog } from "./log";
import {
  DEFAULT_KV_LIST_LIMIT,
  MAX_KV_VALUE_BYTES,
  abortReason,
  decodeClientPayload,
  decodeStoredState,
  encodePayload,
  encodeState,
  failOn,
  failureOf,
  kvKey,
  pendingId,
  stateChangeMutation,
  unsendable,
} from "./payloads";
import { type Completion, type CoreRegistry, type EffectsJs, type Invocation, type ScheduleOpJs } from "./native";

/** The invocation of one kind. */
type InvocationOf<K extends Invocation["kind"]> = Extract<Invocation, { kind: K }>;
/** The notices: what core tells without a call (no id, no completion). */
type Notice = InvocationOf<"conn_opened" | "conn_closed">;
/** The invocations that are calls, each answered by one completion. */
type Call = Exclude<Invocation, Notice>;

/** The state of an instance that has reported none yet; never written to, so shared. */
const NO_SNAPSHOT = Buffer.alloc(0);

/** What one call changed, reported with its completion. */
class Effects {
  readonly messages: Array<{ to?: string; event: string; data: unknown }> = [];
  readonly disconnects: Array<{ connId: string; reason: string }> = [];
  readonly schedules: ScheduleOpJs[] = [];
  sleep = false;
  destroy = false;
  // Every awake actor holds one of these between calls, and most calls touch none of the
  // collections below, so each is made on first use (an empty Map costs about 200 bytes).
  private kvWrites: Map<string, { key: string | Buffer; value: Buffer | null }> | undefined;
  private addedCalls: Map<string, ScheduledCall> | undefined;
  private cancelledIds: Set<string> | undefined;

  /** KV writes by `pendingId`; the last write of a key wins. */
  get kv(): Map<string, { key: string | Buffer; value: Buffer | null }> {
    return (this.kvWrites ??= new Map());
  }

  /** How many keys `kv` holds, without making it. */
  get kvCount(): number {
    return this.kvWrites?.size ?? 0;
  }

  /** The schedules this call added, by id, for `c.schedule.list()`. */
  get added(): Map<string, ScheduledCall> {
    return (this.addedCalls ??= new Map());
  }

  /** The schedule ids this call cancelled, for `c.schedule.list()`. */
  get cancelled(): Set<string> {
    return (this.cancelledIds ??= new Set());
  }

  /** Whether nothing was changed through these effects. */
  get empty(): boolean {
    return this.kvCount === 0 && this.schedules.length === 0 && !this.sleep && !this.destroy && this.messages.length === 0 && this.disconnects.length === 0;
  }
}

/** A connection as the host keeps it: the user-facing `Conn` plus its frame encoding. */
interface ConnEntry {
  readonly conn: Conn;
  readonly encoding: string;
  /**
   * With hibernatable connections: `conn.state` as last reported to core (durable), encoded;
   * `undefined` while nothing was reported.
   */
  snapshot?: Buffer;
}

/** Whether the type's connections survive its sleep: their `conn.state` is then durable. */
function hibernatable(instance: Instance): boolean {
  return instance.def.config.options?.hibernatableConnections === true;
}

/** A raw socket as the host keeps it. */
interface RawSocketEntry {
  readonly ws: RawWebSocket;
  readonly listeners: { message: Array<(event: { data: string | Uint8Array }) => unknown>; close: Array<(event: { code: number; reason: string }) => unknown> };
}

interface Instance {
  readonly def: AnyActorDefinition;
  readonly identity: Identity;
  readonly ctx: ActorContext<unknown, unknown>;
  state: unknown;
  vars: unknown;
  /** The state as last reported to core, encoded. */
  snapshot: Buffer;
  /** The effects of the call in progress. */
  effects: Effects;
  /** Open connections. */
  readonly conns: Map<string, ConnEntry>;
  /** The connection the current action came over. */
  currentConn: Conn | undefined;
  /** The HTTP request behind the current call or connection (`c.request`), if any. */
  currentRequest: CallerRequest | undefined;
  /** Open raw sockets. */
  readonly sockets: Map<string, RawSocketEntry>;
  /**
   * Aborted once the instance is stopping: sleep, destroy, shutdown, or a timed-out call. Made
   * when user code first asks for `c.abortSignal` (most actors never do); until then
   * `stopReason` alone says the instance is stopping.
   */
  abort: AbortController | undefined;
  /** Why the instance is stopping, once it is (what `abort` is aborted with). */
  stopReason: unknown;
  /** Set while `onStateChange` runs, so assigning `c.state` is refused. */
  observing: boolean;
  /** The `c.waitUntil` promises not settled yet; a stop waits for them, up to the grace. */
  readonly background: Set<Promise<void>>;
  /** The keep-awake holds this instance opened in core and has not closed yet. */
  holds: number;
  /** For a type with a SQL database, the token this instance's statements carry. */
  dbToken: number | undefined;
}

/** Who an instance is: `c.actorId`, `c.name` and `c.key`. */
interface Identity {
  readonly actorId: string;
  readonly name: string;
  readonly key: readonly string[];
}

/** `c`'s methods and method groups, made for an instance when its code first uses one. */
type ContextMethods = ReturnType<JsHost["contextMethods"]>;

/** The members of `ContextMethods`, each a getter on `c`'s prototype. */
const CONTEXT_METHODS = ["log", "kv", "schedule", "conns", "broadcast", "sleep", "destroy", "client", "db", "keepAwake", "waitUntil"] as const satisfies readonly (keyof ContextMethods)[];
/** Every member of `ContextMethods` has its getter (this fails to compile otherwise). */
type MissingContextGetters = Exclude<keyof ContextMethods, (typeof CONTEXT_METHODS)[number]>;
const everyMethodHasAGetter: [MissingContextGetters] extends [never] ? true : never = true;
void everyMethodHasAGetter;

/** Marks the instance as stopping for `reason`, aborting its `c.abortSignal` if it made one. */
function stopInstance(instance: Instance, reason: unknown): void {
  if (instance.stopReason !== undefined) return;
  instance.stopReason = reason;
  instance.abort?.abort(reason);
}

/**
 * The accessors of `c` (`state`, `vars`, `conn`, `request`, `abortSignal`, `aborted`), on one
 * prototype that every context shares. As getters of an object literal they were made anew for
 * each context, and V8 keeps accessors in an object's hidden class, so every awake actor had a
 * hidden class of its own (about 2 KB). The methods of `c` stay the context's own closures, so
 * they keep working when taken off it (`const { sleep } = c`).
 */
class ContextAccessors {
  readonly #instance: Instance;
  readonly #host: JsHost;
  #methods: ContextMethods | undefined;

  constructor(instance: Instance, host: JsHost) {
    this.#instance = instance;
    this.#host = host;
  }

  /** The methods, made on first use: most calls of most actors touch only `c.state`. */
  #made(): ContextMethods {
    return (this.#methods ??= this.#host.contextMethods(this.#instance));
  }

  static {
    // `c.log`, `c.kv`, …: each a getter of the bundle, defined once for every context.
    for (const name of CONTEXT_METHODS) {
      Object.defineProperty(ContextAccessors.prototype, name, {
        get(this: ContextAccessors) {
          return this.#made()[name];
        },
        configurable: true,
      });
    }
  }

  get state(): unknown {
    return this.#instance.state;
  }

  set state(value: unknown) {
    if (this.#instance.observing) throw stateChangeMutation("assigned c.state");
    this.#instance.state = value;
  }

  get vars(): unknown {
    return this.#instance.vars;
  }

  set vars(value: unknown) {
    this.#instance.vars = value;
  }

  get conn(): Conn | undefined {
    return this.#instance.currentConn;
  }

  get request(): Request | undefined {
    return this.#instance.currentRequest?.request;
  }

  /** Made on first use; already aborted if the instance is stopping by then. */
  get abortSignal(): AbortSignal {
    const instance = this.#instance;
    if (instance.abort === undefined) {
      instance.abort = new AbortController();
      if (instance.stopReason !== undefined) instance.abort.abort(instance.stopReason);
    }
    return instance.abort.signal;
  }

  get aborted(): boolean {
    return this.#instance.stopReason !== undefined;
  }
}

/** `c.conns`: the open connections as a read-only map of `Conn`s, over the host's entries. */
class ConnsView implements ReadonlyMap<string, Conn> {
  readonly #entries: Map<string, ConnEntry>;

  constructor(entries: Map<string, ConnEntry>) {
    this.#entries = entries;
  }

  get size(): number {
    return this.#entries.size;
  }

  get(id: string): Conn | undefined {
    return this.#entries.get(id)?.conn;
  }

  has(id: string): boolean {
    return this.#entries.has(id);
  }

  forEach(callback: (conn: Conn, id: string, map: ReadonlyMap<string, Conn>) => void): void {
    for (const [id, entry] of this.#entries) callback(entry.conn, id, this);
  }

  *entries(): MapIterator<[string, Conn]> {
    for (const [id, entry] of this.#entries) yield [id, entry.conn];
  }

  keys(): MapIterator<string> {
    return this.#entries.keys();
  }

  *values(): MapIterator<Conn> {
    for (const entry of this.#entries.values()) yield entry.conn;
  }

  [Symbol.iterator](): MapIterator<[string, Conn]> {
    return this.entries();
  }
}

export class JsHost {
  private readonly instances = new Map<string, Instance>();
  /**
   * For each actor running a call, the actors whose calls await that call, itself last: what
   * `c.client()` sends for its cycle check. An actor runs one call at a time, so one entry per
   * actor is enough; between calls there is none, and background work calls with an empty
   * chain. (Kept per actor rather than per async context: an AsyncLocalStorage would put a
   * promise hook on every promise of the process.)
   */
  private readonly chains = new Map<string, string[]>();

  private completions: Completion[] = [];
  private flushScheduled = false;
  /** Set once the native registry exists. */
  native: CoreRegistry | undefined;
  /** The most verbose level `c.log` can write (see `logMaxLevel()`); set with `native`. */
  logMaxLevel = 0;
  /** How long a stop waits for `c.waitUntil` promises (`waitUntilGraceMs`); set with `native`. */
  waitUntilGraceMs = 0;

  constructor(private readonly definitions: ReadonlyMap<string, AnyActorDefinition>) {}

  /**
   * Core's entry point: start every invocation of the batch, never throw. Notices are taken
   * at once, in order, so the calls after them see what they tell.
   */
  readonly dispatch = (batch: Invocation[]): void => {
    for (const invocation of batch) {
      if (invocation.kind === "conn_opened" || invocation.kind === "conn_closed") this.notice(invocation);
      else void this.run(invocation);
    }
  };

  /**
   * A connection opened or closed on a type without the hooks that would run then: core
   * admitted or closed it without a call, and tells it before the actor's next call.
   */
  private notice(notice: Notice): void {
    const instance = this.instances.get(notice.actorId);
    if (instance === undefined) return;
    if (notice.kind === "conn_closed") {
      instance.conns.delete(notice.connId);
      return;
    }
    let params: unknown;
    try {
      params = decodeClientPayload(notice.params, notice.encoding, "connection parameters");
    } catch {
      // Core checked the parameters before admitting the connection; no hook reads them.
      params = undefined;
    }
    this.addConn(instance, notice.connId, params, undefined, notice.encoding);
  }

  private async run(invocation: Call): Promise<void> {
    const chain = invocation.kind === "action" ? [...invocation.chain, invocation.actorId] : [invocation.actorId];
    this.chains.set(invocation.actorId, chain);
    let completion: Completion;
    try {
      completion = await this.invoke(invocation);
    } catch (err) {
      completion = { kind: "failed", id: invocation.id, error: failureOf(err) };
    } finally {
      // A timed-out call's code may end after the next call began: leave that one's entry.
      if (this.chains.get(invocation.actorId) === chain) this.chains.delete(invocation.actorId);
    }
    this.push(completion);
  }

  /** Runs one call's user code; rejects with what it throws. (No `await` per kind: the promise is handed on as it is.) */
  private async invoke(invocation: Call): Promise<Completion> {
    switch (invocation.kind) {
      case "action":
        return this.action(invocation);
      case "start":
        return this.start(invocation);
      case "stop":
        return this.stop(invocation);
      case "connect":
        return this.connect(invocation);
      case "disconnect":
        return this.disconnect(invocation);
      case "subscribe":
        return this.subscribe(invocation);
      case "request":
        return this.request(invocation);
      case "ws_open":
      case "ws_message":
      case "ws_close":
        return this.rawSocket(invocation);
      default:
        throw new Error(`unknown invocation kind ${(invocation as { kind: unknown }).kind}`);
    }
  }

  /** The client `c.client()` returns for one actor: calls carry the chain of its current call. */
  private client(actorId: string): Client<RegistryLike> {
    return createActorClient({
      native: () => this.native!,
      chain: () => this.chains.get(actorId) ?? [],
    });
  }

  private async start(invocation: InvocationOf<"start">): Promise<Completion> {
    const name = invocation.actorType;
    const def = this.definitions.get(name);
    if (def === undefined) throw new Error(`no definition for actor type ${name}`);
    const config = def.config;
    const identity = {
      actorId: invocation.actorId,
      name,
      key: Object.freeze([...invocation.key]),
    };
    const instance = this.newInstance(def, identity);
    instance.dbToken = invocation.dbToken ?? undefined;
    await this.migrate(instance, invocation.actorId);
    const isNew = invocation.state === undefined;
    let input: unknown;
    if (isNew) {
      input = decodeClientPayload(invocation.input, invocation.inputEncoding, "creation input");
      instance.state =
        config.createState !== undefined
          ? await config.createState(Object.freeze({ ...identity, log: createActorLog(this, identity) }), input)
          : config.state === undefined
            ? null
            : structuredClone(config.state);
      instance.snapshot = NO_SNAPSHOT;
    } else {
      instance.snapshot = invocation.state!;
      instance.state = decodeStoredState(invocation.actorId, instance.snapshot);
    }
    // Hibernatable connections come back with the instance, as durable: their connect hooks
    // do not run again.
    for (const restored of invocation.conns ?? []) {
      let params: unknown;
      try {
        params = decodeClientPayload(restored.params, restored.encoding, "connection parameters");
      } catch {
        params = undefined;
      }
      const state = restored.state === undefined ? undefined : decode(restored.state);
      this.addConn(instance, restored.connId, params, state, restored.encoding).snapshot = restored.state;
    }
    instance.vars =
      config.createVars !== undefined
        ? await config.createVars(instance.ctx as never)
        : config.vars === undefined
          ? undefined
          : structuredClone(config.vars);
    if (isNew) await config.onCreate?.(instance.ctx as never, input);
    await config.onWake?.(instance.ctx as never);
    const completion: Completion = { kind: "ok", id: invocation.id, effects: this.finishCall(instance) };
    this.instances.set(invocation.actorId, instance);
    return completion;
  }

  /**
   * Runs `onMigrate` in its own transaction, committed before the start goes on: a throw rolls
   * it back and fails the start with `db.migration_failed`.
   */
  private async migrate(instance: Instance, actorId: string): Promise<void> {
    const onMigrate = instance.def.config.db?.config.onMigrate;
    if (onMigrate === undefined || instance.dbToken === undefined) return;
    const native = this.native!;
    failOn(await native.dbMigration(actorId, instance.dbToken, "begin"));
    try {
      await onMigrate(instance.ctx.db);
    } catch (err) {
      await native.dbMigration(actorId, instance.dbToken, "rollback");
      throw new KeelError({ group: "db", code: "migration_failed", message: `onMigrate failed: ${errorInfoOf(err).message}` });
    }
    failOn(await native.dbMigration(actorId, instance.dbToken, "commit"));
  }

  /** Runs one statement of `c.db` (or of `onMigrate`'s database). */
  private async sqlExecute(instance: Instance, actorId: string, sql: unknown, params: unknown[]): Promise<SqlRow[]> {
    if (typeof sql !== "string") throw new TypeError("db.execute takes the SQL text as a string");
    if (instance.dbToken === undefined) {
      throw new KeelError({ group: "db", code: "unavailable", message: "this actor type has no database; give it one with `db: db()` from keel/db" });
    }
    const result = await this.native!.dbExecute(actorId, instance.dbToken, sql, encodeSqlParams(params));
    failOn(result);
    return decodeSqlRows(result.result!);
  }

  private instance(invocation: { actorId: string }): Instance {
    const instance = this.instances.get(invocation.actorId);
    if (instance === undefined) throw new Error("the actor's instance is not started");
    return instance;
  }

  /**
   * Runs one call of user code with fresh effects. A call that throws changes nothing: the
   * state goes back to the last reported one and its effects are dropped.
   */
  /**
   * Work outside any call (background work between calls) may have written KV, scheduled or
   * sent through `c`; no call carries those effects, so they are dropped, with a warning,
   * rather than committed by an unrelated call.
   */
  private dropBackgroundEffects(instance: Instance): void {
    if (instance.effects.empty) return;
    instance.ctx.log.warn("background work changed KV, schedules or connections outside a call; dropped", {
      kvWrites: instance.effects.kvCount,
      schedules: instance.effects.schedules.length,
      messages: instance.effects.messages.length,
    });
  }

  private async guarded<T>(instance: Instance, body: () => Promise<T>): Promise<T> {
    // Effects that are still empty (the usual case between calls) are kept, not remade.
    if (!instance.effects.empty) {
      this.dropBackgroundEffects(instance);
      instance.effects = new Effects();
    }
    try {
      return await body();
    } catch (err) {
      instance.state = decode(instance.snapshot);
      instance.effects = new Effects();
      // Durable connection states go back to their last reported values too.
      if (hibernatable(instance)) {
        for (const entry of instance.conns.values()) {
          entry.conn.state = entry.snapshot === undefined ? undefined : decode(entry.snapshot);
        }
      }
      throw err;
    }
  }

  private async action(invocation: InvocationOf<"action">): Promise<Completion> {
    const instance = this.instance(invocation);
    const fn = instance.def.config.actions[invocation.action];
    if (typeof fn !== "function") throw new Error(`unknown action ${invocation.action}`);
    return this.guarded(instance, async () => {
      instance.currentConn = invocation.connId === undefined ? undefined : instance.conns.get(invocation.connId)?.conn;
      instance.currentRequest = invocation.request === undefined ? undefined : new CallerRequest(invocation.request);
      try {
        const args = decodeClientPayload(invocation.args, invocation.encoding, "arguments") as unknown[];
        const result = await fn(instance.ctx, ...args);
        const output = encodePayload(result, invocation.outputEncoding);
        return { kind: "returned", id: invocation.id, output, effects: await this.settleCall(instance) };
      } finally {
        instance.currentConn = undefined;
        instance.currentRequest = undefined;
      }
    });
  }

  private async connect(invocation: InvocationOf<"connect">): Promise<Completion> {
    const instance = this.instance(invocation);
    const config = instance.def.config;
    const connId = invocation.connId;
    return this.guarded(instance, async () => {
      instance.currentRequest = invocation.request === undefined ? undefined : new CallerRequest(invocation.request);
      try {
        const params = decodeClientPayload(invocation.params, invocation.encoding, "connection parameters");
        await config.onBeforeConnect?.(instance.ctx as never, params);
        const state =
          config.createConnState !== undefined ? await config.createConnState(instance.ctx as never, params) : undefined;
        const conn = this.addConn(instance, connId, params, state, invocation.encoding).conn;
        try {
          await config.onConnect?.(instance.ctx as never, conn);
          return { kind: "ok", id: invocation.id, effects: await this.settleCall(instance) };
        } catch (err) {
          instance.conns.delete(connId);
          throw err;
        }
      } finally {
        instance.currentRequest = undefined;
      }
    });
  }

  /** Adds a connection to the instance's `c.conns`. */
  private addConn(instance: Instance, connId: string, params: unknown, state: unknown, encoding: string): ConnEntry {
    const conn: Conn = {
      id: connId,
      params,
      state,
      send(event: string, data?: unknown) {
        instance.effects.messages.push({ to: connId, event: String(event), data });
      },
      disconnect(reason = "") {
        instance.effects.disconnects.push({ connId, reason: String(reason) });
      },
    };
    const entry: ConnEntry = { conn, encoding };
    instance.conns.set(connId, entry);
    return entry;
  }

  private async disconnect(invocation: InvocationOf<"disconnect">): Promise<Completion> {
    const instance = this.instance(invocation);
    const entry = instance.conns.get(invocation.connId);
    if (entry === undefined) return { kind: "ok", id: invocation.id };
    instance.conns.delete(invocation.connId);
    return this.guarded(instance, async () => {
      await instance.def.config.onDisconnect?.(instance.ctx as never, entry.conn);
      return { kind: "ok", id: invocation.id, effects: await this.settleCall(instance) };
    });
  }

  /** A guarded event's `canSubscribe`: a `false` is `auth.forbidden`, a throw its own error. */
  private async subscribe(invocation: InvocationOf<"subscribe">): Promise<Completion> {
    const instance = this.instance(invocation);
    const check = instance.def.config.events?.[invocation.event]?.canSubscribe;
    const entry = instance.conns.get(invocation.connId);
    return this.guarded(instance, async () => {
      if (check === undefined || entry === undefined) throw new Error(`no canSubscribe for event ${invocation.event}`);
      const allowed = await check(instance.ctx as never, entry.conn);
      if (allowed !== true) throw new Forbidden(`this connection may not subscribe to ${invocation.event}`);
      return { kind: "ok", id: invocation.id, effects: this.finishCall(instance) };
    });
  }

  private async request(invocation: InvocationOf<"request">): Promise<Completion> {
    const instance = this.instance(invocation);
    const handler = instance.def.config.onRequest;
    return this.guarded(instance, async () => {
      // Core answers the raw route with a 404 itself when the type registered no onRequest.
      if (handler === undefined) throw new Error("this actor type has no onRequest handler");
      const method = invocation.method;
      const hasBody = method !== "GET" && method !== "HEAD";
      const request = new Request(`http://actor${invocation.path}`, {
        method,
        headers: invocation.headers.map(([name, value]) => [name, value] as [string, string]),
        body: hasBody ? new Uint8Array(invocation.body) : undefined,
      });
      const response = await handler(instance.ctx as never, request);
      if (!(response instanceof Response)) throw new TypeError("onRequest must return a Response");
      // A subclass of Response can override any of these getters, so check what they give:
      // a status in the range the Response constructor allows, headers as string pairs.
      const status = response.status;
      if (!Number.isInteger(status) || status < 200 || status > 599) throw new TypeError("onRequest's Response has an invalid status");
      const headers: string[][] = [];
      for (const pair of response.headers) {
        if (!Array.isArray(pair) || typeof pair[0] !== "string" || typeof pair[1] !== "string") {
          throw new TypeError("onRequest's Response has invalid headers");
        }
        headers.push([pair[0], pair[1]]);
      }
      const body = Buffer.from(await response.arrayBuffer());
      return { kind: "responded", id: invocation.id, response: { status, headers, body }, effects: await this.settleCall(instance) };
    });
  }

  private async rawSocket(invocation: InvocationOf<"ws_open" | "ws_message" | "ws_close">): Promise<Completion> {
    const instance = this.instance(invocation);
    const socketId = invocation.socketId;
    return this.guarded(instance, async () => {
      if (invocation.kind === "ws_open") {
        const handler = instance.def.config.onWebSocket;
        if (handler === undefined) throw new Error("this actor type has no onWebSocket handler");
        const entry = this.newRawSocket(socketId, invocation);
        instance.sockets.set(socketId, entry);
        await handler(instance.ctx as never, entry.ws);
      } else if (invocation.kind === "ws_message") {
        const entry = instance.sockets.get(socketId);
        const bytes = invocation.data;
        const data = invocation.binary ? new Uint8Array(bytes) : bytes.toString("utf8");
        for (const listener of entry?.listeners.message ?? []) await listener({ data });
      } else {
        const entry = instance.sockets.get(socketId);
        instance.sockets.delete(socketId);
        const event = { code: invocation.code, reason: invocation.reason };
        for (const listener of entry?.listeners.close ?? []) await listener(event);
      }
      return { kind: "ok", id: invocation.id, effects: await this.settleCall(instance) };
    });
  }

  private newRawSocket(socketId: string, invocation: InvocationOf<"ws_open">): RawSocketEntry {
    const host = this;
    const listeners: RawSocketEntry["listeners"] = { message: [], close: [] };
    const ws: RawWebSocket = {
      path: invocation.path,
      headers: Object.freeze(Object.fromEntries(invocation.headers.map(([n, v]) => [n, v]))),
      send(data: string | Uint8Array) {
        const binary = typeof data !== "string";
        const bytes = binary ? Buffer.from(data as Uint8Array) : Buffer.from(data as string, "utf8");
        const error = host.native!.rawSend(socketId, bytes, binary);
        if (error) throw new KeelError(error);
      },
      close(code = 1000, reason = "") {
        host.native!.rawClose(socketId, code, reason);
      },
      addEventListener(type: "message" | "close", listener: (event: never) => unknown) {
        if (type !== "message" && type !== "close") throw new TypeError(`unknown event ${type}`);
        (listeners[type] as unknown[]).push(listener);
      },
    } as RawWebSocket;
    return { ws, listeners };
  }

  private async stop(invocation: InvocationOf<"stop">): Promise<Completion> {
    const instance = this.instances.get(invocation.actorId);
    if (instance === undefined) return { kind: "ok", id: invocation.id };
    // User code's own work (fetches, loops, background promises) learns it should stop
    // before the stop hook runs.
    stopInstance(instance, abortReason(invocation.reason));
    // The actor's task outlives a discarded instance: close its holds, or a promise that
    // never settles would keep the actor awake for good.
    for (; instance.holds > 0; instance.holds -= 1) this.native!.keepAwake(invocation.actorId, false);
    if (invocation.reason === "reset") {
      // An action timed out and may still run: drop the instance without hooks. Whatever the
      // late code does now touches only this discarded object; core starts a fresh one.
      this.instances.delete(invocation.actorId);
      return { kind: "ok", id: invocation.id };
    }
    // What the background work changed (it ran after the last call's effects were taken) is
    // committed with the stop hook's effects.
    await this.settleBackground(instance);
    try {
      const config = instance.def.config;
      if (invocation.reason === "destroy") await config.onDestroy?.(instance.ctx as never);
      else await config.onSleep?.(instance.ctx as never);
      return { kind: "ok", id: invocation.id, effects: this.finishCall(instance) };
    } finally {
      this.instances.delete(invocation.actorId);
    }
  }

  /**
   * Waits for the instance's `c.waitUntil` promises, for at most `waitUntilGraceMs`. What they
   * changed (state, KV, schedules, events) is saved with the stop hook's effects (sleep and
   * shutdown).
   */
  private async settleBackground(instance: Instance): Promise<void> {
    if (instance.background.size === 0) return;
    let timer: NodeJS.Timeout | undefined;
    const grace = new Promise<void>((resolve) => (timer = setTimeout(resolve, this.waitUntilGraceMs)));
    try {
      await Promise.race([Promise.all(instance.background), grace]);
    } finally {
      clearTimeout(timer);
    }
    if (instance.background.size > 0) {
      instance.ctx.log.warn("c.waitUntil work did not finish within waitUntilGraceMs; stopping without it", {
        pending: instance.background.size,
        waitUntilGraceMs: this.waitUntilGraceMs,
      });
    }
  }

  /**
   * Ends a call of an action or a connection or request hook: if the call changed the state,
   * `onStateChange` sees the new state (and may broadcast) before the effects are taken. The
   * hook may not change the state: assigning `c.state` throws, and a state that encodes
   * differently after the hook fails the call, so the call's changes are rolled back.
   */
  private settleCall(instance: Instance): EffectsJs | undefined | Promise<EffectsJs | undefined> {
    const hook = instance.def.config.onStateChange;
    // Without the hook there is nothing to wait for: no promise of its own per call.
    if (hook === undefined) return this.finishCall(instance);
    return this.observeState(instance, hook);
  }

  /** `settleCall` with an `onStateChange` hook. */
  private async observeState(
    instance: Instance,
    hook: (c: never, state: unknown) => unknown,
  ): Promise<EffectsJs | undefined> {
    const changed = encodeState(instance.state);
    if (!changed.equals(instance.snapshot)) {
      instance.observing = true;
      try {
        await hook(instance.ctx as never, instance.state);
      } finally {
        instance.observing = false;
      }
      if (!encodeState(instance.state).equals(changed)) throw stateChangeMutation("changed a value inside c.state");
    }
    return this.finishCall(instance);
  }

  /**
   * Takes what a call changed, for its completion: the state if it changed, and the call's
   * other effects; `undefined` when it changed nothing.
   */
  private finishCall(instance: Instance): EffectsJs | undefined {
    const snapshot = encodeState(instance.state);
    const effects = instance.effects;
    // Empty effects hand nothing out below, so the next call may keep using them.
    if (!effects.empty) instance.effects = new Effects();
    let reported: EffectsJs | undefined;
    if (!snapshot.equals(instance.snapshot)) {
      instance.snapshot = snapshot;
      reported = { state: snapshot };
    }
    const connStates = hibernatable(instance) ? this.changedConnStates(instance) : undefined;
    if (connStates !== undefined) (reported ??= {}).connStates = connStates;
    if (effects.empty) return reported;
    reported ??= {};
    if (effects.kvCount > 0) reported.kv = [...effects.kv.values()].map(({ key, value }) => ({ key, value: value ?? undefined }));
    if (effects.schedules.length > 0) reported.schedules = effects.schedules;
    if (effects.sleep) reported.sleep = true;
    if (effects.destroy) reported.destroy = true;
    if (effects.messages.length > 0) reported.messages = effects.messages.map((m) => this.encodeMessage(instance, m));
    if (effects.disconnects.length > 0) reported.disconnects = effects.disconnects;
    return reported;
  }

  /**
   * The `conn.state` of every connection whose state changed since it was last reported
   * (hibernatable connections, whose state is durable): each one is encoded and compared, so
   * a call costs one encoding per connection of its actor.
   */
  private changedConnStates(instance: Instance): Array<{ connId: string; state: Buffer }> | undefined {
    let changed: Array<{ connId: string; state: Buffer }> | undefined;
    for (const [connId, entry] of instance.conns) {
      const state = entry.conn.state;
      if (state === undefined && entry.snapshot === undefined) continue;
      const encoded = encodeState(state);
      if (entry.snapshot !== undefined && encoded.equals(entry.snapshot)) continue;
      entry.snapshot = encoded;
      (changed ??= []).push({ connId, state: encoded });
    }
    return changed;
  }

  /** Encodes an event's data once for each encoding its recipients use. */
  private encodeMessage(instance: Instance, message: { to?: string; event: string; data: unknown }) {
    const encodings = new Set<string>();
    if (message.to !== undefined) {
      const entry = instance.conns.get(message.to);
      if (entry !== undefined) encodings.add(entry.encoding);
    } else {
      for (const entry of instance.conns.values()) encodings.add(entry.encoding);
    }
    // CBOR carries every supported value; a value JSON cannot express (a BigInt) must not
    // fail the call for CBOR clients, so JSON connections just do not get that event.
    let json: Buffer | undefined;
    if (encodings.has("json")) {
      try {
        json = encodePayload(message.data, "json");
      } catch {
        json = undefined;
      }
    }
    return {
      to: message.to,
      event: message.event,
      json,
      cbor: encodings.has("cbor") ? encodePayload(message.data, "cbor") : undefined,
    };
  }

  private newInstance(def: AnyActorDefinition, identity: Identity): Instance {
    const instance: Instance = {
      def,
      identity,
      state: undefined,
      vars: undefined,
      snapshot: NO_SNAPSHOT,
      effects: new Effects(),
      conns: new Map(),
      currentConn: undefined,
      currentRequest: undefined,
      sockets: new Map(),
      abort: undefined,
      stopReason: undefined,
      observing: false,
      background: new Set(),
      holds: 0,
      dbToken: undefined,
      ctx: undefined as never,
    };
    // Own properties: only the identity, the same for every instance, over one shared
    // prototype with the accessors and the methods: every context shares one hidden class,
    // and its methods are made when its code first uses one (see `ContextAccessors`).
    const ctx = Object.assign(new ContextAccessors(instance, this), identity);
    (instance as { ctx: unknown }).ctx = Object.freeze(ctx);
    return instance;
  }

  /** `c`'s methods for `instance` (`ContextAccessors` asks once, on the first use of one). */
  contextMethods(instance: Instance) {
    const host = this;
    const { def, identity } = instance;
    const actions = def.config.actions as Record<string, unknown>;
    // `at` is absolute; `after` goes to core as a delay, which core resolves on its own clock
    // (the one that fires schedules) when it takes the call's effects. Until then `list()`
    // shows it at core's clock now plus the delay.
    const schedule = (when: { at: number } | { after: number }, action: string, args: unknown[]): string => {
      if (typeof action !== "string") throw new TypeError("a schedule's action is an action's name, a string");
      if (!Object.hasOwn(actions, action) || typeof actions[action] !== "function") throw new TypeError(`cannot schedule unknown action ${JSON.stringify(action)}`);
      const ms = "at" in when ? when.at : when.after;
      if (typeof ms !== "number" || !Number.isFinite(ms)) throw new TypeError("a schedule time must be a finite number");
      // The global Web Crypto, loaded on first use: `node:crypto` would cost every start-up.
      const id = globalThis.crypto.randomUUID();
      const encodedArgs = Buffer.from(encode(args));
      if ("at" in when) {
        instance.effects.schedules.push({ op: "at", id, atMs: Math.round(ms), action, args: encodedArgs });
        instance.effects.added.set(id, { id, at: Math.round(ms), action, args });
      } else {
        const afterMs = Math.max(0, Math.round(ms));
        instance.effects.schedules.push({ op: "after", id, afterMs, action, args: encodedArgs });
        instance.effects.added.set(id, { id, at: host.native!.clockNowMs() + afterMs, action, args });
      }
      return id;
    };
    // The in-process client of `c.client()`, made on first use.
    let actorClient: Client<RegistryLike> | undefined;
    return {
      log: createActorLog(host, identity),
      kv: {
        async get(key: KvKey) {
          const passed = kvKey(key);
          const pending = instance.effects.kv.get(pendingId(passed));
          if (pending !== undefined) return pending.value === null ? undefined : decode(pending.value);
          const result = await host.native!.kvGet(identity.actorId, [passed]);
          failOn(result);
          const value = result.values![0];
          return value == null ? undefined : decode(value);
        },
        async put(key: KvKey, value: unknown) {
          const passed = kvKey(key);
          const bytes = Buffer.from(encode(value));
          if (bytes.length > MAX_KV_VALUE_BYTES) {
            throw new KeelError({
              group: "kv",
              code: "value_too_large",
              message: `a KV value is ${bytes.length} bytes encoded; the limit is ${MAX_KV_VALUE_BYTES}`,
              metadata: { limit: MAX_KV_VALUE_BYTES },
            });
          }
          instance.effects.kv.set(pendingId(passed), { key: passed, value: bytes });
        },
        async delete(key: KvKey) {
          const passed = kvKey(key);
          instance.effects.kv.set(pendingId(passed), { key: passed, value: null });
        },
        async list(options: KvListOptions = {}) {
          const limit = options.limit ?? DEFAULT_KV_LIST_LIMIT;
          const prefix = options.prefix === undefined ? undefined : kvKey(options.prefix);
          // Core lays the call's own writes over what is stored, in its key order.
          const pending = [...instance.effects.kv.values()].map(({ key, value }) => ({ key, value: value ?? undefined }));
          const result = await host.native!.kvList(identity.actorId, prefix, limit, options.reverse ?? false, pending);
          failOn(result);
          return result.entries!.map(({ key, value }) => [typeof key === "string" ? key : new Uint8Array(key), decode(value)] as [KvKey, unknown]);
        },
      },
      schedule: {
        after: (ms: number, action: string, ...args: unknown[]) => schedule({ after: ms }, action, args),
        at: (epochMs: number, action: string, ...args: unknown[]) => schedule({ at: epochMs }, action, args),
        cancel(id: string) {
          if (typeof id !== "string") throw new TypeError("a schedule id is a string");
          instance.effects.schedules.push({ op: "cancel", id });
          instance.effects.added.delete(id);
          instance.effects.cancelled.add(id);
        },
        async list(): Promise<ScheduledCall[]> {
          const result = await host.native!.scheduleList(identity.actorId);
          failOn(result);
          const listed = result
            .schedules!.filter((s) => !instance.effects.cancelled.has(s.id))
            .map((s) => ({ id: s.id, at: s.atMs, action: s.action, args: decode(s.args) as unknown[] }));
          listed.push(...instance.effects.added.values());
          return listed.sort((a, b) => a.at - b.at || (a.id < b.id ? -1 : 1));
        },
      },
      conns: new ConnsView(instance.conns),
      broadcast(event: string, data?: unknown) {
        instance.effects.messages.push({ event: String(event), data });
      },
      sleep() {
        instance.effects.sleep = true;
      },
      destroy() {
        instance.effects.destroy = true;
      },
      client: () => (actorClient ??= host.client(identity.actorId)),
      db: Object.freeze({
        execute: (sql: string, ...params: unknown[]) => host.sqlExecute(instance, identity.actorId, sql, params),
      }) as ActorDatabase,
      keepAwake<T>(promise: PromiseLike<T>): PromiseLike<T> {
        if (promise === null || typeof (promise as { then?: unknown })?.then !== "function") throw new TypeError("c.keepAwake takes a promise");
        failOn({ error: host.native!.keepAwake(identity.actorId, true) });
        instance.holds += 1;
        const release = () => {
          // A stop closed the holds of this instance already.
          if (instance.holds === 0) return;
          instance.holds -= 1;
          host.native!.keepAwake(identity.actorId, false);
        };
        Promise.resolve(promise).then(release, release);
        return promise;
      },
      waitUntil(promise: PromiseLike<unknown>) {
        if (promise === null || typeof (promise as { then?: unknown })?.then !== "function") throw new TypeError("c.waitUntil takes a promise");
        const settled: Promise<void> = Promise.resolve(promise).then(
          () => undefined,
          (err: unknown) => instance.ctx.log.warn("c.waitUntil work failed", { error: errorInfoOf(err).message }),
        );
        instance.background.add(settled);
        void settled.finally(() => instance.background.delete(settled));
      },
    };
  }

  private push(completion: Completion): void {
    this.completions.push(completion);
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    queueMicrotask(this.flush);
  }

  private readonly flush = (): void => {
    this.flushScheduled = false;
    const completions = this.completions;
    this.completions = [];
    const native = this.native;
    if (native === undefined) return;
    try {
      native.complete(completions);
    } catch {
      // The binding refused the batch (a field of the wrong type) before taking any of it.
      // Hand the completions over one by one, so only the bad one fails, as an internal error.
      for (const completion of completions) {
        try {
          native.complete([completion]);
        } catch {
          native.complete([unsendable(completion.id)]);
        }
      }
    }
  };
}
