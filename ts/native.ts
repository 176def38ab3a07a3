// The only module that touches the generated napi-rs loader.
import * as binding from "../index.js";

export type {
  ActorTypeOptions,
  Completion,
  ErrorInfo,
  Invocation,
  Outcome,
  RuntimeOptions,
} from "../index.js";

export const CoreRegistry = binding.CoreRegistry;
export type CoreRegistry = binding.CoreRegistry;
