// `npm run demo`: serves the counter on http://127.0.0.1:6420 (KEEL_PORT / KEEL_HOST /
// KEEL_DATA_DIR override), with data in ./.keel. Ctrl-C shuts down gracefully.
import { registry } from "./actors.mjs";

registry.start().then(() => console.log("keel demo stopped"));
const { url } = await registry.listening();
console.log(`keel demo listening on ${url}`);
console.log(`try: curl -s -X POST ${url}/v1/actors/counter/actions/increment -H 'content-type: application/json' -d '{"key":["room-1"],"args":[5]}'`);
console.log(`or:  node examples/counter/client.mjs ${url}`);
