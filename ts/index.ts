export { actor, event } from "./actor";
export type {
  ActorConfig,
  ActorContext,
  ActorDefinition,
  ActorKv,
  ActorOptions,
  ActorSchedule,
  Action,
  Conn,
  CreateContext,
  CanSubscribe,
  EventOptions,
  EventType,
  KvKey,
  KvListOptions,
  RawWebSocket,
  ScheduledCall,
} from "./actor";
export { Forbidden, forbidden, KeelError, UserError } from "./errors";
export { createInspector } from "./inspector";
export type { InspectedActor, InspectedConnection, InspectedSchedule, Inspector, InspectorOptions } from "./inspector";
export type { ActorLog, LogFields, LogLevel } from "./log";
export type { ErrorBody } from "./errors";
export { Registry, setup } from "./registry";
export type { EngineConfig, InspectorConfig, ListenInfo, LoggingConfig, SetupConfig } from "./registry";
export { createClient } from "./client";
export type { ActorAccessor, ActorConnection, ActorHandle, Client, ClientOptions, ConnectOptions } from "./client";
