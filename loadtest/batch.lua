-- wrk script: POST /api/events/batch with BATCH_SIZE events (default 100) of ~200 bytes each,
-- spread over many organizations (one API key per line in $KEYS_FILE, default
-- loadtest/results/keys.txt). Requests are built once in init() and cycled; no response() hook.
-- wrk's Requests/sec counts batches: events/s is that times BATCH_SIZE (the harness reports the
-- events the server committed).
--   BATCH_SIZE=100 wrk -t2 -c64 -d20s -s loadtest/batch.lua http://127.0.0.1:8080
local requests = {}
local n = 0

function init(args)
  local path = os.getenv("KEYS_FILE") or "loadtest/results/keys.txt"
  local size = tonumber(os.getenv("BATCH_SIZE") or "100")
  local keys = {}
  for line in io.lines(path) do
    if #line == 64 then keys[#keys + 1] = line end
  end
  if #keys == 0 then error("no keys in " .. path) end
  local tpl = '{"type":"order.created","payload":{"order_id":"ord_%08d_%04d","customer":"cus_4f9a8b7c",'
    .. '"amount":%d,"currency":"usd","items":[{"sku":"sku_1234","qty":2},{"sku":"sku_5678","qty":1}],'
    .. '"note":"load test event"}}'
  local count = math.max(#keys * 2, 256)
  local offset = math.random(#keys)
  for i = 1, count do
    local key = keys[((i + offset) % #keys) + 1]
    local items = {}
    for j = 1, size do
      items[j] = string.format(tpl, i, j, (i * size + j) % 10000)
    end
    requests[i] = wrk.format("POST", "/api/events/batch",
      { ["Content-Type"] = "application/json", ["X-API-Key"] = key },
      '{"events":[' .. table.concat(items, ",") .. ']}')
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
