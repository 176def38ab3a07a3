// The one actor type both servers run. Keeping the action code in one module means the two
// servers differ only in how they route, store and commit, which is what the bench compares.

/** Initial state of a new counter (copied per actor). */
export const initialState = () => ({ count: 0 });

/** The counter's actions, in keel's `(c, ...args)` form. */
export const actions = {
  increment: (c, amount) => {
    c.state.count += amount;
    return c.state.count;
  },
  getCount: (c) => c.state.count,
};
