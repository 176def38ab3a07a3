-- wrk script for the bench's many-actors workload (see runWrkManyActors in bench/http-wrk.mjs).
--
-- Usage: KEEL_BENCH_MANY_KIND=keel|baseline|rivetkit KEEL_BENCH_MANY_PREFIX=P KEEL_BENCH_MANY_PER=N \
--        [KEEL_BENCH_MANY_EXTRA=E] wrk -t T -c T -d CAP -s many.lua URL
-- Each of the T threads owns one connection and creates N new counters (the first E threads
-- N + 1), one after the other:
-- its i-th request is an `increment` of 1 on key P-<thread>-<i>, which must answer 1 (a new
-- actor). RivetKit needs two requests per actor: `PUT /actors` (get or create, whose reply
-- names the actor id), then the action through `/gateway/{id}`. A thread writes
-- `MANY_DONE <thread>` to stderr (unbuffered) after its last actor and stops; the runner sends
-- SIGINT once every thread has, and done() prints one JSON line with wrk's totals and per
-- thread the actors answered 1 (`ok`) and the replies that were not (`wrong`).

-- This script's directory, where result.lua and threads.lua are.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

local kind = os.getenv("KEEL_BENCH_MANY_KIND")
local prefix = os.getenv("KEEL_BENCH_MANY_PREFIX")
local per = tonumber(os.getenv("KEEL_BENCH_MANY_PER"))
local extra = tonumber(os.getenv("KEEL_BENCH_MANY_EXTRA") or "0")
local threads = dofile(here .. "threads.lua")(here)
setup = threads.setup

local headers = threads.headers

function init(args)
  ok = 0
  wrong = 0
  actor_id = nil
  quota = per + (index <= extra and 1 or 0)
end

local function key()
  return string.format("%s-%d-%d", prefix, index, ok + wrong)
end

function request()
  if kind ~= "rivetkit" then
    return threads.post("/v1/actors/counter/actions/increment", string.format('{"key":["%s"],"args":[1]}', key()))
  end
  if actor_id == nil then
    return wrk.format("PUT", "/actors", headers, string.format(
      '{"name":"counter","key":"%s","runner_name_selector":"default","crash_policy":"sleep"}', key()))
  end
  return threads.post("/gateway/" .. actor_id .. "/action/increment", '{"args":[1]}')
end

local function finish_one(answered_one)
  if answered_one then ok = ok + 1 else wrong = wrong + 1 end
  actor_id = nil
  if ok + wrong == quota then
    io.stderr:write(string.format("MANY_DONE %d\n", index))
    wrk.thread:stop()
  end
end

function response(status, headers, body)
  if kind == "rivetkit" and actor_id == nil then
    actor_id = status == 200 and body:match('"actor_id":%s*"([^"]+)"') or nil
    if actor_id == nil then finish_one(false) end
    return
  end
  finish_one(status == 200 and threads.output(body) == 1)
end

function done(summary, latency, requests)
  threads.done(summary, latency, { "index", "ok", "wrong" })
end
