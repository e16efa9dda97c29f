// Shared by the k6 scripts: keys, event bodies, a counter per response status, the scenario shape.
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

export function count(res) {
  (counters[res.status] || other).add(1);
}

export function options(defaultRate) {
  const rate = parseInt(__ENV.RATE || String(defaultRate));
  return {
    discardResponseBodies: false,
    summaryTrendStats: ['min', 'med', 'p(90)', 'p(99)', 'max'],
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
