-- Appended to every wrk script of `cargo xtask bench`: one JSON line with what the bench
-- reads (wrk's latencies are in microseconds). Defining only done() keeps wrk's fast path:
-- no Lua runs per request or response.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCH {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
