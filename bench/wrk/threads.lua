-- What the bench's wrk scripts (counter.lua, many.lua, spread.lua) share: about wrk's threads,
-- `setup` numbers each thread (its global `index`, from 1) and keeps it, and `done` prints
-- result.lua's line with, for each thread, the named whole-number globals of that thread (-1
-- for one it never set); about the counter, `post` is a JSON `POST` as every counter request
-- is sent, and `output` reads a JSON reply's whole-number `output` (nil if it has none).
--
-- Usage: local threads = dofile(here .. "threads.lua")(here); setup = threads.setup; and in
-- done(): threads.done(summary, latency, { "index", "ok", ... })

return function(here)
  local kept = {}
  local next_thread = 1
  local shared = {}

  function shared.setup(thread)
    thread:set("index", next_thread)
    next_thread = next_thread + 1
    kept[#kept + 1] = thread
  end

  function shared.done(summary, latency, fields)
    local per_thread = {}
    for _, thread in ipairs(kept) do
      local parts = {}
      for _, name in ipairs(fields) do
        parts[#parts + 1] = string.format('"%s":%d', name, thread:get(name) or -1)
      end
      per_thread[#per_thread + 1] = "{" .. table.concat(parts, ",") .. "}"
    end
    dofile(here .. "result.lua")(summary, latency, per_thread)
  end

  -- The JSON headers of every counter request.
  shared.headers = { ["content-type"] = "application/json", ["x-rivet-encoding"] = "json" }

  function shared.post(path, body)
    return wrk.format("POST", path, shared.headers, body)
  end

  function shared.output(reply)
    return tonumber(reply:match('"output":%s*(%-?%d+)'))
  end

  return shared
end
