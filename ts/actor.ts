import type { Client, RegistryLike } from "./client";
import type { ActorLog } from "./log";

/** A KV key: a string or bytes. Strings and byte keys are separate key spaces. */
export type KvKey = string | Uint8Array;

/** Options for `c.kv.list`. */
export interface KvListOptions {
  /** Only keys starting with this (a string prefix lists string keys, bytes list byte keys). */
  prefix?: KvKey;
  /** At most this many entries (default 1000). */
  limit?: number;
  /** Largest key first. */
  reverse?: boolean;
}

/** The actor's durable key-value store. Writes commit with the action, like state. */
export interface ActorKv {
  /** The value at `key`, or `undefined`. */
  get<T = unknown>(key: KvKey): Promise<T | undefined>;
  /** Sets `key` (at most 2 KiB) to `value` (at most 128 KiB encoded). */
  put(key: KvKey, value: unknown): Promise<void>;
  /** Removes `key`. */
  delete(key: KvKey): Promise<void>;
  /** Entries in key order. */
  list<T = unknown>(options?: KvListOptions): Promise<Array<[KvKey, T]>>;
}

/** A pending schedule, as `c.schedule.list()` reports it. */
export interface ScheduledCall {
  id: string;
  /** When it falls due, in epoch milliseconds. */
  at: number;
  action: string;
  args: unknown[];
}

/** Durable schedules: run an action later, even across restarts and sleep. */
export interface ActorSchedule<A> {
  /** Runs `action` with `args` after `ms` milliseconds; returns the schedule's id. */
  after<K extends keyof A & string>(ms: number, action: K, ...args: ArgsOf<A[K]>): string;
  /** Runs `action` with `args` at `epochMs`; returns the schedule's id. */
  at<K extends keyof A & string>(epochMs: number, action: K, ...args: ArgsOf<A[K]>): string;
  /** Cancels a schedule; no error if it already ran. */
  cancel(id: string): void;
  /** The actor's pending schedules, soonest first. */
  list(): Promise<ScheduledCall[]>;
}

type ArgsOf<F> = F extends (c: any, ...args: infer P) => any ? P : unknown[];

/** A client connected to the actor over WebSocket. */
export interface Conn<CS = unknown, P = unknown> {
  /** The connection's id. */
  readonly id: string;
  /** The parameters the client connected with. */
  readonly params: P;
  /**
   * Per-connection state from `createConnState`. Kept in memory only, unless the type has
   * `hibernatableConnections`: then it is durable, saved with the call that changed it.
   */
  state: CS;
  /** Sends an event to this connection only (after the call's effects are durable). */
  send(event: string, data?: unknown): void;
  /** Closes this connection (after the call's effects are durable). */
  disconnect(reason?: string): void;
}

/** A raw WebSocket handed to `onWebSocket`. */
export interface RawWebSocket {
  /** The path below the actor's raw route, with the query string. */
  readonly path: string;
  /** The upgrade request's headers. */
  readonly headers: Readonly<Record<string, string>>;
  /** Sends a text (string) or binary (Uint8Array) message at once. */
  send(data: string | Uint8Array): void;
  /** Closes the socket. */
  close(code?: number, reason?: string): void;
  /** `message` gets `{ data }` (string or Uint8Array); `close` gets `{ code, reason }`. */
  addEventListener(type: "message", listener: (event: { data: string | Uint8Array }) => unknown): void;
  addEventListener(type: "close", listener: (event: { code: number; reason: string }) => unknown): void;
}

/** Declares an event's payload type: `events: { message: event<string>() }`. */
export interface EventType<T> {
  readonly kind: "keel.event";
  /** Never set; carries the payload type. */
  readonly payload?: T;
  /** Decides whether a connection may subscribe; see `EventOptions`. */
  readonly canSubscribe?: CanSubscribe;
}

/**
 * Runs when a connection subscribes to the event (on `conn.on`, and again on each reconnect).
 * Return `false` or throw (a `Forbidden`, say) to refuse: the client gets `auth.forbidden`
 * (or what was thrown) through `onError`, hears none of the event, and stays connected.
 */
export type CanSubscribe = (c: ActorContext<any, any, any>, conn: Conn<any, any>) => boolean | Promise<boolean>;

/** Options for `event()`. */
export interface EventOptions {
  /** Who may subscribe. Without it, every connection may. */
  canSubscribe?: CanSubscribe;
}

/** Declares an event with payload type `T`, for typed `conn.on` in clients. */
export function event<T = unknown>(options: EventOptions = {}): EventType<T> {
  const canSubscribe = options.canSubscribe;
  if (canSubscribe !== undefined && typeof canSubscribe !== "function") throw new TypeError("canSubscribe must be a function");
  return canSubscribe === undefined ? { kind: "keel.event" } : { kind: "keel.event", canSubscribe };
}

/** What every action and hook receives as `c`. */
export interface ActorContext<S, V = undefined, A = Record<string, unknown>> {
  /** The actor's durable state. Changes made by an action are committed before its reply. */
  state: S;
  /** Per-wake values (connections, caches); never persisted, rebuilt on every wake. */
  vars: V;
  /** The actor's stable id. */
  readonly actorId: string;
  /** The actor type name. */
  readonly name: string;
  /** The actor's key. */
  readonly key: readonly string[];
  /** The actor's durable key-value store. */
  readonly kv: ActorKv;
  /** Durable schedules. */
  readonly schedule: ActorSchedule<A>;
  /** Open connections, by id. */
  readonly conns: ReadonlyMap<string, Conn<any, any>>;
  /** The connection an action was called over, if any. */
  readonly conn: Conn<any, any> | undefined;
  /**
   * The caller's HTTP request (method, URL with query, headers; no body): the request of an
   * action called over HTTP, or the WebSocket upgrade in `onBeforeConnect`, `createConnState`
   * and `onConnect`. `undefined` for actions called over a connection, scheduled actions and
   * lifecycle hooks.
   */
  readonly request: Request | undefined;
  /** Sends an event to every connection subscribed to it (after the call's effects are durable). */
  broadcast(event: string, data?: unknown): void;
  /** Structured log lines through keel's logger, carrying this actor's identity. */
  readonly log: ActorLog;
  /** Sleep once this call finishes (the next message wakes the actor). */
  sleep(): void;
  /** Destroy the actor once this call finishes: run `onDestroy`, delete state, KV and schedules. */
  destroy(): void;
  /**
   * Aborted when the actor is stopping (sleep, destroy, shutdown) or its current call timed
   * out (the instance is then discarded): pass it to `fetch` and check it in loops. Its
   * `reason` is a `KeelError`, `actor.stopped` or `actor.action_timed_out`.
   */
  readonly abortSignal: AbortSignal;
  /** Whether `abortSignal` has fired. */
  readonly aborted: boolean;
  /**
   * Keeps background work going: when the actor stops (sleep, shutdown, destroy), keel waits
   * for `promise` (at most `waitUntilGraceMs`, default 10 s) before `onSleep`/`onDestroy`
   * runs. A rejection is logged. State it changed is saved with `onSleep`'s commit.
   */
  waitUntil(promise: PromiseLike<unknown>): void;
  /**
   * Keeps the actor from sleeping for being idle until `promise` settles, and returns the
   * same promise. It does not hold off `c.sleep()`, `c.destroy()` or a shutdown.
   */
  keepAwake<T>(promise: PromiseLike<T>): PromiseLike<T>;
  /**
   * The typed client of `createClient<typeof registry>()` for this actor's own registry,
   * in process: `c.client<typeof registry>().counter.getOrCreate(["k"]).increment(1)`
   * resolves once the callee's changes are durable. A call to an actor whose call is
   * waiting for this one (itself, or a cycle) fails at once with `actor.call_cycle`.
   */
  client<R extends RegistryLike = RegistryLike>(): Client<R>;
}

/** The context `createState` receives (there is no state yet). */
export interface CreateContext {
  readonly actorId: string;
  readonly name: string;
  readonly key: readonly string[];
  /** Structured log lines through keel's logger, carrying this actor's identity. */
  readonly log: ActorLog;
}

/** An action: a function of the context and the caller's arguments. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Action<S, V = any> = (c: ActorContext<S, V, any>, ...args: any[]) => unknown;

/** Per-type options. */
export interface ActorOptions {
  /** Per-action timeout for this type, in milliseconds (default: the registry's, 60000). */
  actionTimeoutMs?: number;
  /** Idle time before this type's actors sleep, in milliseconds (default: the registry's, 30000). */
  sleepTimeoutMs?: number;
  /**
   * Connections that survive sleep: an actor whose connections are all idle may sleep while
   * keel keeps their sockets open; `conn.state` is durable (saved with the call that changed
   * it), and the next message on any of them wakes the actor with `c.conns` restored. After
   * a graceful restart a client resumes its connection with the id and token it got on
   * connect. Default `false`. See docs/actors.md.
   */
  hibernatableConnections?: boolean;
  /**
   * With `hibernatableConnections`: how long a connection restored after a restart waits for
   * its client to resume it, from the actor's start, before it closes for good
   * (`onDisconnect` runs). Default 30000.
   */
  reconnectWindowMs?: number;
}

type Hook<S, V, A> = (c: ActorContext<S, V, A>) => void | Promise<void>;

/** What `actor()` takes. Give either `state` (an initial value) or `createState`. */
export interface ActorConfig<S, I, V, A, E = Record<never, never>> {
  /** The initial state of a new actor (copied per actor). */
  state?: S;
  /** Builds a new actor's state from the `input` given at creation. */
  createState?: (c: CreateContext, input: I) => S | Promise<S>;
  /** The initial vars of every wake (copied). */
  vars?: V;
  /** Builds the vars of every wake. */
  createVars?: (c: ActorContext<NoInfer<S>, undefined, NoInfer<A>>) => V | Promise<V>;
  /** Runs once in the actor's life, after its state is created. Throwing creates no actor. */
  onCreate?: (c: ActorContext<NoInfer<S>, NoInfer<V>, NoInfer<A>>, input: I) => void | Promise<void>;
  /** Runs on every start, the first included. */
  onWake?: Hook<NoInfer<S>, NoInfer<V>, NoInfer<A>>;
  /** Runs before the actor sleeps and before a graceful shutdown; its changes are saved. */
  onSleep?: Hook<NoInfer<S>, NoInfer<V>, NoInfer<A>>;
  /** Runs when the actor is destroyed, before its data is deleted. */
  onDestroy?: Hook<NoInfer<S>, NoInfer<V>, NoInfer<A>>;
  /** Declared events, so clients' `conn.on` is typed: `{ message: event<string>() }`. */
  events?: E & Record<string, EventType<unknown>>;
  /**
   * Runs after an action or a connection or request hook changed the state, before the change
   * is committed; `state` is the new state. It may broadcast and send, but not change the
   * state: doing so fails the call with `actor.state_change_mutation`.
   */
  onStateChange?: (c: ActorContext<NoInfer<S>, NoInfer<V>, NoInfer<A>>, state: NoInfer<S>) => void | Promise<void>;
  /** Runs before a connection is admitted; throw (e.g. a `UserError`) to refuse it. */
  onBeforeConnect?: (c: ActorContext<NoInfer<S>, NoInfer<V>, NoInfer<A>>, params: any) => void | Promise<void>;
  /** Builds a connection's state from its parameters. */
  createConnState?: (c: ActorContext<NoInfer<S>, NoInfer<V>, NoInfer<A>>, params: any) => unknown;
  /** Runs once a connection is admitted. */
  onConnect?: (c: ActorContext<NoInfer<S>, NoInfer<V>, NoInfer<A>>, conn: Conn<any, any>) => void | Promise<void>;
  /** Runs after a connection closed. */
  onDisconnect?: (c: ActorContext<NoInfer<S>, NoInfer<V>, NoInfer<A>>, conn: Conn<any, any>) => void | Promise<void>;
  /** Answers raw HTTP requests on `/v1/actors/{name}/raw/{key}/...`. */
  onRequest?: (c: ActorContext<NoInfer<S>, NoInfer<V>, NoInfer<A>>, request: Request) => Response | Promise<Response>;
  /** Takes raw WebSockets on `/v1/actors/{name}/raw/{key}/...`. */
  onWebSocket?: (c: ActorContext<NoInfer<S>, NoInfer<V>, NoInfer<A>>, ws: RawWebSocket) => void | Promise<void>;
  /**
   * The actor's actions, callable by clients. `NoInfer` makes TypeScript take the state type
   * from `state` or `createState` first, so each action's `c` is typed without annotations.
   */
  actions: A & Record<string, Action<NoInfer<S>, NoInfer<V>>>;
  /** Per-type options. */
  options?: ActorOptions;
}

/** An actor type, ready to be passed to `setup({ use })`. */
export interface ActorDefinition<S, I, A, V = undefined, E = Record<never, never>> {
  readonly kind: "keel.actor";
  readonly config: ActorConfig<S, I, V, A, E>;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type AnyActorDefinition = ActorDefinition<any, any, any, any, any>;

const HOOKS = [
  "createState",
  "createVars",
  "onCreate",
  "onWake",
  "onSleep",
  "onDestroy",
  "onBeforeConnect",
  "createConnState",
  "onConnect",
  "onDisconnect",
  "onRequest",
  "onWebSocket",
  "onStateChange",
] as const;

/** Defines an actor type. State, input, vars and action types are inferred from `config`. */
export function actor<S, I = undefined, A = Record<never, never>, V = undefined, E = Record<never, never>>(
  config: ActorConfig<S, I, V, A, E>,
): ActorDefinition<S, I, A, V, E> {
  if (config === null || typeof config !== "object") {
    throw new TypeError("actor() takes a configuration object");
  }
  if (config.actions === null || typeof config.actions !== "object") {
    throw new TypeError("actor() needs an `actions` object");
  }
  for (const [name, fn] of Object.entries(config.actions as Record<string, unknown>)) {
    if (typeof fn !== "function") throw new TypeError(`action ${JSON.stringify(name)} is not a function`);
  }
  for (const hook of HOOKS) {
    const fn = (config as unknown as Record<string, unknown>)[hook];
    if (fn !== undefined && typeof fn !== "function") throw new TypeError(`${hook} must be a function`);
  }
  if (config.state !== undefined && config.createState !== undefined) {
    throw new TypeError("actor() takes `state` or `createState`, not both");
  }
  if (config.vars !== undefined && config.createVars !== undefined) {
    throw new TypeError("actor() takes `vars` or `createVars`, not both");
  }
  return { kind: "keel.actor", config };
}
