/** What every action and hook receives as `c`. */
export interface ActorContext<S> {
  /** The actor's durable state. Changes made by an action are committed before its reply. */
  state: S;
  /** The actor's stable id. */
  readonly actorId: string;
  /** The actor type name. */
  readonly name: string;
  /** The actor's key. */
  readonly key: readonly string[];
}

/** The context `createState` receives (there is no state yet). */
export interface CreateContext {
  readonly actorId: string;
  readonly name: string;
  readonly key: readonly string[];
}

/** An action: a function of the context and the caller's arguments. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Action<S> = (c: ActorContext<S>, ...args: any[]) => unknown;

/** Per-type options. */
export interface ActorOptions {
  /** Per-action timeout for this type, in milliseconds (default: the registry's, 60000). */
  actionTimeoutMs?: number;
}

/** What `actor()` takes. Give either `state` (an initial value) or `createState`. */
export interface ActorConfig<S, I, A> {
  /** The initial state of a new actor (copied per actor). */
  state?: S;
  /** Builds a new actor's state from the `input` given at creation. */
  createState?: (c: CreateContext, input: I) => S | Promise<S>;
  /**
   * The actor's actions, callable by clients. `NoInfer` makes TypeScript take the state type
   * from `state` or `createState` first, so each action's `c` is typed without annotations.
   */
  actions: A & Record<string, Action<NoInfer<S>>>;
  /** Per-type options. */
  options?: ActorOptions;
}

/** An actor type, ready to be passed to `setup({ use })`. */
export interface ActorDefinition<S, I, A> {
  readonly kind: "keel.actor";
  readonly config: ActorConfig<S, I, A>;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type AnyActorDefinition = ActorDefinition<any, any, any>;

/** Defines an actor type. State, input and action types are inferred from `config`. */
export function actor<S, I = undefined, A = Record<never, never>>(
  config: ActorConfig<S, I, A>,
): ActorDefinition<S, I, A> {
  if (config === null || typeof config !== "object") {
    throw new TypeError("actor() takes a configuration object");
  }
  if (config.actions === null || typeof config.actions !== "object") {
    throw new TypeError("actor() needs an `actions` object");
  }
  for (const [name, fn] of Object.entries(config.actions as Record<string, unknown>)) {
    if (typeof fn !== "function") throw new TypeError(`action ${JSON.stringify(name)} is not a function`);
  }
  if (config.state !== undefined && config.createState !== undefined) {
    throw new TypeError("actor() takes `state` or `createState`, not both");
  }
  return { kind: "keel.actor", config };
}
