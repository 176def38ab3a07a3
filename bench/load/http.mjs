// The load generator's HTTP client: one keep-alive agent, JSON requests to the server under
// test, and the error for a request the server answered with a refusal.
//
// What must stay true: there is one socket per request in flight (the agent's maxSockets is
// the concurrency, or else the actor count) with keep-alive, so the figures measure request
// handling rather than TCP handshakes; every request has the config's timeout; an error marked
// `answered` means the server replied, so nothing was committed.

import http from "node:http";
import { config, HOST } from "./config.mjs";

// One socket per in-flight request: with keep-alive each actor loop reuses its own
// connection, so the figures measure request handling, not TCP handshakes.
export const agent = new http.Agent({ keepAlive: true, maxSockets: config.concurrency ?? config.actors, noDelay: true });

/** POSTs a JSON body; resolves `{status, body}` or rejects on a network error or timeout. */
export function post(path, payload) {
  return request("POST", config.port, path, JSON.stringify(payload));
}

/** One HTTP request to 127.0.0.1:`port`; resolves `{status, body}` with the body parsed as JSON. */
export function request(method, port, path, text) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: HOST,
        port,
        method,
        path,
        agent,
        headers: text === undefined ? {} : { "content-type": "application/json", "content-length": Buffer.byteLength(text) },
        timeout: config.requestTimeoutMs,
      },
      (res) => {
        const chunks = [];
        res.on("data", (chunk) => chunks.push(chunk));
        res.on("end", () => {
          const raw = Buffer.concat(chunks).toString("utf8");
          let body;
          try {
            body = JSON.parse(raw);
          } catch {
            body = raw;
          }
          resolve({ status: res.statusCode, body });
        });
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new Error(`request timed out after ${config.requestTimeoutMs} ms`)));
    req.on("error", reject);
    req.end(text);
  });
}

/** Calls `action` on the actor `name`/`key`; resolves the output or rejects with the error. */
export async function call(name, key, action, args = []) {
  const { status, body } = await post(`/v1/actors/${name}/actions/${action}`, { key, args });
  if (status !== 200) throw new Error(`${name}.${action} ${JSON.stringify(key)}: HTTP ${status}: ${JSON.stringify(body).slice(0, 200)}`);
  return body.output;
}

/** An error the server answered (HTTP status or an error reply): nothing was committed. */
export function answered(message) {
  const err = new Error(message);
  err.answered = true;
  return err;
}
