-- wrk script for the bench's HTTP counter workloads with more connections than threads (see
-- bench/http-wrk.mjs, which runs it with one thread per core).
--
-- Usage: KEEL_BENCH_WRK_PLAN=PLAN_FILE KEEL_BENCH_WRK_THREADS=T wrk -t T -c N -s spread.lua URL
-- PLAN_FILE has one line per key: `path<TAB>body<TAB>start`, N keys for N connections. Thread
-- t (1-based) takes keys t, t + T, t + 2T, ...; each request it sends is an `increment` of 1 on
-- the next of its keys in turn, so every key gets about the same share and each connection has
-- one request in flight. wrk does not say which connection a reply came on, so a reply cannot
-- be matched to its key: each must be 200 with a whole number as its output, and http-wrk.mjs
-- checks afterwards that the keys' durable counts grew by exactly the replies (plus at most one
-- request per connection still in flight when wrk stopped).
--
-- done() prints one JSON line: wrk's totals, exact latency percentiles from its histogram
-- (microseconds), and per thread the replies that were 200, not 200, or had no count.

-- This script's directory, where result.lua and threads.lua are.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

-- wrk runs setup() in its main Lua state and init() in each thread's own: the threads read the
-- plan themselves and learn their number from setup and the count from the environment.
local threads = dofile(here .. "threads.lua")(here)
setup = threads.setup

function init(args)
  ok = 0
  refused = 0
  mismatches = 0
  reqs = {}
  local step = tonumber(os.getenv("KEEL_BENCH_WRK_THREADS"))
  local k = 0
  for line in io.lines(os.getenv("KEEL_BENCH_WRK_PLAN")) do
    k = k + 1
    if (k - index) % step == 0 then
      local path, body = line:match("^([^\t]*)\t([^\t]*)\t%d+$")
      reqs[#reqs + 1] = threads.post(path, body)
    end
  end
  turn = 0
end

function request()
  turn = turn % #reqs + 1
  return reqs[turn]
end

function response(status, headers, reply)
  if status ~= 200 then
    refused = refused + 1
    return
  end
  ok = ok + 1
  local output = threads.output(reply)
  if output == nil or output < 1 then
    mismatches = mismatches + 1
  end
end

function done(summary, latency, requests)
  threads.done(summary, latency, { "index", "ok", "refused", "mismatches" })
end
