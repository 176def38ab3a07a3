-- wrk script for the bench's HTTP counter workloads (see bench/http-wrk.mjs, which runs it).
--
-- Usage: KEEL_BENCH_WRK_PLAN=PLAN_FILE wrk -t N -c N -s counter.lua URL
-- PLAN_FILE has one line per thread: `path<TAB>body<TAB>start`. wrk runs with as many threads
-- as connections, so each thread owns one connection and one key: every request of a thread
-- is `POST path` with `body` (an `increment` of 1), one in flight at a time. `start` is the
-- count the key had before this run. The first reply fixes `base` (its output minus 1), and
-- the N-th reply of a thread must be `base + N`.
--
-- done() prints one JSON line: wrk's totals, exact latency percentiles from its histogram
-- (microseconds), and per thread the replies that were 200, not 200, or off count, and base.

-- This script's directory, where result.lua and threads.lua are.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

local threads = dofile(here .. "threads.lua")(here)
local plan = {}

function setup(thread)
  if #plan == 0 then
    for line in io.lines(os.getenv("KEEL_BENCH_WRK_PLAN")) do
      local path, body, start = line:match("^([^\t]*)\t([^\t]*)\t(%d+)$")
      plan[#plan + 1] = { path = path, body = body, start = tonumber(start) }
    end
  end
  threads.setup(thread)
  local entry = plan[thread:get("index")]
  thread:set("path", entry.path)
  thread:set("body", entry.body)
  thread:set("start", entry.start)
end

function init(args)
  ok = 0
  base = nil
  refused = 0
  mismatches = 0
  req = threads.post(path, body)
end

function request()
  return req
end

function response(status, headers, reply)
  if status ~= 200 then
    refused = refused + 1
    return
  end
  ok = ok + 1
  local output = threads.output(reply)
  -- The first reply anchors the sequence: a warm-up request still in flight when the plan's
  -- `start` was read may have landed since (run.mjs checks `base` is start or start + 1).
  if base == nil and output ~= nil then
    base = output - 1
  end
  if output == nil or output ~= base + ok then
    mismatches = mismatches + 1
  end
end

function done(summary, latency, requests)
  threads.done(summary, latency, { "index", "ok", "refused", "mismatches", "base" })
end
