// The broadcast workload: event fan-out from `room` actors to many WebSocket connections
// subscribed to the room's event, in timed bursts of one action per room.
//
// What must stay true: a burst ends only once every connection has its event and every action
// its reply (or the request timeout fails it); each connection gets exactly its own room's
// event once per burst; each reply and each room's final `sent` count every burst, warm-up
// included.

import { config } from "./config.mjs";
import { cpuNow, cpuSince, forEachConcurrently, latencySummary, percentile, round3 } from "./measure.mjs";
import { closeAll, fdLimit, openConnection } from "./ws.mjs";

/**
 * Broadcast fan-out. `connections` sockets spread evenly over `actors` rooms, all subscribed
 * to the room's event. A burst sends one `broadcast` action to every room (over the room's
 * first connection), as fast as the client can, and ends once every connection has received
 * that burst's event and every action its reply. Timed: from sending the burst's first action
 * to the last connection receiving its event (fan-out), and per connection from sending its
 * room's action to receiving the event (delivery). Bursts run one after another, after
 * `warmupBursts` untimed ones. Checks: each connection gets exactly its room's event once
 * per burst; each reply is the room's count so far; at the end each room's `sent` equals the
 * number of bursts.
 */
export async function broadcast() {
  const rooms = config.actors;
  const perRoom = config.connections / rooms;
  const total = config.connections;
  if (!Number.isInteger(perRoom)) throw new Error("connections must be a multiple of actors");
  const EVENT = "tick";

  const errors = [];
  const problem = (text) => {
    if (errors.length < 1000) errors.push(text);
  };
  // Per connection: the burst it last received, and when.
  const lastBurst = new Int32Array(total).fill(-1);
  const sentAt = new Float64Array(rooms);
  let burst = -1;
  let received = 0;
  let allReceived = null;
  const onEvent = (index, room) => (msg, at) => {
    const data = msg.data;
    if (msg.event !== EVENT || data?.room !== room || data?.burst !== burst) {
      return problem(`connection ${index}: unexpected event ${JSON.stringify(msg).slice(0, 120)} in burst ${burst}`);
    }
    if (lastBurst[index] === burst) return problem(`connection ${index}: burst ${burst} received twice`);
    lastBurst[index] = burst;
    deliveries[deliveryCount++] = at - sentAt[room];
    lastArrival = Math.max(lastArrival, at);
    if (++received === total) allReceived?.();
  };
  let deliveries = new Float64Array(total);
  let deliveryCount = 0;
  let lastArrival = 0;

  // Open every connection, `connectConcurrency` handshakes at a time.
  const conns = new Array(total);
  const connectStart = performance.now();
  await forEachConcurrently(total, config.connectConcurrency, async (i) => {
    const room = Math.floor(i / perRoom);
    conns[i] = await openConnection("room", [`room-${room}`], { subs: [EVENT], onEvent: onEvent(i, room) });
  });
  const connectMs = performance.now() - connectStart;

  const pad = "x".repeat(Math.max(0, config.payloadBytes - JSON.stringify({ burst: 0, room: 0, pad: "" }).length));
  const payloadBytes = JSON.stringify({ burst: 0, room: 0, pad }).length;
  const replyTimes = [];
  let replyMismatches = 0;

  /** One burst; resolves `{fanoutMs}` once every event and every reply arrived. */
  async function runBurst(n, timed) {
    burst = n;
    received = 0;
    lastArrival = 0;
    if (timed === false) deliveryCount = 0;
    const everyEvent = new Promise((resolve) => (allReceived = resolve));
    const start = performance.now();
    const replies = [];
    for (let room = 0; room < rooms; room++) {
      sentAt[room] = performance.now();
      const t0 = sentAt[room];
      replies.push(
        conns[room * perRoom].call("broadcast", [{ burst: n, room, pad }]).then(
          (output) => {
            if (timed) replyTimes.push(performance.now() - t0);
            if (output !== n + 1) replyMismatches += 1;
          },
          (err) => problem(`room ${room}: broadcast failed: ${err.message}`),
        ),
      );
    }
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`burst ${n}: ${received} of ${total} events after ${config.requestTimeoutMs} ms`)), config.requestTimeoutMs);
    });
    try {
      await Promise.race([Promise.all([everyEvent, Promise.all(replies)]), timeout]);
    } finally {
      clearTimeout(timer);
    }
    return { fanoutMs: lastArrival - start };
  }

  for (let n = 0; n < config.warmupBursts; n++) await runBurst(n, false);
  deliveries = new Float64Array(total * config.bursts);
  deliveryCount = 0;
  const bursts = [];
  const cpuStart = cpuNow();
  for (let n = config.warmupBursts; n < config.warmupBursts + config.bursts; n++) bursts.push((await runBurst(n, true)).fanoutMs);
  const cpuMsPerBurst = cpuSince(cpuStart, config.bursts);

  // Every room counted every burst (keel: in its durable state; the baseline: in memory).
  const want = config.warmupBursts + config.bursts;
  let countMismatches = 0;
  for (let room = 0; room < rooms; room++) {
    const sent = await conns[room * perRoom].call("sent", []).catch((err) => String(err.message ?? err));
    if (sent !== want) {
      countMismatches += 1;
      problem(`room ${room}: sent ${JSON.stringify(sent)}, want ${want}`);
    }
  }
  await closeAll(conns);

  const fanout = Float64Array.from(bursts).sort();
  return {
    workload: "broadcast",
    rooms,
    connections: total,
    connectionsPerRoom: perRoom,
    payloadBytes,
    bursts: config.bursts,
    warmupBursts: config.warmupBursts,
    connectMs: round3(connectMs),
    fdLimit: fdLimit(),
    fanoutMs: {
      median: round3(percentile(fanout, 50)),
      min: round3(fanout[0]),
      max: round3(fanout[fanout.length - 1]),
      perBurst: bursts.map(round3),
    },
    eventsPerSec: Math.round((total / percentile(fanout, 50)) * 1000 * 10) / 10,
    // CPU per burst (both sides run on the same machine): which one bounds the fan-out.
    cpuMsPerBurst,
    deliveryMs: latencySummary(deliveries.subarray(0, deliveryCount)),
    replyMs: latencySummary(replyTimes),
    errors: errors.length,
    verify: {
      ok: errors.length === 0 && replyMismatches === 0 && countMismatches === 0 && deliveryCount === total * config.bursts,
      deliveries: deliveryCount,
      expectedDeliveries: total * config.bursts,
      replyMismatches,
      countMismatches,
      firstErrors: errors.slice(0, 5),
    },
  };
}
