// The chat room: connections with parameters, events, and actions over the socket.
// Served by server.mjs here and by ../chat-web/server.mjs for browsers.
import { actor, event, UserError } from "keel";

export const room = actor({
  state: { messages: [] },
  events: { joined: event(), left: event(), message: event() },
  onBeforeConnect: (c, params) => {
    if (!params?.name) throw new UserError("name required", { code: "bad_name" });
  },
  createConnState: (c, params) => ({ name: params.name }),
  onConnect: (c, conn) => c.broadcast("joined", conn.state.name),
  onDisconnect: (c, conn) => c.broadcast("left", conn.state.name),
  actions: {
    send: (c, text) => {
      const line = `${c.conn?.state.name ?? "someone"}: ${text}`;
      c.state.messages.push(line);
      c.broadcast("message", line);
    },
    history: (c) => c.state.messages.slice(-20),
  },
});
