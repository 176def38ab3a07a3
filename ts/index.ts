export { actor } from "./actor";
export type { ActorConfig, ActorContext, ActorDefinition, ActorOptions, CreateContext, Action } from "./actor";
export { KeelError, UserError } from "./errors";
export type { ErrorBody } from "./errors";
export { Registry, setup } from "./registry";
export type { ListenInfo, SetupConfig } from "./registry";
export { createClient } from "./client";
export type { ActorAccessor, ActorHandle, Client, ClientOptions } from "./client";
