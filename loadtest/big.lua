-- wrk script: POST /api/events with a large payload (PAYLOAD_BYTES, default 262,000: just under the
-- 262,144-byte limit), spread over the organizations of $KEYS_FILE. Used by
-- `bash loadtest/run.sh big-payloads` to show that memory stays within the configured budgets.
--   KEYS_FILE=keys.txt wrk -t2 -c64 -d60s -s loadtest/big.lua http://127.0.0.1:8080
local requests = {}
local n = 0

function init(args)
  local path = os.getenv("KEYS_FILE") or "loadtest/results/keys.txt"
  local keys = {}
  for line in io.lines(path) do
    if #line == 64 then keys[#keys + 1] = line end
  end
  if #keys == 0 then error("no keys in " .. path) end
  local size = tonumber(os.getenv("PAYLOAD_BYTES") or "262000")
  local filler = string.rep("x", size - 40)
  for i = 1, #keys do
    requests[i] = wrk.format("POST", "/api/events",
      { ["Content-Type"] = "application/json", ["X-API-Key"] = keys[i] },
      '{"type":"blob","payload":{"n":' .. i .. ',"blob":"' .. filler .. '"}}')
  end
  n = math.random(#keys)
end

function request()
  n = n + 1
  if n > #requests then n = 1 end
  return requests[n]
end

function done(summary, latency, requests)
  io.write(string.format("requests: %d, errors: connect %d read %d write %d status %d timeout %d\n",
    summary.requests, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout))
  io.write(string.format("latency p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms\n",
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
