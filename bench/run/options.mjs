// The command line of run.mjs: every option, its default and its bounds. The options are
// listed, with their defaults, at the top of run.mjs (which the error for an unknown option
// points to) and in bench/README.md's table.
//
// What must stay true: those two lists and this parser agree; a malformed or unknown option is
// an error before anything runs, never ignored; and the knobs are capped so that a typo cannot
// start an hour-long run.

import path from "node:path";
import { ALL_WORKLOADS, OPT_IN_WORKLOADS, PEERS } from "./workloads.mjs";

export function parseArgs(argv) {
  const opts = {
    build: true,
    keelDir: null,
    only: ALL_WORKLOADS,
    rounds: 3,
    seqCalls: 2000,
    concurrency: 64,
    durationS: 5,
    maxCalls: 250_000,
    wakeActors: 1000,
    memActors: 10_000,
    alarms: 20_000,
    alarmActors: 20,
    alarmLeadMs: 3000,
    fanoutConns: 1000,
    fanoutActors: 100,
    fanoutBursts: 10,
    fanoutPayload: 100,
    peers: [],
    manyActors: 10_000,
    coldRounds: 5,
    socketConns: 10_000,
    socketActors: 1000,
    engineSeqCalls: 500,
    engineFirstActors: 10,
    engineWakeActors: 10,
    engineActors: [8, 64],
  };
  const numeric = {
    "--rounds": "rounds",
    "--seq-calls": "seqCalls",
    "--concurrency": "concurrency",
    "--duration": "durationS",
    "--max-calls": "maxCalls",
    "--wake-actors": "wakeActors",
    "--mem-actors": "memActors",
    "--alarms": "alarms",
    "--alarm-actors": "alarmActors",
    "--alarm-lead": "alarmLeadMs",
    "--fanout-conns": "fanoutConns",
    "--fanout-actors": "fanoutActors",
    "--fanout-bursts": "fanoutBursts",
    "--fanout-payload": "fanoutPayload",
    "--many-actors": "manyActors",
    "--cold-rounds": "coldRounds",
    "--socket-conns": "socketConns",
    "--socket-actors": "socketActors",
    "--engine-seq-calls": "engineSeqCalls",
    "--engine-first-actors": "engineFirstActors",
    "--engine-wake-actors": "engineWakeActors",
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--no-build") opts.build = false;
    else if (arg === "--keel-dir") {
      if (!argv[i + 1]) throw new Error("--keel-dir needs a path");
      opts.keelDir = path.resolve(argv[++i]);
      opts.build = false;
    } else if (arg === "--only") {
      const names = (argv[++i] ?? "").split(",").filter(Boolean);
      // The opt-in ones (the engine group, which needs the engine binary) only when named.
      const known = [...ALL_WORKLOADS, ...OPT_IN_WORKLOADS];
      const unknown = names.filter((n) => !known.includes(n));
      if (!names.length || unknown.length) throw new Error(`--only takes a comma-separated list from ${known.join(",")}`);
      opts.only = names;
    } else if (arg === "--engine-actors") {
      const counts = (argv[++i] ?? "").split(",").filter(Boolean).map(Number);
      if (!counts.length || counts.some((n) => !Number.isInteger(n) || n < 1 || n > 256)) throw new Error("--engine-actors takes a comma-separated list of actor counts from 1 to 256");
      opts.engineActors = counts;
    } else if (arg === "--peers") {
      const names = (argv[++i] ?? "").split(",").filter(Boolean);
      if (!names.length || names.some((n) => !PEERS.includes(n))) throw new Error(`--peers takes a comma-separated list from ${PEERS.join(",")}`);
      opts.peers = names;
    } else if (arg in numeric) {
      const value = Number(argv[++i]);
      if (!(value > 0)) throw new Error(`${arg} needs a positive number`);
      opts[numeric[arg]] = value;
    } else throw new Error(`unknown option ${arg} (see the top of bench/run.mjs)`);
  }
  // Everything is bounded: cap the knobs so a typo can't start an hour-long run.
  opts.durationS = Math.min(opts.durationS, 60);
  opts.rounds = Math.min(Math.floor(opts.rounds), 10);
  opts.concurrency = Math.min(Math.floor(opts.concurrency), 1024);
  opts.wakeActors = Math.min(Math.floor(opts.wakeActors), 20_000);
  opts.memActors = Math.min(Math.floor(opts.memActors), 100_000);
  opts.alarmActors = Math.min(Math.floor(opts.alarmActors), 1000);
  opts.alarms = Math.min(Math.floor(opts.alarms / opts.alarmActors) * opts.alarmActors, 1_000_000);
  opts.alarmLeadMs = Math.min(opts.alarmLeadMs, 60_000);
  if (opts.alarms < opts.alarmActors) throw new Error("--alarms must be at least --alarm-actors");
  opts.fanoutActors = Math.min(Math.floor(opts.fanoutActors), 1000);
  opts.fanoutConns = Math.min(Math.floor(opts.fanoutConns / opts.fanoutActors) * opts.fanoutActors, 10_000);
  opts.fanoutBursts = Math.min(Math.floor(opts.fanoutBursts), 1000);
  opts.fanoutPayload = Math.min(Math.floor(opts.fanoutPayload), 65_536);
  opts.manyActors = Math.min(Math.floor(opts.manyActors), 100_000);
  opts.coldRounds = Math.min(Math.floor(opts.coldRounds), 20);
  opts.engineSeqCalls = Math.min(Math.floor(opts.engineSeqCalls), 20_000);
  opts.engineFirstActors = Math.min(Math.floor(opts.engineFirstActors), 1000);
  opts.engineWakeActors = Math.min(Math.floor(opts.engineWakeActors), 1000);
  if (opts.fanoutConns < opts.fanoutActors) throw new Error("--fanout-conns must be at least --fanout-actors");
  opts.socketActors = Math.min(Math.floor(opts.socketActors), 5000);
  opts.socketConns = Math.min(Math.floor(opts.socketConns / opts.socketActors) * opts.socketActors, 15_000);
  if (opts.socketConns < opts.socketActors) throw new Error("--socket-conns must be at least --socket-actors");
  return opts;
}
