// SIGINT/SIGTERM handling for `registry.start()`. Installed once per process, whatever the
// number of registries or `start()` calls. First signal: shut every started registry down
// gracefully, bounded by the grace period, then remove only keel's listeners and re-raise the
// same signal so the exit status names it. A second signal during the drain re-raises at once.
import { constants } from "node:os";

type Stoppable = { shutdown(): Promise<void> };

const SIGNALS = ["SIGINT", "SIGTERM"] as const;
type HandledSignal = (typeof SIGNALS)[number];

/** Registries to shut down on a signal, with their grace periods. */
const registries = new Map<Stoppable, number>();
let installed = false;
let draining = false;

/** Adds a registry to shut down on a signal, installing the listeners on first use. */
export function handleSignalsFor(registry: Stoppable, graceMs: number): void {
  registries.set(registry, graceMs);
  if (installed) return;
  installed = true;
  for (const signal of SIGNALS) process.on(signal, onSignal);
}

/** Stops handling signals for a registry that shut down by other means. */
export function forgetRegistry(registry: Stoppable): void {
  registries.delete(registry);
}

/** Whether keel's listeners are installed (for tests and diagnostics). */
export function signalHandlersInstalled(): boolean {
  return installed;
}

function removeListeners(): void {
  for (const signal of SIGNALS) process.removeListener(signal, onSignal);
  installed = false;
}

function reraise(signal: HandledSignal): void {
  removeListeners();
  if (process.pid === 1) {
    // The kernel ignores a re-raised signal without a handler for PID 1: exit as a shell would.
    process.exit(128 + constants.signals[signal]);
  }
  process.kill(process.pid, signal);
}

function onSignal(signal: HandledSignal): void {
  if (draining) {
    reraise(signal);
    return;
  }
  draining = true;
  // The longest grace period of the registries being shut down bounds the whole shutdown.
  const gracePeriodMs = Math.max(0, ...registries.values());
  const grace = setTimeout(() => reraise(signal), gracePeriodMs);
  const all = [...registries.keys()].map((registry) => registry.shutdown());
  void Promise.allSettled(all).then(() => {
    clearTimeout(grace);
    // One more turn lets the app's own reactions to the shutdown (such as code after an
    // awaited `start()`) run before the process ends.
    setImmediate(() => reraise(signal));
  });
}
