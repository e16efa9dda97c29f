// k6: POST /api/events/batch at a fixed arrival rate of batches (open loop), BATCH_SIZE events
// each (default 100), spread over the organizations in KEYS_FILE (one key per line). Items whose
// own result is not 201/202 are counted in `batch_item_errors`.
//   k6 run -e RATE=200 -e BATCH_SIZE=100 -e DURATION=30s -e BASE=http://127.0.0.1:8080 loadtest/batch.js
import http from 'k6/http';
import { Counter } from 'k6/metrics';
import { base, keys, count, options as shape, eventBody, headers } from './lib.js';

export const options = shape(100);
// Every item of every batch committed: any item answered otherwise fails a hand-run.
options.thresholds.batch_item_errors = ['count<1'];
const size = parseInt(__ENV.BATCH_SIZE || '100');
const itemErrors = new Counter('batch_item_errors');

let n = 0;
export default function () {
  n += 1;
  const key = keys[(__VU * 7919 + n) % keys.length];
  const items = [];
  for (let i = 0; i < size; i++) items.push(eventBody(__VU, n * size + i));
  const res = http.post(`${base}/api/events/batch`, `{"events":[${items.join(',')}]}`, headers(key));
  count(res);
  if (res.status === 200) {
    for (const r of res.json('results')) {
      if (r.status !== 201 && r.status !== 202) itemErrors.add(1);
    }
  }
}
