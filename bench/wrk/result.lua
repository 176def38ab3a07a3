-- What the bench's wrk scripts print from done() (through threads.lua): one line,
-- `WRK_RESULT {...}`, with wrk's totals, exact latency percentiles from its histogram
-- (microseconds) and `per_thread`, the script's own JSON object for each thread.
--
-- Usage, in a script's done(): dofile(<this file>)(summary, latency, per_thread)

return function(summary, latency, per_thread)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"durationUs":%d,"requests":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latencyUs":{"p50":%d,"p99":%d,"mean":%.1f,"max":%d},"threads":[%s]}\n',
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max, table.concat(per_thread, ",")))
end
