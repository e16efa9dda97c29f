// k6: the mixed workload at a fixed total rate: 70 % ingest, 20 % inbox pages, 10 % acks of events
// this virtual user created (with their organization's key).
//   k6 run -e RATE=1000 -e DURATION=30s loadtest/mixed.js
import http from 'k6/http';
import { base, keys, count, options as shape, eventBody, headers } from './lib.js';

export const options = shape(1000);

let n = 0;
const created = [];
export default function () {
  n += 1;
  const key = keys[(__VU * 7919 + n) % keys.length];
  const r = Math.random();
  if (r < 0.7 || (r >= 0.9 && created.length === 0)) {
    const res = http.post(`${base}/api/events`, eventBody(__VU, n), headers(key));
    count(res);
    if (res.status === 201 && created.length < 10000) created.push([key, res.json('id')]);
  } else if (r < 0.9) {
    count(http.get(`${base}/api/inbox?limit=20`, headers(key)));
  } else {
    const [k, id] = created.shift();
    count(http.post(`${base}/api/ack/${id}`, null, { headers: { 'X-API-Key': k } }));
  }
}
