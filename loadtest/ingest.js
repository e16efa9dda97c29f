// k6: POST /api/events at a fixed arrival rate (open loop), spread over many organizations.
//   k6 run -e RATE=2500 -e DURATION=30s -e BASE=http://127.0.0.1:8080 loadtest/ingest.js
// Keys: one per line in KEYS_FILE (default loadtest/results/keys.txt).
import http from 'k6/http';
import { check } from 'k6';

const keys = open(__ENV.KEYS_FILE || 'results/keys.txt').split('\n').filter((k) => k.length === 64);
const base = __ENV.BASE || 'http://127.0.0.1:8080';
const rate = parseInt(__ENV.RATE || '1000');

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['min', 'med', 'p(90)', 'p(99)', 'max'],
  scenarios: {
    ingest: {
      executor: 'constant-arrival-rate',
      rate: rate,
      timeUnit: '1s',
      duration: __ENV.DURATION || '30s',
      preAllocatedVUs: Math.max(50, Math.ceil(rate / 50)),
      maxVUs: Math.max(200, Math.ceil(rate / 10)),
    },
  },
};

let n = 0;
export default function () {
  n += 1;
  const key = keys[(__VU * 7919 + n) % keys.length];
  const body = `{"type":"order.created","payload":{"order_id":"ord_${__VU}_${n}","customer":"cus_4f9a8b7c","amount":${n % 10000},"currency":"usd","items":[{"sku":"sku_1234","qty":2},{"sku":"sku_5678","qty":1}],"note":"load test event"}}`;
  const res = http.post(`${base}/api/events`, body, {
    headers: { 'Content-Type': 'application/json', 'X-API-Key': key },
  });
  check(res, { '201': (r) => r.status === 201 });
}
