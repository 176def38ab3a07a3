// A chat room server (the actors are in actors.mjs).
// Run: node examples/chat/server.mjs   then, in other terminals: node examples/chat/client.mjs ada
import { setup } from "keel";
import { room } from "./actors.mjs";

const registry = setup({ use: { room } });
registry.start();
const { url } = await registry.listening();
console.log(`chat listening on ${url}`);
