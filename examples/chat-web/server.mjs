// The chat room in a browser: a React page (app.jsx, bundled by esbuild when the server
// starts) served by a small static server, next to the chat actors on keel, which lets that
// page's origin in through `allowedOrigins`.
// Run: npm run demo:web   then open the printed page in two tabs (add ?name=ada to pick a name).
// WEB_PORT (default 8080) and KEEL_PORT (default 6420) pick the ports; 0 picks free ones.
import { createServer } from "node:http";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { setup } from "keel";
import { room } from "../chat/actors.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const host = "127.0.0.1";

const bundle = await build({
  entryPoints: [join(here, "app.jsx")],
  bundle: true,
  format: "esm",
  platform: "browser",
  jsx: "automatic",
  minify: true,
  write: false,
  define: { "process.env.NODE_ENV": '"production"' },
  logLevel: "warning",
});
const appJs = bundle.outputFiles[0].contents;

let keelUrl;
const page = () => `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>keel chat</title>
<style>
  body { font: 16px system-ui, sans-serif; margin: 0; background: #f4f1ea; color: #222; }
  main { max-width: 40rem; margin: 2rem auto; background: #fff; border-radius: 8px; padding: 1.5rem; box-shadow: 0 2px 8px #0002; }
  h1 { margin: 0 0 1rem; font-size: 1.4rem; color: #2b4c7e; }
  .status { display: inline-block; padding: 0.1rem 0.6rem; border-radius: 1rem; color: #fff; background: #888; }
  .status.open { background: #2e7d32; } .status.reconnecting { background: #e65100; } .status.closed { background: #b71c1c; }
  ul { list-style: none; padding: 0; min-height: 8rem; border: 1px solid #ddd; border-radius: 4px; }
  li { padding: 0.3rem 0.6rem; border-bottom: 1px solid #eee; }
  form { display: flex; gap: 0.5rem; } input { flex: 1; padding: 0.4rem; } button { padding: 0.4rem 1rem; }
  .error { color: #b71c1c; }
</style>
</head>
<body>
<div id="root"></div>
<script>window.KEEL_URL = ${JSON.stringify(keelUrl)};</script>
<script type="module" src="/app.js"></script>
</body>
</html>
`;

const web = createServer((request, response) => {
  const path = new URL(request.url, "http://localhost").pathname;
  if (path === "/") {
    response.writeHead(200, { "content-type": "text/html; charset=utf-8" }).end(page());
  } else if (path === "/app.js") {
    response.writeHead(200, { "content-type": "text/javascript; charset=utf-8" }).end(appJs);
  } else {
    response.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
  }
});
await new Promise((resolve) => web.listen(Number(process.env.WEB_PORT ?? 8080), host, resolve));
const pageUrl = `http://${host}:${web.address().port}`;

const registry = setup({
  use: { room },
  host,
  port: Number(process.env.KEEL_PORT ?? 6420),
  // The page comes from another port, so another origin: let it open WebSockets and read replies.
  allowedOrigins: [pageUrl],
});
registry.start().finally(() => web.close());
const { url, port } = await registry.listening();
keelUrl = url;
console.log(`page ${pageUrl}/`);
console.log(`keel ${url}`);
console.log(`listening ${port}`);
