// `c.request`: who is calling. Core hands over the HTTP request a call or connection came
// with as one header block (see `RequestHead` in crates/core/src/host.rs); the Fetch `Request`
// is built only when user code first reads `c.request`, so calls that never look pay nothing
// beyond carrying one string.
import type { RequestHeadJs } from "./native";

/** The request behind the current call, and the `Request` made of it once read. */
export class CallerRequest {
  private built: Request | undefined;

  constructor(private readonly head: RequestHeadJs) {}

  /** The Fetch `Request` (method, URL with the query as sent, headers; no body). */
  get request(): Request {
    return (this.built ??= requestOf(this.head));
  }
}

function requestOf(head: RequestHeadJs): Request {
  const headers = new Headers();
  for (const line of head.headers.split("\r\n")) {
    const colon = line.indexOf(": ");
    if (colon <= 0) continue;
    try {
      headers.append(line.slice(0, colon), line.slice(colon + 2));
    } catch {
      // A header Fetch refuses (core passes only visible ASCII, so none should) is left out.
    }
  }
  // A Fetch `Request` needs an absolute URL; the `host` header names the server as the client
  // addressed it. One that does not make a valid URL falls back to `localhost`.
  let url: URL;
  try {
    url = new URL(`http://${headers.get("host") ?? "localhost"}${head.url}`);
  } catch {
    url = new URL(`http://localhost${head.url}`);
  }
  return new Request(url, { method: head.method, headers });
}
