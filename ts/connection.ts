// A live connection to one actor over WebSocket: events, actions over the same socket, and
// reconnection with backoff. Uses the platform's WebSocket (browsers, Deno, Bun, Node >= 22);
// only on older Node does the `ws` package stand in for the missing global.
import { decode, encode } from "./cbor";
import { KeelError, type ErrorBody } from "./errors";

/** Where a connection stands. */
export type ConnectionStatus = "connecting" | "open" | "reconnecting" | "closed";

/** Reconnection settings. */
export interface ReconnectOptions {
  /** Delay before the first retry, in milliseconds (default 250). */
  initialDelayMs?: number;
  /** Longest delay between retries (default 10000). */
  maxDelayMs?: number;
  /** Give up after this many failed attempts in a row (default: never). */
  maxAttempts?: number;
}

/** Where a socket goes: its URL and the subprotocols to offer (an engine's gateway selects `rivet`). */
export interface SocketAddress {
  url: string;
  protocols?: string[];
}

/** What a connection needs to (re)connect. */
export interface ConnectTarget {
  /**
   * The socket's URL, or a function that finds it before each attempt (the typed client asks
   * which kind of server it talks to first, once). A rejection fails that attempt like a lost
   * socket: it is reported through `onError` and retried.
   */
  url: string | (() => Promise<SocketAddress>);
  /** The actor by key, or (with `actorId`) nothing: the id names it. */
  key: string[];
  mode: "get" | "create" | "getOrCreate";
  /** The actor by id, for handles from `getForId` and `create`. */
  actorId?: string;
  input?: unknown;
  params?: unknown;
  /** Called before every (re)connect attempt; its result is that attempt's params. */
  getParams?: () => unknown;
  /**
   * Headers for the WebSocket upgrade. Sent where the platform's WebSocket takes them (Node's
   * `ws`, Node >= 22, Bun, Deno); a browser's WebSocket cannot send headers, so there they are
   * left off and credentials belong in `params` or `getParams`.
   */
  headers?: Record<string, string>;
  reconnect?: ReconnectOptions | false;
  /** A WebSocket constructor; defaults to the global one, else the `ws` package. */
  WebSocket?: typeof WebSocket;
}

type Listener = (data: any) => void;

interface PendingCall {
  resolve: (value: unknown) => void;
  reject: (err: unknown) => void;
}

const OPEN = 1;

/** The platform's WebSocket, or the `ws` package on Node before 22. */
export function loadWebSocket(): typeof WebSocket {
  if (typeof globalThis.WebSocket === "function") return globalThis.WebSocket;
  // Only Node before 22 lacks a global WebSocket, and there `ws` implements the same
  // interface. The package's `browser` field maps `ws` to nothing, so bundlers for the web
  // leave it out; `require` is looked up only here, where no browser ever gets.
  if (typeof require !== "function") {
    throw new KeelError({
      group: "client",
      code: "unsupported",
      message: "this platform has no WebSocket; pass one as the WebSocket connect option",
    });
  }
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return require("ws") as typeof WebSocket;
}

/**
 * Opens a WebSocket with `headers` on the upgrade where the platform can send them. A
 * browser's WebSocket cannot (its second argument is only the protocols), so there the
 * headers are left off. The platform's global WebSocket (Node >= 22, Bun) takes them as
 * `{ protocols, headers }`; the `ws` package, Node's stand-in before 22, as a third argument.
 */
export function openWebSocket(
  WebSocketImpl: typeof WebSocket,
  url: string,
  protocols: string | string[] | undefined,
  headers: Record<string, string> | undefined,
): WebSocket {
  const browser = typeof (globalThis as { document?: unknown }).document !== "undefined";
  if (headers === undefined || Object.keys(headers).length === 0 || browser) {
    return protocols === undefined ? new WebSocketImpl(url) : new WebSocketImpl(url, protocols);
  }
  const Impl = WebSocketImpl as unknown as new (url: string, ...rest: unknown[]) => WebSocket;
  if (WebSocketImpl === globalThis.WebSocket) return new Impl(url, { protocols, headers });
  return new Impl(url, protocols ?? [], { headers });
}

/** A connection to one actor. Action methods are added by the handle's proxy. */
export class ActorConnectionImpl {
  /** The actor's id, once connected. */
  actorId: string | undefined;
  /**
   * This connection's id, once connected: a new one after each reconnect, unless the actor's
   * type has `hibernatableConnections` and the connection was resumed.
   */
  connId: string | undefined;
  /**
   * The secret that resumes this connection after the server restarted (types with
   * `hibernatableConnections`), sent with `connId` in the next `init`.
   */
  private connToken: string | undefined;
  /** Set when the server refused to resume: the next attempt connects afresh at once. */
  private resumeRefused = false;
  private socket: WebSocket | undefined;
  private statusValue: ConnectionStatus = "connecting";
  private readonly listeners = new Map<string, Set<Listener>>();
  private readonly statusListeners = new Set<(status: ConnectionStatus) => void>();
  private readonly errorListeners = new Set<(err: KeelError) => void>();
  private readonly pending = new Map<number, PendingCall>();
  /** Calls made before the connection was ready, sent once it is. */
  private queued: Array<{ id: number; action: string; args: unknown[] }> = [];
  private nextCallId = 1;
  private attempts = 0;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private disposed = false;
  private readonly WebSocketImpl: typeof WebSocket;
  private firstReady: { promise: Promise<void>; resolve: () => void; reject: (err: unknown) => void };

  constructor(private readonly target: ConnectTarget) {
    this.WebSocketImpl = target.WebSocket ?? loadWebSocket();
    let resolve!: () => void;
    let reject!: (err: unknown) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // Nobody has to await `ready`; a refusal is also reported through `onError`.
    promise.catch(() => {});
    this.firstReady = { promise, resolve, reject };
    this.open();
  }

  /** Resolves once the connection is first admitted; rejects if it is refused. */
  get ready(): Promise<void> {
    return this.firstReady.promise;
  }

  /** Where the connection stands. */
  get status(): ConnectionStatus {
    return this.statusValue;
  }

  /** Listens for an event; returns a function that stops listening. */
  on(event: string, listener: Listener): () => void {
    let set = this.listeners.get(event);
    if (set === undefined) {
      set = new Set();
      this.listeners.set(event, set);
      this.sendFrame({ t: "sub", event });
    }
    set.add(listener);
    return () => {
      const current = this.listeners.get(event);
      if (current === undefined || !current.delete(listener) || current.size > 0) return;
      this.listeners.delete(event);
      this.sendFrame({ t: "unsub", event });
    };
  }

  /** Listens for status changes; returns a function that stops listening. */
  onStatusChange(listener: (status: ConnectionStatus) => void): () => void {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  }

  /** Listens for connection errors (a refusal, a dropped call); returns an unsubscribe. */
  onError(listener: (err: KeelError) => void): () => void {
    this.errorListeners.add(listener);
    return () => this.errorListeners.delete(listener);
  }

  /** Calls an action over the connection. */
  call(action: string, args: unknown[]): Promise<unknown> {
    if (this.disposed || this.statusValue === "closed") {
      return Promise.reject(new KeelError({ group: "client", code: "closed", message: "the connection is closed" }));
    }
    const id = this.nextCallId++;
    // Encode now, so an unsupported value fails this call rather than the socket.
    encode(args);
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      if (this.statusValue === "open") this.sendFrame({ t: "call", id, action, args });
      else this.queued.push({ id, action, args });
    });
  }

  /** Closes the connection for good. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    if (this.retryTimer !== undefined) clearTimeout(this.retryTimer);
    this.failPending(new KeelError({ group: "client", code: "closed", message: "the connection was disposed" }), true);
    this.socket?.close(1000, "disposed");
    this.setStatus("closed");
  }

  private setStatus(status: ConnectionStatus): void {
    if (this.statusValue === status) return;
    this.statusValue = status;
    for (const listener of this.statusListeners) listener(status);
  }

  private emitError(err: KeelError): void {
    for (const listener of this.errorListeners) listener(err);
  }

  private static wsUrl(url: string): string {
    return url.replace(/\/+$/, "").replace(/^http/, "ws");
  }

  private open(): void {
    const { url, getParams } = this.target;
    if (getParams === undefined && typeof url === "string") return this.openWith({ url }, this.target.params);
    void this.findAndOpen(url, getParams);
  }

  /**
   * One attempt's address and params, then its socket. Fresh params for every attempt, so a
   * token can be refreshed between reconnects. A throwing `getParams` (or a URL that cannot be
   * found) fails this attempt like a lost socket: it is reported and retried.
   */
  private async findAndOpen(url: ConnectTarget["url"], getParams: ConnectTarget["getParams"]): Promise<void> {
    let found: SocketAddress;
    try {
      // Awaited even when it is a string, so `getParams` runs after `open()` has returned.
      found = await (typeof url === "string" ? { url } : url());
    } catch (cause) {
      const err =
        cause instanceof KeelError
          ? cause
          : new KeelError({ group: "client", code: "unreachable", message: `${(cause as Error)?.message ?? cause}` }, { cause });
      return this.failAttempt(err, "server unreachable");
    }
    let params: unknown;
    try {
      params = getParams === undefined ? this.target.params : await getParams();
    } catch (cause) {
      const message = `getParams threw: ${(cause as Error)?.message ?? cause}`;
      return this.failAttempt(new KeelError({ group: "client", code: "get_params_failed", message }, { cause }), "getParams failed");
    }
    if (!this.disposed) this.openWith(found, params);
  }

  /** Ends an attempt that could not open its socket, as a lost socket would. */
  private failAttempt(err: KeelError, reason: string): void {
    if (this.disposed) return;
    this.emitError(err);
    this.socket = undefined;
    this.onClose(undefined, 1006, reason);
  }

  private openWith(address: SocketAddress, params: unknown): void {
    const socket = openWebSocket(this.WebSocketImpl, ActorConnectionImpl.wsUrl(address.url), address.protocols, this.target.headers);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.onopen = () => {
      const init: Record<string, unknown> = {
        t: "init",
        key: this.target.key,
        mode: this.target.mode,
        params: params ?? null,
        subs: [...this.listeners.keys()],
      };
      if (this.target.actorId !== undefined) init.actorId = this.target.actorId;
      if (this.target.input !== undefined) init.input = this.target.input;
      if (this.connId !== undefined && this.connToken !== undefined) {
        init.connId = this.connId;
        init.connToken = this.connToken;
      }
      socket.send(encode(init));
      this.initSent.add(socket);
    };
    socket.onmessage = (event: MessageEvent) => this.onFrame(event.data);
    socket.onclose = (event: CloseEvent) => this.onClose(socket, event.code, event.reason);
    socket.onerror = () => {
      // The close event follows and decides what happens next.
    };
  }

  private onFrame(data: unknown): void {
    let message: any;
    try {
      const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : (data as Uint8Array);
      message = typeof data === "string" ? JSON.parse(data) : decode(bytes);
    } catch {
      this.emitError(new KeelError({ group: "client", code: "bad_response", message: "undecodable message from the server" }));
      return;
    }
    switch (message?.t) {
      case "ready": {
        this.actorId = message.actorId;
        this.connId = message.connId;
        this.connToken = typeof message.connToken === "string" ? message.connToken : undefined;
        this.attempts = 0;
        this.setStatus("open");
        this.firstReady.resolve();
        const queued = this.queued;
        this.queued = [];
        for (const call of queued) this.sendFrame({ t: "call", ...call });
        break;
      }
      case "reply": {
        const call = this.pending.get(message.id);
        if (call === undefined) return;
        this.pending.delete(message.id);
        if (message.error) call.reject(new KeelError(message.error as ErrorBody));
        else call.resolve(message.output);
        break;
      }
      case "event": {
        for (const listener of [...(this.listeners.get(message.event) ?? [])]) {
          try {
            listener(message.data);
          } catch (err) {
            // A throwing listener must not break the connection; report it and go on.
            queueMicrotask(() => {
              throw err;
            });
          }
        }
        break;
      }
      case "error": {
        const err = new KeelError(message.error as ErrorBody);
        if (err.group === "connection" && err.code === "resume_refused") {
          // The connection closed for good while we were away (or its record expired): what
          // it had is gone, so connect afresh as a new connection.
          this.connId = undefined;
          this.connToken = undefined;
          this.resumeRefused = true;
          this.emitError(err);
          break;
        }
        // A refused subscription names its event and leaves the connection open.
        if (typeof message.event !== "string") this.refused = err;
        this.emitError(err);
        break;
      }
    }
  }

  /** The structured error of a refused connection, which ends reconnection. */
  private refused: KeelError | undefined;

  private onClose(socket: WebSocket | undefined, code: number, reason: string): void {
    if (socket !== this.socket || this.disposed) return;
    const lost = new KeelError({
      group: "client",
      code: "connection_lost",
      message: `the connection closed (${code}${reason ? `: ${reason}` : ""}) before the reply`,
      metadata: { closeCode: code },
    });
    // Calls in flight may or may not have run: fail them. Queued ones wait for the next socket.
    this.failPending(lost, false);
    const options = this.target.reconnect === false ? undefined : (this.target.reconnect ?? {});
    if (this.resumeRefused) {
      this.resumeRefused = false;
      this.setStatus("reconnecting");
      this.open();
      return;
    }
    // 1000: the actor closed this connection on purpose; 1007/1008: it refused what we sent.
    // Reconnecting would not help; 1001 (going away), 1006, 1011 and 1013 are worth a retry.
    // A 1008 whose reason is the engine's own (`ws.…`, such as `ws.message_index_skip` when a
    // hibernated socket's actor moved to another keel process) says nothing about what we
    // sent: the connection is resumed like after a 1011.
    const final = code === 1000 || code === 1007 || (code === 1008 && !reason.startsWith("ws."));
    const refused =
      this.refused ??
      (final && code !== 1000
        ? new KeelError({ group: "client", code: "refused", message: `the server closed the connection: ${reason || code}`, metadata: { closeCode: code } })
        : undefined);
    if (final || refused !== undefined || options === undefined || (options.maxAttempts !== undefined && this.attempts >= options.maxAttempts)) {
      const err = refused ?? lost;
      this.failPending(err, true);
      this.firstReady.reject(err);
      this.setStatus("closed");
      return;
    }
    this.setStatus("reconnecting");
    const initial = options.initialDelayMs ?? 250;
    const max = options.maxDelayMs ?? 10_000;
    const delay = Math.min(max, initial * 2 ** this.attempts) * (0.5 + Math.random() / 2);
    this.attempts++;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      if (!this.disposed) this.open();
    }, delay);
  }

  private failPending(err: KeelError, includingQueued: boolean): void {
    const queuedIds = new Set(this.queued.map((call) => call.id));
    for (const [id, call] of this.pending) {
      if (!includingQueued && queuedIds.has(id)) continue;
      this.pending.delete(id);
      call.reject(err);
    }
    if (includingQueued) this.queued = [];
  }

  private sendFrame(message: Record<string, unknown>): void {
    const socket = this.socket;
    if (socket === undefined || socket.readyState !== OPEN || !this.initSent.has(socket)) {
      // Subscriptions travel with the next init; calls are queued by `call`. Once init is on
      // its way, later frames follow it and the server reads them in order.
      return;
    }
    socket.send(encode(message));
  }

  /** Sockets whose init has been sent. */
  private readonly initSent = new WeakSet<object>();
}
