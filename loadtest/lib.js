// Shared by the k6 scripts: keys, event bodies, a counter per response status, the scenario shape,
// and the pass/fail rules of a hand-run `k6 run`: a check per response (its status is one the
// script expects) and thresholds, so a run with more than 1 % unexpected statuses (errors, 503s,
// 429s) or a p99 over P99_MS (default 1000 ms) exits non-zero. The harness (loadtest/run.sh) runs
// the scripts with --no-thresholds and reports statuses and percentiles itself.
//   k6 run -e BASE=https://triggers.example.com -e KEYS_FILE=keys.txt -e RATE=1000 -e P99_MS=50 loadtest/ingest.js
import { check } from 'k6';
import { Counter } from 'k6/metrics';

export const base = __ENV.BASE || 'http://127.0.0.1:8080';
export const keys = open(__ENV.KEYS_FILE || 'results/keys.txt')
  .split('\n')
  .filter((k) => k.length === 64);

// One counter per status the API uses; the harness reports them as "errors by status".
const statuses = [200, 201, 202, 400, 401, 404, 409, 413, 422, 429, 500, 503];
const counters = {};
for (const s of statuses) counters[s] = new Counter(`status_${s}`);
const other = new Counter('status_other');

// Count the response's status, and check it is one of `expected` (default: 200, 201, 202).
export function count(res, expected) {
  (counters[res.status] || other).add(1);
  const ok = expected || [200, 201, 202];
  check(res, { 'expected status': (r) => ok.includes(r.status) });
}

export function options(defaultRate) {
  const rate = parseInt(__ENV.RATE || String(defaultRate));
  return {
    discardResponseBodies: false,
    summaryTrendStats: ['min', 'med', 'p(90)', 'p(99)', 'max'],
    thresholds: {
      checks: ['rate>=0.99'],
      http_req_duration: [`p(99)<${parseInt(__ENV.P99_MS || '1000')}`],
      // Arrivals k6 could not start (too few VUs: the server is too slow for the rate).
      dropped_iterations: ['count<1'],
    },
    scenarios: {
      main: {
        executor: 'constant-arrival-rate',
        rate: rate,
        timeUnit: '1s',
        duration: __ENV.DURATION || '30s',
        preAllocatedVUs: Math.max(20, Math.ceil(rate / 40)),
        maxVUs: Math.max(100, Math.ceil(rate / 5)),
      },
    },
  };
}

export function eventBody(vu, n, extra) {
  return `{"type":"order.created","payload":{"order_id":"ord_${vu}_${n}","customer":"cus_4f9a8b7c","amount":${n % 10000},"currency":"usd","items":[{"sku":"sku_1234","qty":2},{"sku":"sku_5678","qty":1}],"note":"load test event"}${extra || ''}}`;
}

export function headers(key) {
  return { headers: { 'Content-Type': 'application/json', 'X-API-Key': key } };
}
