import type { AnyActorDefinition, EventType } from "./actor";
import { KeelError, type ErrorBody } from "./errors";
import { JsHost } from "./host";
import { CoreRegistry, initLogging, logMaxLevel, optionSpecs, type RuntimeOptions } from "./native";
import { forgetRegistry, handleSignalsFor } from "./signals";

/**
 * Settings for `setup()`. `host`, `port`, `dataDir` and `dev` fall back to `KEEL_HOST`,
 * `KEEL_PORT`, `KEEL_DATA_DIR` and `KEEL_DEV`; every option then falls back to its default.
 */
export interface SetupConfig<U extends Record<string, AnyActorDefinition>> {
  /** The actor types, by the name clients use. */
  use: U;
  /** Host to listen on. `KEEL_HOST`, default `127.0.0.1`. */
  host?: string;
  /** Port to listen on; 0 picks a free one. `KEEL_PORT`, default 6420. */
  port?: number;
  /** Data directory. `KEEL_DATA_DIR`, default `./.keel`. */
  dataDir?: string;
  /** `full` (default): commits survive power loss; `relaxed`: they survive a process crash. */
  durability?: "full" | "relaxed";
  /** Bound on the whole graceful drain. Default 20000. */
  drainTimeoutMs?: number;
  /** How long a signal-triggered shutdown may take before keel re-raises. Default 30000; must exceed `drainTimeoutMs`. */
  gracePeriodMs?: number;
  /** How long a stopping actor waits for its `c.waitUntil` promises. Default 10000. */
  waitUntilGraceMs?: number;
  /** Default per-action timeout. Default 60000. */
  actionTimeoutMs?: number;
  /** Timeout of one lifecycle hook. Default 15000. */
  hookTimeoutMs?: number;
  /** Idle time before an actor sleeps (per-type `options.sleepTimeoutMs` overrides it). Default 30000. */
  sleepTimeoutMs?: number;
  /** Largest HTTP request body in bytes. Default 20 MiB. */
  maxBodyBytes?: number;
  /** Messages one actor may hold queued. Default 1024. */
  maxMailboxLen?: number;
  /** Largest key segment in bytes. Default 128. */
  maxKeySegmentBytes?: number;
  /** Largest key (its canonical string) in bytes. Default 1024. */
  maxKeyBytes?: number;
  /** In serverless mode, the path prefix the host mounts keel under (such as `/api/keel`). */
  basePath?: string;
  /** Don't install SIGINT/SIGTERM handlers in `start()`. */
  disableSignalHandlers?: boolean;
  /** Dev mode: internal error messages reach clients; the inspector generates a token if none is set. `KEEL_DEV=1`. */
  dev?: boolean;
  /** The process's logger, set up by the first registry; see docs/observability.md. */
  logging?: LoggingConfig;
  /** The inspector API under `/v1/inspector/`; see docs/observability.md. */
  inspector?: InspectorConfig;
  /** Bound on receiving one request body; past it the request gets `request.body_timed_out`. Default 30000. */
  bodyTimeoutMs?: number;
  /** How long a closing connection reads and discards what the client still sends, so a refusal reaches it; 0 closes at once. Default 1000. */
  lingerMs?: number;
  /**
   * Browser origins, besides the server's own, whose pages may open WebSockets and read
   * responses (CORS), such as `"https://app.example"`; `"*"` allows any, without credentials.
   * See docs/protocol.md, "Browsers and origins". Default none.
   */
  allowedOrigins?: string[];
  /**
   * Run `start()` as an envoy of a self-hosted Rivet Engine instead of opening keel's own
   * listener; see docs/engine.md. Without an endpoint (here or in `KEEL_ENGINE_ENDPOINT`) keel
   * runs embedded. `handler()` always runs embedded.
   */
  engine?: EngineConfig;
}

/** `setup({ engine })`. Each field falls back to its environment variable, then its default. */
export interface EngineConfig {
  /** The engine's address, such as `"http://127.0.0.1:6420"`. `KEEL_ENGINE_ENDPOINT`. */
  endpoint?: string;
  /** The engine namespace. `KEEL_ENGINE_NAMESPACE`, default `"default"`. */
  namespace?: string;
  /** The pool (runner name) this process serves; it needs a runner config. `KEEL_ENGINE_POOL`, default `"default"`. */
  pool?: string;
  /** The engine's admin token, if the engine has auth configured. `KEEL_ENGINE_TOKEN`. */
  token?: string;
}

/** `setup({ logging })`. Each field falls back to its environment variable, then its default. */
export interface LoggingConfig {
  /** Filter in `EnvFilter` syntax, such as `"info"` or `"warn,keel::js=debug"`. `KEEL_LOG`, default `"info"`. */
  level?: string;
  /** Line format. `KEEL_LOG_FORMAT`, default `"pretty"` on a terminal and `"logfmt"` otherwise. */
  format?: "pretty" | "json" | "logfmt";
}

/** `setup({ inspector })`. */
export interface InspectorConfig {
  /** Bearer token (16 to 512 visible ASCII characters). `KEEL_INSPECTOR_TOKEN`; without one the inspector is off outside dev mode. */
  token?: string;
  /** Answer peers off the loopback interface, and serverless requests. Default `false`. */
  allowRemote?: boolean;
}

/** Where a started registry listens. */
export interface ListenInfo {
  host: string;
  port: number;
  /** `http://host:port`, ready for `createClient`. */
  url: string;
}

/**
 * The numeric options, by name: default and range, from core's one table (the doc comments
 * above repeat the defaults for editors; a test checks them against this table).
 */
const NUMERIC_OPTIONS = new Map(optionSpecs().map((spec) => [spec.name, spec]));

function defaultOf(name: string): number {
  const spec = NUMERIC_OPTIONS.get(name);
  if (spec === undefined) throw new Error(`core defines no numeric option ${name}`);
  return spec.default;
}

function envNumber(name: string): number | undefined {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) {
    throw new KeelError({
      group: "registry",
      code: "invalid_config",
      message: `${name} must be a non-negative integer, not ${JSON.stringify(raw)}`,
    });
  }
  return value;
}

function fail(body: ErrorBody | null | undefined): void {
  if (body) throw new KeelError(body);
}

function invalidConfig(message: string): KeelError {
  return new KeelError({ group: "registry", code: "invalid_config", message });
}

/** `allowedOrigins` is an array of strings; core checks each one. */
function checkOrigins(origins: unknown): void {
  if (origins === undefined) return;
  if (!Array.isArray(origins) || origins.some((origin) => typeof origin !== "string")) {
    throw invalidConfig(`allowedOrigins must be an array of strings, not ${JSON.stringify(origins)}`);
  }
}

/**
 * Checks one number against its range in core's table. Core checks the range again, but a
 * fraction or a non-number would not reach it intact, so whole numbers are checked here.
 */
function checkNumber(name: string, label: string, value: unknown): void {
  const spec = NUMERIC_OPTIONS.get(name);
  if (value === undefined || spec === undefined) return;
  if (typeof value !== "number" || !Number.isInteger(value) || value < spec.min || value > spec.max) {
    throw invalidConfig(`${label} must be a whole number from ${spec.min} to ${spec.max}, not ${JSON.stringify(value)}`);
  }
}

/** A type's `hibernatableConnections`: a boolean, or a clear error. */
function hibernatableOption(type: string, value: unknown): boolean | undefined {
  if (value === undefined || typeof value === "boolean") return value;
  throw invalidConfig(`use.${type}.options.hibernatableConnections must be a boolean, not ${JSON.stringify(value)}`);
}

/** A type's `reconnectWindowMs` (a per-type option, so not in core's table): a whole number of ms. */
function reconnectWindowOption(type: string, value: unknown): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== "number" || !Number.isInteger(value) || value < 1 || value > 0xffffffff) {
    throw invalidConfig(`use.${type}.options.reconnectWindowMs must be a whole number from 1 to 4294967295, not ${JSON.stringify(value)}`);
  }
  return value;
}

/** Numeric options: whole numbers within their range, or a clear error. */
function checkNumbers(options: Record<string, unknown>): void {
  for (const name of NUMERIC_OPTIONS.keys()) checkNumber(name, name, options[name]);
}

/** A set of actor types and the runtime that serves them. */
export class Registry<U extends Record<string, AnyActorDefinition>> {
  /** The actor types; used by `createClient<typeof registry>` for types. */
  readonly definitions: U;
  private readonly config: SetupConfig<U>;
  private readonly host: JsHost;
  private readonly native: CoreRegistry;
  private listenInfo: Promise<ListenInfo> | undefined;
  private resolveListening: ((info: ListenInfo) => void) | undefined;
  private rejectListening: ((err: unknown) => void) | undefined;
  private serving: Promise<void> | undefined;
  /** Whether the binding holds serverless mode's options, checked and resolved once. */
  private serverlessReady = false;

  constructor(config: SetupConfig<U>) {
    if (config === null || typeof config !== "object" || typeof config.use !== "object") {
      throw new TypeError("setup() takes { use: { name: actor(...) } }");
    }
    this.config = config;
    this.definitions = config.use;
    const definitions = new Map<string, AnyActorDefinition>();
    for (const [name, def] of Object.entries(config.use)) {
      if (def?.kind !== "keel.actor") throw new TypeError(`use.${name} is not an actor()`);
      definitions.set(name, def);
    }
    // The first registry of the process installs the logger; later ones only check theirs.
    fail(initLogging(config.logging));
    this.host = new JsHost(definitions);
    // The binding holds `dispatch` weakly: this registry (through `host`) is what keeps it.
    this.native = new CoreRegistry(this.host.dispatch);
    this.host.native = this.native;
    this.host.logMaxLevel = logMaxLevel();
    this.host.waitUntilGraceMs = config.waitUntilGraceMs ?? defaultOf("waitUntilGraceMs");
    for (const [name, def] of definitions) {
      const options = def.config.options ?? {};
      for (const option of ["actionTimeoutMs", "sleepTimeoutMs"] as const) {
        checkNumber(option, `use.${name}.options.${option}`, options[option]);
      }
      fail(
        this.native.register(name, {
          actions: Object.keys(def.config.actions as object),
          actionTimeoutMs: def.config.options?.actionTimeoutMs,
          sleepTimeoutMs: def.config.options?.sleepTimeoutMs,
          hibernatableConnections: hibernatableOption(name, options.hibernatableConnections),
          reconnectWindowMs: reconnectWindowOption(name, options.reconnectWindowMs),
          rawRequests: def.config.onRequest !== undefined,
          rawSockets: def.config.onWebSocket !== undefined,
          onBeforeConnect: def.config.onBeforeConnect !== undefined,
          createConnState: def.config.createConnState !== undefined,
          onConnect: def.config.onConnect !== undefined,
          onDisconnect: def.config.onDisconnect !== undefined,
          guardedEvents: Object.entries(def.config.events ?? {})
            .filter(([, declared]) => (declared as EventType<unknown> | undefined)?.canSubscribe !== undefined)
            .map(([name]) => name),
          db:
            def.config.db === undefined
              ? undefined
              : { maxSizeBytes: def.config.db.config.maxSizeBytes, statementTimeoutMs: def.config.db.config.statementTimeoutMs },
        }),
      );
    }
  }

  /** The options passed to the native runtime, with environment fallbacks applied. */
  runtimeOptions(): RuntimeOptions {
    const c = this.config;
    return {
      host: c.host ?? (process.env.KEEL_HOST || undefined),
      port: c.port ?? envNumber("KEEL_PORT"),
      dataDir: c.dataDir ?? (process.env.KEEL_DATA_DIR || undefined),
      durability: c.durability,
      drainTimeoutMs: c.drainTimeoutMs,
      actionTimeoutMs: c.actionTimeoutMs,
      hookTimeoutMs: c.hookTimeoutMs,
      sleepTimeoutMs: c.sleepTimeoutMs,
      maxBodyBytes: c.maxBodyBytes,
      maxMailboxLen: c.maxMailboxLen,
      maxKeySegmentBytes: c.maxKeySegmentBytes,
      maxKeyBytes: c.maxKeyBytes,
      dev: c.dev ?? process.env.KEEL_DEV === "1",
      inspectorToken: c.inspector?.token ?? (process.env.KEEL_INSPECTOR_TOKEN || undefined),
      inspectorAllowRemote: c.inspector?.allowRemote,
      bodyTimeoutMs: c.bodyTimeoutMs,
      lingerMs: c.lingerMs,
      allowedOrigins: c.allowedOrigins,
      // Core resolves the `KEEL_ENGINE_*` fallbacks and defaults, and checks the values.
      engine: c.engine,
    };
  }

  /** The runtime options, with the checks JS makes: numbers are whole and in range. */
  private shapedOptions(): RuntimeOptions {
    checkNumbers(this.config as unknown as Record<string, unknown>);
    checkOrigins(this.config.allowedOrigins);
    const options = this.runtimeOptions();
    checkNumbers(options as Record<string, unknown>);
    return options;
  }

  /** The runtime options, checked by core too. */
  private checkedOptions(): RuntimeOptions {
    const options = this.shapedOptions();
    fail(this.native.validateOptions(options));
    return options;
  }

  /** The signal handlers' grace period, which must exceed the drain timeout. */
  private gracePeriodMs(): number {
    const grace = this.config.gracePeriodMs ?? defaultOf("gracePeriodMs");
    const drain = this.config.drainTimeoutMs ?? defaultOf("drainTimeoutMs");
    if (!(grace > drain)) throw invalidConfig(`gracePeriodMs (${grace}) must exceed drainTimeoutMs (${drain})`);
    return grace;
  }

  /**
   * Starts the HTTP server and installs SIGINT/SIGTERM handlers (unless disabled). The
   * returned promise resolves after a shutdown has drained; `listening()` tells the address.
   */
  start(): Promise<void> {
    let options: RuntimeOptions;
    let grace = 0;
    try {
      options = this.checkedOptions();
      if (!this.config.disableSignalHandlers) grace = this.gracePeriodMs();
    } catch (err) {
      if (this.serving === undefined) {
        // `listening()` must not wait for a start that never began.
        this.freshListening();
        this.rejectListening?.(err);
      }
      return Promise.reject(err);
    }
    const first = this.serving === undefined;
    if (first) this.freshListening();
    const begin = () =>
      this.native.serve(options, (address) => {
        const index = address.lastIndexOf(":");
        const host = address.slice(0, index).replace(/^\[|\]$/g, "");
        const port = Number(address.slice(index + 1));
        const urlHost = host.includes(":") ? `[${host}]` : host;
        this.resolveListening?.({ host, port, url: `http://${urlHost}:${port}` });
      });
    // The native call takes the registry on a worker thread, so two calls made together
    // could reach core in either order and the later `start()` could win. A later start
    // asks core only once the first has listened or failed, so it is the one refused.
    const serving = (first ? begin() : this.listening().then(begin, begin))
      .then((outcome) => {
        if (!outcome.error) return;
        const err = new KeelError(outcome.error);
        // Only the start that owns the server settles `listening()`; a second `start()` is
        // refused by the state machine without touching the first.
        if (first) {
          forgetRegistry(this);
          this.rejectListening?.(err);
          // The registry went back to idle: a later `start()` may try again.
          this.serving = undefined;
        }
        throw err;
      });
    if (!first) return serving;
    this.serving = serving;
    if (!this.config.disableSignalHandlers) handleSignalsFor(this, grace);
    return serving;
  }

  /**
   * A new `listening()` promise for a start that is beginning, unless one is still pending.
   * A failed start rejects it, and a caller who never asked for it sees no unhandled
   * rejection.
   */
  private freshListening(): void {
    if (this.listenInfo !== undefined && this.resolveListening !== undefined && !this.listenSettled) return;
    this.listenInfo = undefined;
    this.listenSettled = false;
    this.listening().catch(() => {});
  }

  private listenSettled = false;

  /** Resolves with the address once the server listens. */
  listening(): Promise<ListenInfo> {
    if (this.listenInfo === undefined) {
      this.listenInfo = new Promise<ListenInfo>((resolve, reject) => {
        this.resolveListening = (info) => {
          this.listenSettled = true;
          resolve(info);
        };
        this.rejectListening = (err) => {
          this.listenSettled = true;
          reject(err);
        };
      });
    }
    return this.listenInfo;
  }

  /**
   * Shuts down gracefully: new requests get `registry.shutting_down`, in-flight actions
   * finish, every actor is flushed, the server closes. Idempotent; every caller resolves
   * after the drain is complete.
   */
  async shutdown(): Promise<void> {
    await this.native.shutdown();
    // The `start()` promise settles before any `shutdown()` caller resumes, so code after an
    // awaited `start()` runs before a signal handler ends the process.
    await this.serving?.catch(() => {});
    forgetRegistry(this);
    this.rejectListening?.(
      new KeelError({ group: "registry", code: "shut_down", message: "the registry has shut down" }),
    );
  }

  /**
   * Serves keel's routes from inside a Fetch-style host (serverless mode): Hono, Next.js route
   * handlers, or a `node:http` adapter. The first call builds the runtime, once, however many
   * calls arrive together. Installs no signal handlers. Errors, including the registry's own
   * (such as `registry.shut_down` after `shutdown()`), come back as JSON error responses.
   */
  readonly handler = async (request: Request): Promise<Response> => {
    try {
      // Checked and resolved (the host name included) once, not per request.
      if (!this.serverlessReady) {
        fail(this.native.prepareServerless(this.shapedOptions()));
        this.serverlessReady = true;
      }
    } catch (err) {
      // Bad options are the deployment's fault, not the caller's, so this is a 500 (the
      // documented answer), whatever status the error has elsewhere. A plain `Error` from the
      // binding (an option of the wrong type) is a bad option too.
      const message = err instanceof Error ? err.message : String(err);
      return Response.json({ group: "registry", code: "invalid_config", message, metadata: null }, { status: 500 });
    }
    let url = request.url;
    const base = this.config.basePath?.replace(/\/+$/, "");
    if (base) {
      const parsed = new URL(url);
      if (parsed.pathname === base || parsed.pathname.startsWith(`${base}/`)) {
        parsed.pathname = parsed.pathname.slice(base.length) || "/";
        url = parsed.toString();
      }
    }
    const hasBody = request.method !== "GET" && request.method !== "HEAD";
    const body = hasBody ? Buffer.from(await request.arrayBuffer()) : undefined;
    const response = await this.native.handleRequest({
      method: request.method,
      url,
      headers: [...request.headers],
      body,
    });
    const headers = new Headers(response.headers.map(([name, value]) => [name, value] as [string, string]));
    const empty = response.status === 204 || response.status === 304 || request.method === "HEAD";
    return new Response(empty ? null : new Uint8Array(response.body), { status: response.status, headers });
  };

  /** How many runtimes this registry has built (1 once started; for diagnostics and tests). */
  get buildCount(): number {
    return this.native.buildCount;
  }

  /**
   * How many times options were checked and resolved into a runtime configuration (host name
   * included): once per `start()`, once for `handler()` however many requests it serves (for
   * diagnostics and tests).
   */
  get optionResolutions(): number {
    return this.native.optionResolutions;
  }

  /** How many actors are awake right now (for diagnostics and tests). */
  get liveActors(): number {
    return this.native.liveActors;
  }

  /**
   * keel's metrics as a Prometheus text page (format 0.0.4), the same page `/metrics` serves;
   * readable at any time, during and after a shutdown too.
   */
  metrics(): string {
    return this.native.metricsText();
  }

  /** The state machine's current state (for diagnostics). */
  get state(): string {
    return this.native.state;
  }
}

/** Builds a registry from actor definitions. */
export function setup<const U extends Record<string, AnyActorDefinition>>(config: SetupConfig<U>): Registry<U> {
  return new Registry(config);
}
