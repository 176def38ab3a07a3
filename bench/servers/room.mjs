// The `room` actor of the broadcast (fan-out) workload, served over WebSocket connections.
// keel only as an actor: the baseline's counterpart is a map of rooms to sockets in
// servers/baseline.mjs, which writes nothing.

/** The event every connection of the workload subscribes to. */
export const EVENT = "tick";

/**
 * `broadcast(data)` sends `data` to every connection of this room subscribed to `tick`. It
 * also counts itself in the durable state, so each call is one commit: keel releases the
 * events (and then the reply) only once that commit is durable. `sent` reads the count back
 * for the final check.
 */
export const room = {
  state: { sent: 0 },
  actions: {
    broadcast: (c, data) => {
      c.state.sent += 1;
      c.broadcast(EVENT, data);
      return c.state.sent;
    },
    sent: (c) => c.state.sent,
  },
};
