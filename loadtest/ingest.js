// k6: POST /api/events at a fixed arrival rate (open loop), spread over the organizations in
// KEYS_FILE (one key per line).
//   k6 run -e RATE=2500 -e DURATION=30s -e BASE=http://127.0.0.1:8080 loadtest/ingest.js
import http from 'k6/http';
import { base, keys, count, options as shape, eventBody, headers } from './lib.js';

export const options = Object.assign(shape(1000), { discardResponseBodies: true });

let n = 0;
export default function () {
  n += 1;
  const key = keys[(__VU * 7919 + n) % keys.length];
  count(http.post(`${base}/api/events`, eventBody(__VU, n), headers(key)));
}
