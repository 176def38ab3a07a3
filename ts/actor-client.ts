// `c.client()`: the typed client of `createClient`, for the actor's own registry, in process.
// Calls go through the binding into core's dispatch (no HTTP hop) and carry the chain of
// actors whose calls await them, so core refuses a call that would wait on its own mailbox
// (`actor.call_cycle`) at once instead of deadlocking until the timeout.
import type { AnyActorDefinition } from "./actor";
import { decode, encode } from "./cbor";
import { normalizeKey, type ActorAccessor, type Client, type RegistryLike } from "./client";
import { KeelError } from "./errors";
import type { CoreRegistry } from "./native";

/** One call as the binding takes it. */
type ActorCallJs = Parameters<CoreRegistry["callActor"]>[0];
type Target = Pick<ActorCallJs, "name" | "key" | "mode" | "input" | "id">;

/** Sends one call; `chain` is read when the call is made, from the calling actor's context. */
export interface ActorCaller {
  readonly native: () => CoreRegistry;
  /** The ids of the actors whose calls await a call made now, nearest caller last. */
  readonly chain: () => string[];
}

async function send(caller: ActorCaller, target: Target, action: string | undefined, args: unknown[]) {
  const result = await caller.native().callActor({ ...target, action, args: Buffer.from(encode(args)), chain: caller.chain() });
  if (result.error) throw new KeelError(result.error);
  return result;
}

function inputOf(input: unknown): Buffer | undefined {
  return input === undefined ? undefined : Buffer.from(encode(input));
}

function makeHandle(caller: ActorCaller, target: Target): any {
  const call = async (action: string, args: unknown[]) => {
    if (typeof action !== "string") throw new TypeError("an action's name is a string");
    const result = await send(caller, target, action, args);
    return decode(result.output!);
  };
  const resolve = async (): Promise<string> => {
    if (target.id !== undefined) return target.id;
    return (await send(caller, target, undefined, [])).actorId!;
  };
  return new Proxy(Object.create(null), {
    get(_target, property) {
      if (typeof property !== "string" || property === "then") return undefined;
      if (property === "resolve") return resolve;
      if (property === "connect") {
        return () => {
          throw new KeelError({
            group: "client",
            code: "unsupported",
            message: "an actor calls other actors' actions with c.client(); connections are for clients outside the registry",
          });
        };
      }
      if (property === "action") return (action: string, ...args: unknown[]) => call(action, args);
      return (...args: unknown[]) => call(property, args);
    },
  });
}

/** The in-process client every actor of one registry shares. */
export function createActorClient<R extends RegistryLike>(caller: ActorCaller): Client<R> {
  const accessors = new Map<string, ActorAccessor<AnyActorDefinition>>();
  const accessorFor = (name: string): ActorAccessor<AnyActorDefinition> => {
    let accessor = accessors.get(name);
    if (accessor !== undefined) return accessor;
    accessor = {
      getOrCreate: (key, opts) => makeHandle(caller, { name, key: normalizeKey(key), mode: "getOrCreate", input: inputOf(opts?.input) }),
      get: (key) => makeHandle(caller, { name, key: normalizeKey(key), mode: "get" }),
      create: async (key, opts) => {
        const result = await send(caller, { name, key: normalizeKey(key), mode: "create", input: inputOf(opts?.input) }, undefined, []);
        return makeHandle(caller, { id: result.actorId! });
      },
      getForId: (actorId) => makeHandle(caller, { id: actorId }),
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
