// The counter from the README: durable state, two actions.
import { actor, setup } from "keel";

export const counter = actor({
  state: { count: 0 },
  actions: {
    increment: (c, amount) => {
      c.state.count += amount;
      return c.state.count;
    },
    getCount: (c) => c.state.count,
  },
});

export const registry = setup({ use: { counter } });
