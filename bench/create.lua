-- wrk script: POST one new job per request to the URL given to wrk (/job/<collection>).
--
--   wrk -t2 -c16 -d10s -s bench/create.lua http://127.0.0.1:8001/job/bench -- ROUTE PREFIX
--
-- ROUTE (default "bench") must exist on the node. PREFIX (default: the current epoch
-- seconds) makes ids unique across runs; inside a run each wrk thread numbers its own
-- requests, so ids are "<prefix>-<thread>-<n>" and no request replaces another job.
-- trigger_ms is a year ahead so nothing fires while the benchmark runs.
-- At the end one line "WRK_JSON {...}" gives the figures in a machine-readable form.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("thread_number", #threads)
end

function init(args)
   route = args[1] or "bench"
   prefix = args[2] or tostring(os.time())
   counter = 0
   -- os.time() is seconds; %.0f keeps the 13-digit millisecond value exact (doubles).
   trigger = string.format("%.0f", (os.time() + 365 * 24 * 3600) * 1000)
   headers = { ["Content-Type"] = "application/json" }
end

function request()
   counter = counter + 1
   local body = '{"id":"' .. prefix .. "-" .. thread_number .. "-" .. counter ..
      '","trigger_ms":' .. trigger .. ',"meta":{"n":' .. counter .. '},"route":"' ..
      route .. '"}'
   return wrk.format("POST", nil, headers, body)
end

-- No response() function on purpose: defining one makes wrk hand every response to
-- Lua, which costs the client CPU that the server under test needs on a 2-core box.

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,' ..
      '"timeouts":%d,"latency_p50_us":%d,"latency_p99_us":%d,"latency_max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99), latency.max))
end
