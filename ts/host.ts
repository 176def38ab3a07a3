// Runs user code for core. Core sends invocations in batches; results go back in batches
// through `complete`, flushed once per microtask turn, so a burst of actions costs one hop
// each way. Each actor's instance (its live state) lives here between invocations.
import type { ActorContext, AnyActorDefinition, CreateContext } from "./actor";
import { errorInfoOf } from "./errors";
import type { Completion, Invocation } from "./native";

interface Instance {
  readonly def: AnyActorDefinition;
  readonly ctx: ActorContext<unknown>;
  state: unknown;
  /** The state as last committed (or handed to core to commit), encoded. */
  snapshot: string;
}

/** State is stored as JSON text; see docs/configuration.md for what survives. */
function encodeState(state: unknown): string {
  const text = JSON.stringify(state);
  return text === undefined ? "null" : text;
}

export class JsHost {
  private readonly instances = new Map<string, Instance>();
  private completions: Completion[] = [];
  private flushScheduled = false;
  /** Set once the native registry exists; completions go there. */
  complete: ((completions: Completion[]) => void) | undefined;

  constructor(private readonly definitions: ReadonlyMap<string, AnyActorDefinition>) {}

  /** Core's entry point: start every invocation of the batch, never throw. */
  readonly dispatch = (batch: Invocation[]): void => {
    for (const invocation of batch) {
      void this.run(invocation);
    }
  };

  private async run(invocation: Invocation): Promise<void> {
    let completion: Completion;
    try {
      switch (invocation.kind) {
        case "action":
          completion = await this.action(invocation);
          break;
        case "start":
          completion = await this.start(invocation);
          break;
        case "stop":
          completion = this.stop(invocation);
          break;
        default:
          throw new Error(`unknown invocation kind ${invocation.kind}`);
      }
    } catch (err) {
      completion = { id: invocation.id, error: errorInfoOf(err) };
    }
    this.push(completion);
  }

  private async start(invocation: Invocation): Promise<Completion> {
    const name = invocation.actorType!;
    const def = this.definitions.get(name);
    if (def === undefined) throw new Error(`no definition for actor type ${name}`);
    const identity = {
      actorId: invocation.actorId,
      name,
      key: Object.freeze([...(invocation.key ?? [])]),
    };
    let state: unknown;
    let snapshot: string;
    let changed = false;
    if (invocation.state !== undefined) {
      snapshot = invocation.state.toString("utf8");
      state = JSON.parse(snapshot);
    } else {
      const input = invocation.input === undefined ? undefined : JSON.parse(invocation.input);
      const config = def.config;
      if (config.createState !== undefined) {
        state = await config.createState(Object.freeze({ ...identity }) as CreateContext, input);
      } else {
        state = config.state === undefined ? null : structuredClone(config.state);
      }
      snapshot = encodeState(state);
      changed = true;
    }
    const instance: Instance = {
      def,
      state,
      snapshot,
      ctx: undefined as unknown as ActorContext<unknown>,
    };
    (instance as { ctx: ActorContext<unknown> }).ctx = Object.freeze({
      ...identity,
      get state() {
        return instance.state;
      },
      set state(value: unknown) {
        instance.state = value;
      },
    });
    this.instances.set(invocation.actorId, instance);
    return {
      id: invocation.id,
      state: changed ? Buffer.from(snapshot, "utf8") : undefined,
    };
  }

  private async action(invocation: Invocation): Promise<Completion> {
    const instance = this.instances.get(invocation.actorId);
    if (instance === undefined) throw new Error("the actor's instance is not started");
    const fn = instance.def.config.actions[invocation.action!];
    if (typeof fn !== "function") throw new Error(`unknown action ${invocation.action}`);
    const args = JSON.parse(invocation.args ?? "[]") as unknown[];
    let result: unknown;
    try {
      result = await fn(instance.ctx, ...args);
    } catch (err) {
      // A throwing action changes nothing: go back to the last committed state.
      instance.state = JSON.parse(instance.snapshot);
      throw err;
    }
    const output = JSON.stringify(result) ?? "null";
    const snapshot = encodeState(instance.state);
    if (snapshot === instance.snapshot) return { id: invocation.id, output };
    instance.snapshot = snapshot;
    return { id: invocation.id, output, state: Buffer.from(snapshot, "utf8") };
  }

  private stop(invocation: Invocation): Completion {
    const instance = this.instances.get(invocation.actorId);
    this.instances.delete(invocation.actorId);
    if (instance === undefined) return { id: invocation.id };
    const snapshot = encodeState(instance.state);
    if (snapshot === instance.snapshot) return { id: invocation.id };
    return { id: invocation.id, state: Buffer.from(snapshot, "utf8") };
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
    this.complete?.(completions);
  };
}
