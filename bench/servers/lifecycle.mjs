// The actor types of the life-cycle workloads (wake, memory, alarms). keel only: the baseline
// has no sleep and no timer to compare with. Each export is the config `actor()` takes.

/**
 * `napper`: sleeps after 200 ms of idleness, or right after `nap`. The wake workload calls
 * `touch` on it awake and asleep.
 */
export const napper = {
  state: { n: 0 },
  options: { sleepTimeoutMs: 200 },
  actions: {
    touch: (c) => ++c.state.n,
    nap: (c) => c.sleep(),
  },
};

/**
 * `resident`: the same actions, but it stays awake for 10 minutes unless told to `nap`, so
 * the memory workload can hold 10,000 of them awake while it measures.
 */
export const resident = {
  state: { n: 0 },
  options: { sleepTimeoutMs: 600_000 },
  actions: napper.actions,
};

/**
 * `timer`: `setManyAt` sets `count` durable schedules of `fired`, all due at `atMs`. `fired`
 * counts itself and notes when the first and last run of the burst happened (the server's
 * clock), so the alarms workload can time the burst without polling in a tight loop.
 */
export const timer = {
  state: { fired: 0, firstAt: null, lastAt: null },
  actions: {
    setManyAt: (c, count, atMs) => {
      // A new burst: forget the previous one's marks (the count goes on).
      c.state.firstAt = null;
      c.state.lastAt = null;
      for (let i = 0; i < count; i++) c.schedule.at(atMs, "fired");
      return count;
    },
    fired: (c) => {
      const now = Date.now();
      c.state.fired += 1;
      c.state.firstAt ??= now;
      c.state.lastAt = now;
    },
    firedCount: (c) => ({ fired: c.state.fired, firstAt: c.state.firstAt, lastAt: c.state.lastAt }),
  },
};
