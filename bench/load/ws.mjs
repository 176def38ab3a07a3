// The load generator's WebSocket client, used by the ws-* and broadcast workloads: a raw `ws`
// socket speaking the JSON frames of keel's connection protocol (text frames), the same code
// against both servers, so the client's cost is the same for both.
//
// What must stay true: no compression; a connection is handed out only after the server's
// `ready`; every call has the config's timeout and is rejected when its socket closes; a reply
// with an error is an `answered` error (nothing committed); running out of file descriptors
// says so with the limit.

import { readFileSync } from "node:fs";
import WebSocket from "ws";
import { config, HOST } from "./config.mjs";
import { answered } from "./http.mjs";

/** The soft limit on open files of this process (each socket is one). */
export function fdLimit() {
  const line = readFileSync("/proc/self/limits", "utf8")
    .split("\n")
    .find((l) => l.startsWith("Max open files"));
  return line ? Number(line.split(/\s{2,}/)[1]) : null;
}

/**
 * Opens a connection to the actor `name`/`key` and sends `init`; resolves once the server
 * answers `ready`. The connection has `call(action, args)`, which resolves the reply's output
 * or rejects (with `err.answered` set when the server replied with an error), and passes each
 * `event` frame to `onEvent(message, receivedAt)`.
 */
export function openConnection(name, key, { subs = [], onEvent = null } = {}) {
  return new Promise((resolve, reject) => {
    const url = `ws://${HOST}:${config.port}/v1/actors/${encodeURIComponent(name)}/connect`;
    const ws = new WebSocket(url, { perMessageDeflate: false, handshakeTimeout: config.requestTimeoutMs });
    const pending = new Map();
    let nextId = 1;
    let ready = false;
    let closed = null;
    const conn = {
      ws,
      call(action, args = []) {
        if (closed) return Promise.reject(closed);
        return new Promise((res, rej) => {
          const id = nextId++;
          const timer = setTimeout(() => {
            pending.delete(id);
            rej(new Error(`${action} timed out after ${config.requestTimeoutMs} ms`));
          }, config.requestTimeoutMs);
          pending.set(id, { res, rej, timer });
          ws.send(JSON.stringify({ t: "call", id, action, args }));
        });
      },
    };
    ws.on("open", () => ws.send(JSON.stringify({ t: "init", key, params: null, subs })));
    ws.on("message", (data, isBinary) => {
      const receivedAt = performance.now();
      let msg;
      try {
        if (isBinary) throw new Error("a binary frame on a JSON connection");
        msg = JSON.parse(data.toString("utf8"));
      } catch (err) {
        ws.terminate();
        closed = err;
        return;
      }
      if (msg.t === "reply") {
        const call = pending.get(msg.id);
        if (!call) return;
        pending.delete(msg.id);
        clearTimeout(call.timer);
        if (msg.error) call.rej(answered(`${msg.error.group}.${msg.error.code}: ${msg.error.message}`));
        else call.res(msg.output);
      } else if (msg.t === "event") {
        onEvent?.(msg, receivedAt);
      } else if (msg.t === "ready") {
        ready = true;
        resolve(conn);
      } else if (msg.t === "error" && !ready) {
        reject(new Error(`connection refused: ${JSON.stringify(msg.error).slice(0, 200)}`));
      }
    });
    ws.on("error", (err) => {
      if (!ready) reject(err.code === "EMFILE" ? new Error(`out of file descriptors (limit ${fdLimit()}): ${err.message}`) : err);
    });
    ws.on("close", (code, reason) => {
      closed = new Error(`socket closed (${code} ${reason})`);
      if (!ready) reject(closed);
      for (const call of pending.values()) {
        clearTimeout(call.timer);
        call.rej(closed);
      }
      pending.clear();
    });
  });
}

/** Closes connections with a close handshake; stragglers are terminated after 5 s. */
export async function closeAll(conns) {
  const open = conns.filter((c) => c && c.ws.readyState !== WebSocket.CLOSED);
  const done = Promise.all(open.map((c) => new Promise((resolve) => {
    c.ws.once("close", resolve);
    c.ws.close(1000);
  })));
  const timer = setTimeout(() => open.forEach((c) => c.ws.terminate()), 5000);
  await done;
  clearTimeout(timer);
}
