// Joins the lobby as argv[2], prints events, and sends each line typed on stdin.
import { createInterface } from "node:readline";
import { createClient } from "keel/client";

const name = process.argv[2] ?? "guest";
const client = createClient(process.env.KEEL_URL ?? "http://127.0.0.1:6420");
const conn = client.room.getOrCreate(["lobby"]).connect({ name });
conn.on("joined", (who) => console.log(`* ${who} joined`));
conn.on("left", (who) => console.log(`* ${who} left`));
conn.on("message", (line) => console.log(line));
conn.onStatusChange((status) => console.log(`(${status})`));
await conn.ready;
for (const line of await conn.history()) console.log(line);
const input = createInterface({ input: process.stdin });
input.on("line", (line) => conn.send(line).catch((err) => console.error(err.message)));
input.on("close", () => conn.dispose());
