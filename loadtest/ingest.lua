-- wrk script: POST /api/events with a ~200-byte payload, spreading requests over many
-- organizations (one API key per line in $KEYS_FILE, default loadtest/results/keys.txt) so that no
-- organization's rate limit caps the run.
--   wrk -t2 -c512 -d20s -s loadtest/ingest.lua http://127.0.0.1:8080
local keys = {}
local counter = 0

function init(args)
  local path = os.getenv("KEYS_FILE") or "loadtest/results/keys.txt"
  for line in io.lines(path) do
    if #line == 64 then keys[#keys + 1] = line end
  end
  if #keys == 0 then error("no keys in " .. path) end
  counter = math.random(#keys)
end

local body_tpl = '{"type":"order.created","payload":{"order_id":"ord_%08d","customer":"cus_4f9a8b7c","amount":%d,"currency":"usd","items":[{"sku":"sku_1234","qty":2},{"sku":"sku_5678","qty":1}],"note":"load test event"}}'

function request()
  counter = counter + 1
  local key = keys[(counter % #keys) + 1]
  local body = string.format(body_tpl, counter, counter % 10000)
  return wrk.format("POST", "/api/events", {
    ["Content-Type"] = "application/json",
    ["X-API-Key"] = key,
  }, body)
end

local statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  io.write(string.format("requests: %d, errors: connect %d read %d write %d status %d timeout %d\n",
    summary.requests, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout))
  io.write(string.format("latency p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms\n",
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
