-- wrk script: POST /api/events with a ~200-byte payload, spread over many organizations (one API
-- key per line in $KEYS_FILE, default loadtest/results/keys.txt) so no organization's rate limit
-- caps the run. Requests are built once in init() and cycled, and there is no response() hook:
-- wrk then spends its CPU on the network, not in Lua (on a 2-core box it shares the CPU with the
-- server). Non-2xx answers show in wrk's "Non-2xx or 3xx responses" line.
--   wrk -t2 -c512 -d20s -s loadtest/ingest.lua http://127.0.0.1:8080
local requests = {}
local n = 0

function init(args)
  local path = os.getenv("KEYS_FILE") or "loadtest/results/keys.txt"
  local keys = {}
  for line in io.lines(path) do
    if #line == 64 then keys[#keys + 1] = line end
  end
  if #keys == 0 then error("no keys in " .. path) end
  local tpl = '{"type":"order.created","payload":{"order_id":"ord_%08d","customer":"cus_4f9a8b7c",'
    .. '"amount":%d,"currency":"usd","items":[{"sku":"sku_1234","qty":2},{"sku":"sku_5678","qty":1}],'
    .. '"note":"load test event"}}'
  local count = math.max(#keys * 4, 1024)
  local offset = math.random(#keys)
  for i = 1, count do
    local key = keys[((i + offset) % #keys) + 1]
    requests[i] = wrk.format("POST", "/api/events",
      { ["Content-Type"] = "application/json", ["X-API-Key"] = key },
      string.format(tpl, i, i % 10000))
  end
  n = math.random(count)
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
