#!/usr/bin/env python3
"""One organization floods the server with reads; how long does another organization's read take?

    python3 loadtest/fair_reads.py --server-bin OLD --against NEW [--repeat 2] [--limit 1000]

For each binary (alternating, `--repeat` times): a fresh database, the server on 18555/19555, two
enterprise organizations, 10,000 events of ~220 bytes for the flooder; then the other
organization's `GET /api/endpoints` every 20 ms for 3 s alone, and again for 11 s while wrk reads
the flooder's `GET /api/inbox?limit=LIMIT` on `--connections` connections for 15 s. Prints the
other's p50 / p99 / max and the flooder's pages a second. Needs wrk and the project's PostgreSQL
(`bash scripts/postgres.sh start`).
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

DB = "postgres://triggers@127.0.0.1:54329"
PORT = 18555


def call(conn, method, path, key=None, body=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = key
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = conn.getresponse()
    return r.status, r.read()


def probe(key, seconds):
    """The other organization's reads, one every 20 ms: (p50, p99, max) in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", PORT)
    took = []
    end = time.time() + seconds
    while time.time() < end:
        t = time.time()
        status, _ = call(conn, "GET", "/api/endpoints", key)
        assert status == 200, status
        took.append((time.time() - t) * 1000)
        time.sleep(0.02)
    took.sort()
    return took[len(took) // 2], took[int(len(took) * 0.99)], took[-1]


def one_run(binary, args):
    subprocess.run(["psql", "-q", f"{DB}/postgres", "-c", "DROP DATABASE IF EXISTS fair_reads",
                    "-c", "CREATE DATABASE fair_reads"], check=True, capture_output=True)
    server = subprocess.Popen([binary, "serve", "--database-url", f"{DB}/fair_reads",
                               "--listen", f"127.0.0.1:{PORT}", "--metrics-listen", "127.0.0.1:19555"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                if call(http.client.HTTPConnection("127.0.0.1", PORT), "GET", "/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", PORT)
        keys = []
        for name in ("flooder", "other"):
            _, body = call(conn, "POST", "/api/keys/generate",
                           body={"organization_name": name, "tier": "enterprise"})
            keys.append(json.loads(body)["api_key"])
        flooder, other = keys
        events = [{"type": "t", "payload": {"x": "y" * 200}} for _ in range(1000)]
        for _ in range(10):
            call(conn, "POST", "/api/events/batch", flooder, {"events": events})
        quiet = probe(other, 3)
        wrk = subprocess.Popen(["wrk", "-t2", f"-c{args.connections}", "-d15s", "-H",
                                f"X-API-Key: {flooder}",
                                f"http://127.0.0.1:{PORT}/api/inbox?limit={args.limit}"],
                               stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        flood = probe(other, 11)
        out = wrk.communicate()[0]
        pages = next(float(l.split()[1]) for l in out.splitlines() if l.startswith("Requests/sec"))
        return quiet, flood, pages
    finally:
        server.terminate()
        server.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-bin", required=True)
    p.add_argument("--against")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--connections", type=int, default=256)
    args = p.parse_args()
    binaries = [args.server_bin] + ([args.against] if args.against else [])
    runs = {b: [] for b in binaries}
    for _ in range(args.repeat):
        for b in binaries:
            quiet, flood, pages = one_run(os.path.abspath(b), args)
            runs[b].append((quiet, flood, pages))
            print(f"{b}: other's read alone p50 {quiet[0]:.1f} ms; during the flood p50 {flood[0]:.1f}"
                  f" p99 {flood[1]:.1f} max {flood[2]:.1f} ms; flooder {pages:.0f} pages/s", flush=True)
    for b in binaries:
        r = runs[b]
        print(f"{b}: median of {len(r)}: other's read p50 {statistics.median(x[1][0] for x in r):.1f} ms,"
              f" p99 {statistics.median(x[1][1] for x in r):.1f} ms; flooder"
              f" {statistics.median(x[2] for x in r):.0f} pages/s")


if __name__ == "__main__":
    sys.exit(main())
