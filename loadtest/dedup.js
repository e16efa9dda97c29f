// k6: dedup-heavy ingest at a fixed rate: every other request repeats the dedup id of the one
// before it, so half the requests are 409 duplicates (answered from the owner core's window).
//   k6 run -e RATE=1000 -e DURATION=30s loadtest/dedup.js
import http from 'k6/http';
import { base, keys, count, options as shape, eventBody, headers } from './lib.js';

export const options = Object.assign(shape(1000), { discardResponseBodies: true });

let n = 0;
export default function () {
  n += 1;
  const first = n - (n % 2);
  const key = keys[(__VU * 7919 + first) % keys.length];
  const dedup = `,"dedup_id":"dd-${__VU}-${first}"`;
  // Every other request repeats the one before: 409 is what it should get.
  count(http.post(`${base}/api/events`, eventBody(__VU, first, dedup), headers(key)), [201, 202, 409]);
}
