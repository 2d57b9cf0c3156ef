-- wrk script for phizer's bench: prints one JSON summary line, and optionally walks a URL list.
--
-- BENCH_URLS (environment): a file of request paths, one a line. Thread k of T requests lines k+1, k+1+T, ...
-- so every path is requested exactly once per run (all misses, whatever caches sit in front); a thread that
-- runs out of paths stops, so a run never silently turns into cache hits. It also adds up the response bodies'
-- bytes (body_bytes in the summary: what each side's encoder made, without the headers). Without BENCH_URLS wrk
-- requests its one URL over and over with no Lua on the request path (the fastest client, for cache-hit runs).
-- BENCH_ACCEPT (environment, optional): an Accept header sent with every request.
-- BENCH_CYCLE (environment, optional): "1" walks the list round and round instead of stopping at its end (a page
-- of cache hits); requests are formatted once, up front, and bodies are not handed to Lua, so the client costs
-- per request what a one-URL run costs plus one table lookup.

local list = os.getenv("BENCH_URLS")
local accept = os.getenv("BENCH_ACCEPT")
local cycle = os.getenv("BENCH_CYCLE") == "1"
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

if accept and accept ~= "" then
  wrk.headers["Accept"] = accept
end

if list and list ~= "" and cycle then
  local requests = {}
  local nexti = 1

  function init(args)
    local nthreads = tonumber(args[1]) or 1
    for line in io.lines(list) do
      if line ~= "" then
        requests[#requests + 1] = wrk.format(nil, line)
      end
    end
    -- Threads start at different places in the list, so they do not ask for the same file at the same moment.
    nexti = 1 + math.floor(tid * #requests / nthreads)
  end

  function request()
    local req = requests[nexti]
    nexti = nexti % #requests + 1
    return req
  end
elseif list and list ~= "" then
  local paths = {}
  local nthreads = 1
  local nexti = 0
  exhausted = 0
  body_bytes = 0

  -- wrk calls request() once on the first thread's state right after init() to check the script
  -- (script_verify_request in wrk.c); that call must not use up a path.
  local verifying = false

  function init(args)
    nthreads = tonumber(args[1]) or 1
    for line in io.lines(list) do
      if line ~= "" then
        paths[#paths + 1] = line
      end
    end
    nexti = tid + 1
    verifying = tid == 0
  end

  function request()
    if verifying then
      verifying = false
      return wrk.format(nil, paths[nexti])
    end
    local path = paths[nexti]
    if path == nil then
      -- Out of distinct paths: stop this thread; the request returned here is never counted as a miss.
      exhausted = 1
      wrk.thread:stop()
      path = paths[#paths]
    end
    nexti = nexti + nthreads
    return wrk.format(nil, path)
  end

  function response(status, headers, body)
    body_bytes = body_bytes + #body
  end
end

function done(summary, latency, requests)
  local ran_out = 0
  local bodies = 0
  for _, thread in ipairs(threads) do
    ran_out = ran_out + (thread:get("exhausted") or 0)
    bodies = bodies + (thread:get("body_bytes") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    '\nBENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, '
      .. '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
      .. '"max_us": %d, "mean_us": %.1f, "threads_exhausted": %d, "body_bytes": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean, ran_out, bodies
  ))
end
