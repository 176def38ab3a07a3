// The only module that touches the generated napi-rs loader.
import * as binding from "../index.js";

export type {
  ActorTypeOptions,
  Completion,
  EffectsJs,
  ErrorInfo,
  Invocation,
  LoggingOptions,
  Outcome,
  RequestHeadJs,
  RuntimeOptions,
  ScheduleOpJs,
} from "../index.js";

export const CoreRegistry = binding.CoreRegistry;
export type CoreRegistry = binding.CoreRegistry;
export const initLogging = binding.initLogging;
export const logMaxLevel = binding.logMaxLevel;
export const kvLimits = binding.kvLimits;
export const optionSpecs = binding.optionSpecs;
