// React bindings for keel: `createKeel<typeof registry>(url)` returns hooks that open a live
// connection per component and subscribe to its events, typed from the registry. A hook's
// connection is disposed when the component unmounts or its actor (name, key, params)
// changes, so no socket outlives the component that asked for it.
import { useEffect, useMemo, useRef, useState } from "react";
import {
  createClient,
  type ActorConnection,
  type Client,
  type ClientOptions,
  type ConnectOptions,
  type EventData,
  type EventsOf,
  type InputOf,
  type RegistryLike,
} from "./client";
import type { ConnectionStatus } from "./connection";
import type { KeelError } from "./errors";

/** Which actor `useActor` connects to, and how. */
export interface UseActorOptions<R extends RegistryLike, N extends keyof R["definitions"] & string> {
  /** The actor type, a name in the registry. */
  name: N;
  /** The actor's key (a string is a one-segment key). */
  key?: string | readonly string[];
  /** The connection's params, passed to `onBeforeConnect`; compared by their JSON form. */
  params?: unknown;
  /** Passed to `createState` if this connection creates the actor. */
  input?: InputOf<R["definitions"][N]>;
  /** `false` holds the connection back (closed, no socket) until it turns true. */
  enabled?: boolean;
  /** Reconnection and WebSocket settings, read when the connection opens. */
  connect?: ConnectOptions;
}

/** What `useActor` gives a component. */
export interface ActorState<D> {
  /** The live connection: typed actions and `on`; undefined while disabled. */
  connection: ActorConnection<D> | undefined;
  /** `connecting`, `open`, `reconnecting` or `closed`. */
  status: ConnectionStatus;
  /** The last error the connection reported (a refusal, an undecodable message). */
  error: KeelError | undefined;
  /** The actor's id once connected. */
  actorId: string | undefined;
}

/** The hooks bound to one registry type and server. */
export interface KeelReact<R extends RegistryLike> {
  /** The typed HTTP client the hooks use, for calls outside a connection. */
  client: Client<R>;
  /** Connects to the actor `name` with `key` and `params` for as long as the component lives. */
  useActor<N extends keyof R["definitions"] & string>(options: UseActorOptions<R, N>): ActorState<R["definitions"][N]>;
  /** Calls `listener` for each `event` on the actor's connection. */
  useActorEvent<D, K extends keyof EventsOf<D> & string>(
    actor: ActorState<D>,
    event: K,
    listener: (data: EventData<EventsOf<D>[K]>) => void,
  ): void;
}

const DISABLED: ActorState<never> = { connection: undefined, status: "closed", error: undefined, actorId: undefined };
/** The first render of an enabled hook, before its effect opens the connection. */
const STARTING: ActorState<never> = { ...DISABLED, status: "connecting" };

/** Creates the React hooks for the registry served at `url`: `createKeel<typeof registry>(url)`. */
export function createKeel<R extends RegistryLike>(url: string, options: ClientOptions = {}): KeelReact<R> {
  const client = createClient<R>(url, options);

  function useActor<N extends keyof R["definitions"] & string>(opts: UseActorOptions<R, N>): ActorState<R["definitions"][N]> {
    type D = R["definitions"][N];
    const enabled = opts.enabled ?? true;
    // Keys and params are compared by value, so a literal written in the render does not
    // reconnect on every render.
    const keyId = JSON.stringify(typeof opts.key === "string" ? [opts.key] : (opts.key ?? []));
    const paramsId = JSON.stringify(opts.params ?? null);
    const latest = useRef(opts);
    latest.current = opts;
    const [state, setState] = useState<ActorState<D>>(enabled ? STARTING : DISABLED);
    useEffect(() => {
      if (!enabled) {
        setState(DISABLED);
        return;
      }
      const { name, key, params, input, connect } = latest.current;
      const accessor = (client as Record<string, any>)[name];
      const connection: ActorConnection<D> = accessor.getOrCreate(key, { input }).connect(params, connect);
      const update = (change: Partial<ActorState<D>>) =>
        setState((current) => (current.connection === connection ? { ...current, ...change, actorId: connection.actorId } : current));
      setState({ connection, status: connection.status, error: undefined, actorId: undefined });
      const offStatus = connection.onStatusChange((status) => update({ status }));
      const offError = connection.onError((error) => update({ error }));
      connection.ready.catch((error: KeelError) => update({ error }));
      return () => {
        offStatus();
        offError();
        connection.dispose();
      };
    }, [opts.name, keyId, paramsId, enabled]);
    return state;
  }

  return { client, useActor, useActorEvent };
}

/** Calls `listener` for each `event` on the actor's connection; resubscribes when it changes. */
export function useActorEvent<D, K extends keyof EventsOf<D> & string>(
  actor: ActorState<D>,
  event: K,
  listener: (data: EventData<EventsOf<D>[K]>) => void,
): void {
  // The newest listener is called, so passing an inline function does not resubscribe.
  const latest = useRef(listener);
  latest.current = listener;
  const connection = actor.connection;
  const handler = useMemo(() => (data: EventData<EventsOf<D>[K]>) => latest.current(data), []);
  useEffect(() => {
    if (connection === undefined) return;
    return connection.on(event, handler);
  }, [connection, event, handler]);
}

export type { ActorConnection, Client, ClientOptions, ConnectOptions } from "./client";
export type { ConnectionStatus } from "./connection";
export { KeelError } from "./errors";
