// Calls the demo server from another process with the typed client.
import { createClient } from "keel/client";

const url = process.argv[2] ?? "http://127.0.0.1:6420";
const client = createClient(url);
const room = client.counter.getOrCreate(["room-1"]);
console.log("increment(5) ->", await room.increment(5));
console.log("getCount() ->", await room.getCount());
