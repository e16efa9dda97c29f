#!/usr/bin/env python3
"""The Triggers load-test harness: one entry point that sets everything up, runs a scenario and
prints one table.

    bash loadtest/run.sh SCENARIO [--duration 30s] [--rate N] [--connections N] [--cores N] [--smoke]

It starts (or reuses) the project's PostgreSQL, builds the release server and the load-test tools,
starts the server on a fresh database, creates many enterprise organizations (so no rate limit caps
a run), starts a fast webhook receiver when delivery is measured, warms every key, runs the
scenario, and prints: offered and achieved rate, latency p50/p90/p99/max, errors by status, server
CPU and RSS, and the share of the raw binary-COPY ceiling measured on the same machine in the same
run. Results are also written to loadtest/results/<time>-<scenario>.json.

Scenarios (see SCENARIOS below): ingest-1k, ingest-2.5k, ingest-10k (k6, fixed rates), latency-2.5k
(examples/openloop: a fixed rate measured from each request's due time, light enough for 2 cores),
ingest-max (wrk), ingest-batch (wrk) and ingest-batch-k6 (k6 at a fixed rate of batches; --batch-size
events a request, achieved = events committed/s), mixed, dedup (k6), delivery (k6 at a fixed rate: end-to-end lag), delivery-max (wrk:
deliveries/s while ingesting), delivery-drain (a restart with a backlog of due deliveries), rate-limited (a backlog
for endpoints with a rate limit, --rate-limit a second each: deliveries/s against the limits' sum,
and what each delivery costs while most of them wait; --nodes N: N nodes share the backlog and the
endpoints' buckets), hot-org and many-orgs (wrk), drill, ceiling (COPY only), footprint (binary size,
cold start, RSS idle and with 10k idle connections), cores (ingest-max per ingress core count),
disk (delivery-max, then bytes on disk per event and per attempt, and the steady-state bound for a
rate and a retention), sweep (open loop from 1,000/s doubling to saturation), connections (wrk at 8
to 1,024 connections), report (sweep, connections, ingest-max, ingest-batch, delivery and
delivery-max: everything the report draws), and all.

--report DIR writes DIR/index.html with SVG charts of whatever the run measured (loadtest/report.py).
"""

import argparse
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "loadtest")
RESULTS = os.path.join(HERE, "results")
SERVER = os.path.join(ROOT, "target", "release", "triggers")
RECEIVER = os.path.join(ROOT, "target", "release", "examples", "receiver")
CEILING = os.path.join(ROOT, "target", "release", "examples", "copy_ceiling")
OPENLOOP = os.path.join(ROOT, "target", "release", "examples", "openloop")
PORT, METRICS_PORT, RECEIVER_PORT = 18080, 19090, 19999
# Where the tools send their requests: the server the harness starts, or --url.
BASE = f"http://127.0.0.1:{PORT}"
# CPUs each part may run on (--server-cpus, --postgres-cpus, --load-cpus); None: anywhere.
PLACE = {"server": None, "postgres": None, "load": None}

# name: (tool, script, default rate, default connections, organizations, webhooks)
SCENARIOS = {
    "ingest-1k": ("k6", "ingest.js", 1000, None, "many", False),
    "ingest-2.5k": ("k6", "ingest.js", 2500, None, "many", False),
    "ingest-10k": ("k6", "ingest.js", 10000, None, "many", False),
    "ingest-max": ("wrk", "ingest.lua", None, 512, "many", False),
    "ingest-batch": ("wrk", "batch.lua", None, 64, "many", False),
    "ingest-batch-k6": ("k6", "batch.js", 200, None, "many", False),
    "latency-2.5k": ("openloop", None, 2500, 64, "many", False),
    "mixed": ("k6", "mixed.js", 1000, None, "many", False),
    "dedup": ("k6", "dedup.js", 1000, None, "many", False),
    "delivery": ("k6", "ingest.js", 1000, None, "many", True),
    "delivery-max": ("wrk", "ingest.lua", None, 256, "many", True),
    "delivery-drain": ("drain", None, None, None, "many", True),
    "fanout-max": ("wrk", "ingest.lua", None, 256, "many", "fanout"),
    "rate-limited": ("limited", None, None, None, "many", "limited"),
    "hot-org": ("wrk", "ingest.lua", None, 512, "one", False),
    "many-orgs": ("wrk", "ingest.lua", None, 512, "many", False),
    "drill": ("drill", "benchmark.yml", None, 32, "many", False),
}
SPECIAL = ["ceiling", "footprint", "cores", "disk", "sweep", "connections", "report"]
# What `report` measures: the open-loop sweep, throughput per connection count, CPU per event of
# single and batch ingest, and delivery (lag distribution, CPU per delivery).
REPORT = ["sweep", "connections", "ingest-max", "ingest-batch", "delivery", "delivery-max"]
ALL = ["ceiling"] + list(SCENARIOS) + ["footprint", "disk", "sweep", "connections"]


def log(msg):
    print(f"loadtest: {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def cpu_list(text):
    """'0-7,12' -> {0, 1, ..., 7, 12}."""
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def pinned(role):
    """A preexec_fn that keeps a child process on its part's CPUs (None when it is not placed)."""
    cpus = PLACE[role]
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def place_postgres():
    """Keep PostgreSQL on its CPUs: the postmaster and its processes now; backends it forks later
    inherit the postmaster's."""
    if PLACE["postgres"]:
        for pid in postgres_cpu_ticks() or {}:
            try:
                os.sched_setaffinity(pid, PLACE["postgres"])
            except OSError:
                pass  # a backend that has just exited


def load_threads():
    """wrk's threads: one per load CPU when the load is placed, else 2 (the 2-core box's choice)."""
    return len(PLACE["load"]) if PLACE["load"] else 2


def seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)?", text)
    if not m:
        raise SystemExit(f"bad duration {text!r}")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n / 1000 if unit == "ms" else n * 60 if unit == "m" else n


class Database:
    def __init__(self, name):
        out = subprocess.run(["bash", os.path.join(ROOT, "scripts/postgres.sh"), "db", name],
                             check=True, capture_output=True, text=True)
        self.url = out.stdout.strip()

    def sql(self, statement):
        return subprocess.run(["psql", self.url, "-qAtc", statement], check=True, capture_output=True,
                              text=True).stdout.strip()

    def has_endpoints(self):
        """Whether the schema is version 2's (endpoints, per-endpoint deliveries)."""
        return self.sql("SELECT to_regclass('endpoints') IS NOT NULL") == "t"

    def reset(self):
        """Every measured phase starts from the same state: no events, a fresh checkpoint."""
        tables = "events, delivery_attempts"
        if self.has_endpoints():
            tables += ", deliveries, delivery_batches"
        if self.sql("SELECT to_regclass('dedup_keys') IS NOT NULL") == "t":
            tables += ", dedup_keys"
        self.sql(f"TRUNCATE {tables}; CHECKPOINT")

    def bytes_of(self, table):
        """Table, indexes and TOAST of `table` and all its partitions (0 if it does not exist)."""
        return int(self.sql(f"SELECT CASE WHEN to_regclass('{table}') IS NULL THEN 0 ELSE "
                            f"(SELECT coalesce(sum(pg_total_relation_size(relid)), 0) "
                            f"FROM pg_partition_tree('{table}')) END"))


def postgres_cpu_ticks():
    """CPU ticks used so far by the project's PostgreSQL, by process: {pid: ticks}, with the
    postmaster's entry also holding the CPU of its children that have exited. None when it is not
    this machine's."""
    pid_file = os.environ.get("TRIGGERS_PG_PIDFILE", "/var/tmp/triggers-pg/data/postmaster.pid")
    try:
        master = int(open(pid_file).readline())
    except (OSError, ValueError):
        return None
    ticks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == master or int(fields[1]) == master:
            # utime + stime, and for the postmaster the CPU of children that have exited.
            ticks[int(entry)] = int(fields[11]) + int(fields[12])
            if int(entry) == master:
                ticks[int(entry)] += int(fields[13]) + int(fields[14])
    return ticks


# The server names its connections by the part they serve (application_name `triggers`,
# `triggers-ingest`, `triggers-delivery`, ...): PostgreSQL's CPU is split by them.
PG_PARTS = {"triggers-ingest": "ingest", "triggers-delivery": "delivery", "triggers": "api"}


def postgres_parts(db):
    """{pid: part} of the server's connections now (other backends are PostgreSQL's own)."""
    try:
        rows = db.sql("SELECT pid, application_name FROM pg_stat_activity WHERE pid <> pg_backend_pid()")
    except subprocess.CalledProcessError:
        return {}
    parts = {}
    for line in rows.splitlines():
        pid, _, name = line.partition("|")
        if name in PG_PARTS:
            parts[int(pid)] = PG_PARTS[name]
    return parts


class PgWaits:
    """What the server's PostgreSQL backends are doing while a phase runs (`--pg-waits`): one
    `psql` samples pg_stat_activity every 50 ms; the result is, per part of the server, how many of
    its backends were in each state on average (`idle`, `cpu`, or the wait event, such as
    `IO:WALSync` or `Client:ClientRead` for a backend waiting for the server mid-transaction).
    The sampling's own backend shows in PostgreSQL's `other` CPU."""

    QUERY = ("SELECT '#' UNION ALL SELECT application_name || '|' || CASE WHEN state = 'idle' THEN 'idle' "
             "WHEN wait_event IS NULL THEN 'cpu' ELSE wait_event_type || ':' || wait_event END "
             "FROM pg_stat_activity WHERE application_name LIKE 'triggers%' AND pid <> pg_backend_pid()")

    def __init__(self, db):
        self.samples, self.counts = 0, {}
        self.proc = subprocess.Popen(["psql", db.url, "-qAt"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, preexec_fn=pinned("load"))
        self.proc.stdin.write(self.QUERY + "\n\\watch 0.05\n")
        self.proc.stdin.flush()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for line in self.proc.stdout:
            line = line.strip()
            if line == "#":
                self.samples += 1
            elif "|" in line:
                name, _, state = line.partition("|")
                part = PG_PARTS.get(name, name)
                key = (part, state)
                self.counts[key] = self.counts.get(key, 0) + 1

    def finish(self):
        """{part: {state: backends on average}}, busiest state first."""
        self.proc.terminate()
        self.proc.wait()
        self.reader.join(2)
        out = {}
        for (part, state), n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            out.setdefault(part, {})[state] = round(n / max(self.samples, 1), 2)
        return {"samples": self.samples, "backends": out}


def supported_flags(binary):
    """The flags a server binary knows (an older build for --against may lack newer ones)."""
    out = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
    return set(re.findall(r"^  (--[a-z0-9-]+)", out, re.M))


# The harness creates hundreds of organizations from one address: lift the key-creation limits
# (on builds that have them) so set-up is never refused.
HARNESS_FLAGS = [("--key-ops-per-minute", "1000000"), ("--key-ops-per-minute-node", "1000000")]


class Server:
    def __init__(self, db, cores, extra=(), binary=SERVER, node=0):
        """`node` > 0: another node on the same database, on ports of its own (PORT + node)."""
        self.log_path = os.path.join(RESULTS, "server.log" if node == 0 else f"server-{node}.log")
        self.db = db
        self.metrics_port = METRICS_PORT + node
        known = supported_flags(binary)
        harness = [x for flag, value in HARNESS_FLAGS if flag in known for x in (flag, value)]
        args = [binary, "serve", "--database-url", db.url, "--listen", f"127.0.0.1:{PORT + node}",
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--log-format", "text",
                "--log", "warn", "--allow-private-webhooks", *harness, *extra]
        if cores:
            args += ["--ingress-cores", str(cores)]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     preexec_fn=pinned("server"))
        self.ready_s = wait_http(f"http://127.0.0.1:{PORT + node}/health", 60, self.proc) - self.started

    def cpu_s(self):
        return process_cpu_s(self.proc.pid)

    def rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def scrape(self):
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics").read().decode()

    def metric(self, name):
        for line in self.scrape().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def histogram(self, name, labels=""):
        """A histogram's cumulative bucket counts by upper bound (seconds; inf last), of the series
        whose labels start with `labels` (`method="POST",route="/api/events",`)."""
        buckets = []
        for line in self.scrape().splitlines():
            if line.startswith(name + "_bucket{" + labels):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
        return buckets

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Cluster:
    """Several nodes on one database, measured as one: their CPU, memory and counters summed (the
    per-thread figures are the first node's)."""

    def __init__(self, servers):
        self.servers = servers
        self.db, self.proc, self.started = servers[0].db, servers[0].proc, servers[0].started

    def cpu_s(self):
        return sum(s.cpu_s() for s in self.servers)

    def rss_mb(self):
        return sum(s.rss_mb() for s in self.servers)

    def metric(self, name):
        return sum(s.metric(name) for s in self.servers)

    def stop(self):
        for s in self.servers:
            s.stop()


def wait_http(url, limit, proc=None):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process exited ({proc.returncode}); see {RESULTS}/server.log")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return time.monotonic()
        except Exception:
            time.sleep(0.005)
    raise SystemExit(f"{url} did not answer within {limit}s")


def call(method, path, key=None, body=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = key
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{BASE}{path}", data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def create_orgs(n):
    def one(i):
        return call("POST", "/api/keys/generate", body={"organization_name": f"load-{i}", "tier": "enterprise"})["api_key"]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def process_cpu_s(pid):
    """User and system CPU seconds used so far by process `pid` (all its threads); 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_ticks(pid):
    """{thread id: (name, CPU ticks so far)} of every thread of process `pid`."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            head, _, tail = open(f"/proc/{pid}/task/{tid}/stat").read().rpartition(")")
        except OSError:
            continue
        fields = tail.split()
        out[tid] = (head.partition("(")[2], int(fields[11]) + int(fields[12]))
    return out


def threads_busy(before, after, seconds):
    """How busy the server's threads were, by kind (the name less its number: ingress-0 → ingress):
    {kind: {"threads": n, "busy_pct": sum over them, "max_pct": the busiest}}, 100 = one core."""
    tick = os.sysconf("SC_CLK_TCK")
    kinds = {}
    for tid, (name, ticks) in after.items():
        pct = 100 * (ticks - before.get(tid, (name, 0))[1]) / tick / max(seconds, 1e-9)
        k = kinds.setdefault(re.sub(r"-\d+$", "", name), {"threads": 0, "busy_pct": 0.0, "max_pct": 0.0})
        k["threads"] += 1
        k["busy_pct"] = round(k["busy_pct"] + pct, 1)
        k["max_pct"] = round(max(k["max_pct"], pct), 1)
    return kinds


def box_cpu_ticks():
    """(busy, idle) CPU ticks of the whole machine so far, from /proc/stat: busy is user, nice,
    system, irq, softirq and steal (guest time is already in user); idle is idle and iowait."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal, idle + iowait


class Sampler(threading.Thread):
    """Server CPU and peak RSS while a phase runs."""

    def __init__(self, server, receiver=None):
        super().__init__(daemon=True)
        self.server, self.stop_flag, self.peak_rss = server, threading.Event(), 0.0
        self.receiver = receiver
        self.receiver0 = process_cpu_s(receiver.pid) if receiver else 0.0
        self.cpu0, self.t0 = server.cpu_s(), time.monotonic()
        self.threads0 = thread_ticks(server.proc.pid)
        self.pg0 = postgres_cpu_ticks()
        self.box0 = box_cpu_ticks()

    def run(self):
        while not self.stop_flag.wait(0.25):
            self.peak_rss = max(self.peak_rss, self.server.rss_mb())

    def finish(self):
        self.stop_flag.set()
        self.join()
        self.peak_rss = max(self.peak_rss, self.server.rss_mb())
        pg1 = postgres_cpu_ticks()
        box1 = box_cpu_ticks()
        self.server_cpu_s = self.server.cpu_s() - self.cpu0
        self.threads = threads_busy(self.threads0, thread_ticks(self.server.proc.pid), time.monotonic() - self.t0)
        self.receiver_cpu_s = process_cpu_s(self.receiver.pid) - self.receiver0 if self.receiver else None
        tick = os.sysconf("SC_CLK_TCK")
        self.box_cpu_s = (box1[0] - self.box0[0]) / tick
        box_idle_s = (box1[1] - self.box0[1]) / tick
        self.box_busy_pct = 100 * self.box_cpu_s / max(self.box_cpu_s + box_idle_s, 1e-9)
        self.pg_cpu_s, self.pg_parts_s = None, {}
        if pg1 is not None and self.pg0 is not None:
            self.pg_cpu_s = (sum(pg1.values()) - sum(self.pg0.values())) / tick
            # By the part each backend serves; what is left (PostgreSQL's own processes, and
            # backends that ended during the phase) is "other".
            for pid, part in postgres_parts(self.server.db).items():
                if pid in pg1:
                    used = (pg1[pid] - self.pg0.get(pid, 0)) / tick
                    self.pg_parts_s[part] = self.pg_parts_s.get(part, 0.0) + used
            self.pg_parts_s["other"] = self.pg_cpu_s - sum(self.pg_parts_s.values())
        return 100 * self.server_cpu_s / (time.monotonic() - self.t0), self.peak_rss

    def per_event_us(self, events):
        """CPU per event, in microseconds: the server's, PostgreSQL's, the receiver's (when one
        runs), the whole box's and what of it is none of these."""
        if events <= 0:
            return {}
        out = {"server_us_per_event": round(1e6 * self.server_cpu_s / events, 1)}
        if self.pg_cpu_s is not None:
            out["pg_us_per_event"] = round(1e6 * self.pg_cpu_s / events, 1)
            out["pg_us_per_event_by_part"] = {part: round(1e6 * used / events, 1)
                                              for part, used in sorted(self.pg_parts_s.items())}
        # The whole machine: the server, PostgreSQL, and what else ran (the load generator, the
        # webhook receiver, the kernel's own threads), with how busy the CPUs were.
        out["box_us_per_event"] = round(1e6 * self.box_cpu_s / events, 1)
        if self.receiver_cpu_s is not None:
            out["receiver_us_per_event"] = round(1e6 * self.receiver_cpu_s / events, 1)
        out["rest_us_per_event"] = round(1e6 * (self.box_cpu_s - self.server_cpu_s - (self.pg_cpu_s or 0)
                                                - (self.receiver_cpu_s or 0)) / events, 1)
        out["box_busy_pct"] = round(self.box_busy_pct, 1)
        out["server_threads"] = self.threads
        return out


# A backlog of due deliveries as a crash would leave it: committed events of organizations with a
# webhook, ~200-byte payloads like ingest.lua's, spread over every such organization. Version 2's
# schema keeps each (event, endpoint) delivery due in its own row.
PAYLOAD_SQL = """json_build_object('order_id', 'ord_' || lpad(g::text, 8, '0'), 'customer', 'cus_4f9a8b7c',
                         'amount', g % 10000, 'currency', 'usd',
                         'items', json_build_array(json_build_object('sku', 'sku_1234', 'qty', 2),
                                                   json_build_object('sku', 'sku_5678', 'qty', 1)),
                         'note', 'load test event')"""
DRAIN_SQL_V2 = """
WITH o AS (SELECT org_id AS id, array_agg(id) AS eps, row_number() OVER (ORDER BY org_id) - 1 AS i,
                  count(*) OVER () AS k
           FROM endpoints WHERE status = 0 GROUP BY org_id),
ev AS (INSERT INTO events (id, org_id, type, payload, status, endpoints, created_at)
       -- UUIDv7-shaped ids of now (time in the first 48 bits): today's partition takes them.
       SELECT (lpad(to_hex((extract(epoch FROM now()) * 1000)::bigint), 12, '0')
               || substr(replace(gen_random_uuid()::text, '-', ''), 13))::uuid,
              o.id, 'order.created', """ + PAYLOAD_SQL + """, 3, o.eps, now()
       FROM generate_series(0, {n} - 1) g JOIN o ON o.i = g % o.k
       RETURNING id, org_id, endpoints)
INSERT INTO deliveries (event_id, endpoint_id, org_id, next_attempt_at)
SELECT ev.id, ep, ev.org_id, now() FROM ev, unnest(ev.endpoints) AS ep
"""
DRAIN_SQL = """
INSERT INTO events (id, org_id, type, payload, created_at, next_attempt_at)
SELECT gen_random_uuid(), o.id, 'order.created',
       json_build_object('order_id', 'ord_' || lpad(g::text, 8, '0'), 'customer', 'cus_4f9a8b7c',
                         'amount', g % 10000, 'currency', 'usd',
                         'items', json_build_array(json_build_object('sku', 'sku_1234', 'qty', 2),
                                                   json_build_object('sku', 'sku_5678', 'qty', 1)),
                         'note', 'load test event'),
       now(), now()
FROM generate_series(0, {n} - 1) g
JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS i, count(*) OVER () AS k
      FROM organizations WHERE webhook_url IS NOT NULL) o ON o.i = g % o.k
"""


def run_drain(db, args, server_args, binary, receiver, backlog):
    """Stops the server, leaves `backlog` due deliveries in the database, starts the server again
    and times it from start until every one is delivered: the delivery pool's rate on its own
    (claim with SKIP LOCKED, POST, record), with no ingest competing for the cores."""
    db.reset()
    if db.has_endpoints():
        db.sql(DRAIN_SQL_V2.format(n=backlog))
        db.sql("VACUUM ANALYZE events, deliveries")
    else:
        db.sql(DRAIN_SQL.format(n=backlog))
        db.sql("VACUUM ANALYZE events")
    db.sql("CHECKPOINT")
    receiver.send_signal(signal.SIGUSR1)
    time.sleep(0.2)
    server = Server(db, args.cores, extra=server_args, binary=binary)
    sampler = Sampler(server, receiver)
    sampler.start()
    delivered = "triggers_deliveries_total{outcome=\"delivered\"}"
    deadline = server.started + max(60.0, backlog / 1000)
    done = 0.0
    while time.monotonic() < deadline:
        done = server.metric(delivered)
        if done >= backlog:
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - server.started
    cpu, rss = sampler.finish()
    statuses = {"delivered": int(done)}
    per_delivery = sampler.per_event_us(done)
    retried = int(server.metric("triggers_deliveries_total{outcome=\"retry\"}"))
    if retried:
        statuses["retry"] = retried
    if done < backlog:
        statuses["undelivered"] = backlog - int(done)
    r = dict(achieved=done / elapsed, p50=None, p90=None, p99=None, max=None, statuses=statuses,
             committed_per_s=0.0, cpu_pct=cpu, rss_mb=rss, deliveries_per_s=done / elapsed, backlog=backlog,
             drain_s=elapsed, cpu_per_delivery=per_delivery)
    return r, server


def transactions(db):
    """Transactions committed or rolled back in the database so far (every statement the server
    sends outside a transaction of its own counts as one)."""
    return int(db.sql("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"))


def run_limited(db, args, server_args, binary, receiver, keys, duration):
    """Every organization's one endpoint has a limit of `--rate-limit` deliveries a second, and a
    backlog larger than it can take during the run: after a start and the buckets' first second,
    deliveries/s should be the limits' sum, and a delivery that waits for its turn should cost
    about what any other one does (the transactions per delivery show the database's share)."""
    limit = args.rate_limit
    db.reset()
    # Earlier runs on this database left their organizations' endpoints: paused, so the backlog
    # is spread over this run's only.
    prefixes = ", ".join(f"'{k[:25]}'" for k in keys)
    db.sql(f"UPDATE endpoints SET status = 1 WHERE org_id NOT IN "
           f"(SELECT id FROM organizations WHERE key_prefix IN ({prefixes}))")
    n_orgs = int(db.sql("SELECT count(*) FROM endpoints WHERE status = 0"))
    backlog = int(n_orgs * limit * (duration + 5) * 1.5)
    db.sql(DRAIN_SQL_V2.format(n=backlog))
    db.sql("VACUUM ANALYZE events, deliveries")
    db.sql("CHECKPOINT")
    # With --nodes, as many nodes share the backlog and every endpoint's one bucket
    # (`endpoint_budgets`): together they should keep each limit as one node does.
    server = Server(db, args.cores, extra=server_args, binary=binary)
    if args.nodes > 1:
        server = Cluster([server] + [Server(db, args.cores, extra=server_args, binary=binary, node=i)
                                     for i in range(1, args.nodes)])
    delivered = "triggers_deliveries_total{outcome=\"delivered\"}"
    # The buckets start full (a second's worth): measured after that burst.
    time.sleep(min(3.0, duration))
    waits = "triggers_delivery_waits_total{reason=\"rate_limited\"}"
    done0, xacts0, waits0 = server.metric(delivered), transactions(db), server.metric(waits)
    nodes = getattr(server, "servers", [server])
    by_node0 = [s.metric(delivered) for s in nodes]
    since = db.sql("SELECT now()")
    receiver.send_signal(signal.SIGUSR1)
    sampler = Sampler(server, receiver)
    sampler.start()
    started = time.monotonic()
    time.sleep(duration)
    elapsed = time.monotonic() - started
    done, xacts = server.metric(delivered) - done0, transactions(db) - xacts0
    waited = server.metric(waits) - waits0
    by_node = [s.metric(delivered) - d0 for s, d0 in zip(nodes, by_node0)]
    cpu, rss = sampler.finish()
    # The limit kept: the busiest endpoint's attempts in the window (its bucket holds at most
    # one second's worth, so up to one limit more than the rate times the window).
    busiest = int(db.sql(f"SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM delivery_attempts "
                         f"WHERE at >= '{since}' AND at < '{since}'::timestamptz + interval '{elapsed} s' "
                         f"GROUP BY endpoint_id) c"))
    # The start kept it too: each endpoint's attempts before the window, against what its bucket
    # allows from its first attempt on (a second's worth, and the rate since); the busiest.
    start = float(db.sql(f"SELECT coalesce(max(n / ({limit} * (1 + extract(epoch FROM '{since}'::timestamptz - first)))), 0) "
                         f"FROM (SELECT count(*) AS n, min(at) AS first FROM delivery_attempts "
                         f"WHERE at < '{since}' GROUP BY endpoint_id) c"))
    statuses = {"delivered": int(done)}
    failed = int(server.metric("triggers_deliveries_total{outcome=\"retry\"}"))
    if failed:
        statuses["retry"] = failed
    r = dict(achieved=done / elapsed, p50=None, p90=None, p99=None, max=None, statuses=statuses,
             committed_per_s=0.0, cpu_pct=cpu, rss_mb=rss, deliveries_per_s=done / elapsed, backlog=backlog,
             offered=f"{n_orgs}x{limit}/s" + (f" {args.nodes} nodes" if args.nodes > 1 else ""),
             limits_per_s=n_orgs * limit, limit=limit, nodes=args.nodes,
             transactions_per_delivery=round(xacts / max(done, 1), 2), cpu_per_delivery=sampler.per_event_us(done),
             waits_per_delivery=round(waited / max(done, 1), 2),
             busiest_node_pct=round(100 * max(by_node) / max(done, 1), 1),
             busiest_endpoint_per_s=round(busiest / elapsed, 1),
             start_busiest_pct=round(100 * start, 1))
    return r, server


def run_tool(tool, script, rate, conns, duration, keys_file, keys, args):
    """Run a scenario's load tool against BASE; its rate, latency percentiles and statuses."""
    if tool == "k6":
        return run_k6(script, rate, duration, keys_file, args.batch_size)
    if tool == "wrk":
        return run_wrk(script, conns, duration, keys_file, args.batch_size)
    if tool == "openloop":
        return run_openloop(rate, conns, duration, keys_file)
    return run_drill(400 if args.smoke else 20000, conns, keys)


def run_k6(script, rate, duration, keys_file, batch_size=100):
    summary = os.path.join(RESULTS, "k6-summary.json")
    env = dict(os.environ, K6_NO_USAGE_REPORT="true", BATCH_SIZE=str(batch_size))
    # The scripts' own thresholds make a hand-run `k6 run` fail on errors or a blown p99; here the
    # harness reports statuses and percentiles itself, so a run is never cut short by them.
    cmd = ["k6", "run", "-q", "--no-thresholds", "--summary-export", summary, "-e", f"RATE={rate}",
           "-e", f"DURATION={duration}s", "-e", f"BASE={BASE}", "-e", f"KEYS_FILE={keys_file}",
           os.path.join(HERE, script)]
    subprocess.run(cmd, cwd=HERE, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   preexec_fn=pinned("load"))
    m = json.load(open(summary))["metrics"]
    d = m["http_req_duration"]
    statuses = {k[len("status_"):]: int(v["count"]) for k, v in m.items() if k.startswith("status_") and v.get("count")}
    item_errors = int(m.get("batch_item_errors", {}).get("count", 0))
    if item_errors:
        statuses["item_errors"] = item_errors
    dropped = int(m.get("dropped_iterations", {}).get("count", 0))
    if dropped:
        statuses["dropped"] = dropped
    return {"achieved": m["http_reqs"]["rate"], "p50": d["med"], "p90": d["p(90)"], "p99": d["p(99)"],
            "max": d["max"], "statuses": statuses}


def run_wrk(script, connections, duration, keys_file, batch_size=100):
    env = dict(os.environ, KEYS_FILE=keys_file, BATCH_SIZE=str(batch_size))
    out = subprocess.run(["wrk", f"-t{load_threads()}", f"-c{connections}", f"-d{duration}s", "-s",
                          os.path.join(HERE, script), BASE], env=env, check=True, capture_output=True, text=True,
                         preexec_fn=pinned("load")).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = re.search(r"latency p50 ([\d.]+) ms, p90 ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    statuses = {"2xx": total - (int(bad.group(1)) if bad else 0)}
    if bad:
        statuses["non-2xx"] = int(bad.group(1))
    if errs and sum(map(int, errs.groups())):
        statuses["socket"] = sum(map(int, errs.groups()))
    return {"achieved": rate, "p50": float(lat.group(1)), "p90": float(lat.group(2)), "p99": float(lat.group(3)),
            "max": float(lat.group(4)), "statuses": statuses}


def run_openloop(rate, connections, duration, keys_file):
    out = os.path.join(RESULTS, "openloop.json")
    subprocess.run([OPENLOOP, f"{BASE}/api/events", str(rate), str(duration), str(connections),
                    keys_file, out], check=True, capture_output=True, preexec_fn=pinned("load"))
    r = json.load(open(out))
    statuses = dict(r["statuses"])
    if r["errors"]:
        statuses["errors"] = r["errors"]
    out = {"achieved": r["achieved"], "p50": r["p50"], "p90": r["p90"], "p99": r["p99"], "max": r["max"],
           "statuses": statuses}
    if "worst_ms_by_second" in r:
        # Where in the run the slow requests were: a stall shows as one bad second.
        out["worst_ms_by_second"] = r["worst_ms_by_second"][:-1]
    return out


def run_drill(iterations, concurrency, keys):
    plan = open(os.path.join(HERE, "benchmark.yml")).read()
    plan = plan.replace("base: 'http://127.0.0.1:8080'", f"base: '{BASE}'")
    plan = re.sub(r"(?m)^iterations: \d+", f"iterations: {iterations}", plan)
    plan = re.sub(r"(?m)^concurrency: \d+", f"concurrency: {concurrency}", plan)
    open(os.path.join(RESULTS, "benchmark.yml"), "w").write(plan)
    with open(os.path.join(RESULTS, "drill-keys.csv"), "w") as f:
        f.write("key\n" + "\n".join(keys) + "\n")
    started = time.monotonic()
    out = subprocess.run(["drill", "--benchmark", "benchmark.yml", "--stats", "--quiet", "--nanosec"],
                         cwd=RESULTS, check=True, capture_output=True, text=True).stdout
    elapsed = time.monotonic() - started
    # drill prints per-step and total stats; take the total block.
    total = out[out.rfind("Time taken for tests"):] if "Time taken for tests" in out else out
    def num(label):
        m = re.search(label + r"\s+([\d.]+)", total)
        return float(m.group(1)) if m else 0.0
    reqs = num("Total requests")
    ok = num("Successful requests")
    return {"achieved": num("Requests per second") or reqs / elapsed, "p50": num("Median time per request") / 1e6,
            "p90": None, "p99": num(r"99\.0'th percentile") / 1e6, "max": num("Max time per request") / 1e6,
            "statuses": {"ok": int(ok), "failed": int(reqs - ok)}}


def measure_ceiling(db, rows):
    env = dict(os.environ, DATABASE_URL=db.url)
    # The ceiling stands in for the server's writers: it runs on the server's CPUs.
    out = subprocess.run([CEILING, str(rows), "5000", "2"], env=env, check=True, capture_output=True, text=True,
                         preexec_fn=pinned("server")).stdout
    db.reset()
    return json.loads(out.strip().splitlines()[-1])["rows_per_s"]


def footprint(db, args):
    """Binary size, cold start to ready, RSS idle and with 10k idle connections."""
    server = Server(db, args.cores, binary=args.server_bin)
    idle = server.rss_mb()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    want = 1000 if args.smoke else 10000
    socks = []
    for _ in range(want):
        try:
            socks.append(socket.create_connection(("127.0.0.1", PORT)))
        except OSError:
            break
    time.sleep(1.0)
    held = server.rss_mb()
    for s in socks:
        s.close()
    server.stop()
    return {"binary_mb": os.path.getsize(args.server_bin) / 1e6, "cold_start_ms": server.ready_s * 1000,
            "rss_idle_mb": idle, "idle_connections": len(socks), "rss_with_idle_connections_mb": held}


def disk(db, args, ceiling):
    """Disk per event: delivery-max (every event delivered once, one attempt row each), then the
    bytes of each table with its indexes, after VACUUM, divided by the rows; and the steady-state
    bound that gives for a rate and --retention-days."""
    r = scenario("delivery-max", db, args, ceiling, args.server_bin)
    db.sql("VACUUM ANALYZE")
    events = int(db.sql("SELECT count(*) FROM events"))
    attempts = int(db.sql("SELECT count(*) FROM delivery_attempts"))
    payload = float(db.sql("SELECT coalesce(avg(octet_length(payload::text)), 0) FROM events"))
    sizes = {t: db.bytes_of(t) for t in ("events", "delivery_attempts", "deliveries", "delivery_batches", "dedup_keys")}
    per_event = sum(sizes.values()) / max(events, 1)
    days = 30
    out = {"events": events, "attempts": attempts, "payload_bytes": round(payload, 1),
           "events_bytes_per_event": round(sizes["events"] / max(events, 1), 1),
           "attempt_bytes_per_attempt": round(sizes["delivery_attempts"] / max(attempts, 1), 1),
           "all_bytes_per_delivered_event": round(per_event, 1),
           # A day is dropped within a day of expiring, and a week of empty partitions waits ahead.
           f"bound_gb_at_1000_per_s_{days}_days": round(per_event * 1000 * 86400 * (days + 1) / 1e9, 1)}
    r.update(scenario="disk", disk=out)
    return r, "disk: " + ", ".join(f"{k} {v}" for k, v in out.items())


def scenario(name, db, args, ceiling, binary=SERVER, plan=None):
    """Sets up `name` (a fresh database, the server, organizations, webhooks, a warm-up) and measures
    it once; or, with `plan`, once per step: plan(rows so far) gives the next (rate, connections), or
    None when the series is done, and the rows come back as a list."""
    tool, script, rate, conns, orgs, hooks = SCENARIOS[name]
    rate = args.rate or rate
    conns = args.connections or conns
    duration = args.duration
    if args.smoke:
        rate, conns, duration = (min(rate, 200) if rate else None), (min(conns, 16) if conns else None), min(duration, 3)
    db.reset()
    receiver = None
    if hooks:
        receiver = subprocess.Popen([RECEIVER, f"127.0.0.1:{RECEIVER_PORT}", os.path.join(RESULTS, "receiver.json")],
                                    stderr=subprocess.DEVNULL, preexec_fn=pinned("load"))
    server_args = args.server_args.split() if args.server_args else ()
    server = Server(db, args.cores, extra=server_args, binary=binary)
    try:
        n_orgs = 1 if orgs == "one" else (20 if args.smoke else args.orgs)
        keys = create_orgs(n_orgs)
        if orgs == "one":
            # One organization past any tier: the limit is the organization row's, tunable by operators.
            db.sql(f"UPDATE organizations SET rate_limit_per_minute = 1000000000 WHERE key_prefix = '{keys[0][:25]}'")
            server.stop()
            server = Server(db, args.cores, extra=server_args, binary=binary)
        keys_file = os.path.join(RESULTS, "keys.txt")
        open(keys_file, "w").write("\n".join(keys) + "\n")
        if hooks:
            wait_http(f"http://127.0.0.1:{RECEIVER_PORT}/", 10, receiver)
            for k in keys:
                if hooks == "limited":
                    call("POST", "/api/endpoints", k, {"url": f"http://127.0.0.1:{RECEIVER_PORT}/hook",
                                                      "rate_limit_per_second": args.rate_limit})
                elif hooks == "fanout":
                    # Three endpoints; every order.created event matches two of them.
                    for path, types in (("a", ["order.*"]), ("b", None), ("c", ["invoice.*"])):
                        call("POST", "/api/endpoints", k,
                             {"url": f"http://127.0.0.1:{RECEIVER_PORT}/hook/{path}", "event_types": types})
                else:
                    call("POST", "/api/webhook/config", k, {"webhook_url": f"http://127.0.0.1:{RECEIVER_PORT}/hook"})
        # Warm up: every key verified on every core, connections and caches established.
        subprocess.run(["wrk", f"-t{load_threads()}", "-c16", "-d2s", "-s", os.path.join(HERE, "ingest.lua"),
                        f"http://127.0.0.1:{PORT}"], env=dict(os.environ, KEYS_FILE=keys_file), check=True,
                       capture_output=True, preexec_fn=pinned("load"))
        db.sql("CHECKPOINT")
        if receiver:
            time.sleep(1.0)
            receiver.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
        if tool == "drain":
            server.stop()
            r, server = run_drain(db, args, server_args, binary, receiver, 2_000 if args.smoke else 200_000)
            r.update(scenario=name, tool=tool, offered=f"{r['backlog']:,} due", duration_s=round(r["drain_s"], 2))
            return r
        if tool == "limited":
            server.stop()
            r, server = run_limited(db, args, server_args, binary, receiver, keys, duration)
            r.update(scenario=name, tool="drain", duration_s=duration)
            return r
        if plan is None:
            return measure(name, tool, script, rate, conns, duration, server, receiver, keys_file, keys, args,
                           ceiling)
        steps = []
        while (step := plan(steps)) is not None:
            step_rate, step_conns = step
            log(f"  {name}: " + (f"{step_rate:,}/s offered" if step_rate else f"{step_conns} connections"))
            if receiver:
                receiver.send_signal(signal.SIGUSR1)
            steps.append(measure(name, tool, script, step_rate, step_conns, duration, server, receiver,
                                 keys_file, keys, args, ceiling))
        return steps
    finally:
        server.stop()
        if receiver:
            receiver.terminate()


def quantile_ms(before, after, q):
    """The q-quantile, in ms, of what a cumulative histogram counted between two reads, interpolated
    within its bucket as Prometheus' histogram_quantile does (None when it counted nothing)."""
    counts = [(le, b - a) for (le, b), (_, a) in zip(after, before)] if before else after
    total = counts[-1][1] if counts else 0
    if total <= 0:
        return None
    rank, low, below = q * total, 0.0, 0.0
    for le, n in counts:
        if n >= rank:
            if le == float("inf"):
                return low * 1000
            return (low + (le - low) * (rank - below) / max(n - below, 1e-9)) * 1000
        low, below = le, n
    return low * 1000


# The group commit's histograms the harness reports: each transaction's time, and how long its
# oldest event waited for it to begin.
WRITE_HISTOGRAMS = {"commit": ("triggers_write_commit_duration_seconds", ""),
                    "wait": ("triggers_write_wait_seconds", ""),
                    # The server's own time for POST /api/events: from its first bytes read to its
                    # answer written (what the client's p99 has beyond it is the kernel's, the
                    # scheduler's and the generator's).
                    "served": ("triggers_http_request_duration_seconds",
                               'method="POST",route="/api/events",')}


def measure(name, tool, script, rate, conns, duration, server, receiver, keys_file, keys, args, ceiling):
    """One measured phase on a server that is set up and warm: the tool's figures, events committed,
    CPU per event (server and PostgreSQL), and deliveries and lag when a receiver runs."""
    committed0 = server.metric("triggers_events_committed_total")
    commits0 = server.metric("triggers_write_batches_total")
    writes0 = {k: server.histogram(*h) for k, h in WRITE_HISTOGRAMS.items()}
    sampler = Sampler(server, receiver)
    sampler.start()
    waits = PgWaits(server.db) if args.pg_waits else None
    perf = None
    if args.perf:
        # cpu-clock sampling works where hardware counters don't (VMs).
        perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(server.proc.pid),
                                 "-o", args.perf, "--", "sleep", str(duration)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    r = run_tool(tool, script, rate, conns, duration, keys_file, keys, args)
    elapsed = time.monotonic() - started
    if perf:
        perf.wait()
    cpu, rss = sampler.finish()
    if waits:
        r["pg_waits"] = waits.finish()
    committed = server.metric("triggers_events_committed_total") - committed0
    r["committed_per_s"] = committed / elapsed
    commits = server.metric("triggers_write_batches_total") - commits0
    if commits > 0:
        # Group-commit transactions: how many, and how full (what PostgreSQL's cost per event follows).
        r["commits_per_s"] = round(commits / elapsed)
        r["events_per_commit"] = round(committed / commits, 1)
        for k, h in WRITE_HISTOGRAMS.items():
            after = server.histogram(*h)
            for q in (0.5, 0.99):
                v = quantile_ms(writes0[k], after, q)
                if v is not None:
                    r[f"{k}_p{round(q * 100)}_ms"] = round(v, 2)
    if name.startswith("ingest-batch"):
        # Requests are batches: the rate that counts is events committed.
        r["requests_per_s"] = r["achieved"]
        r["achieved"] = r["committed_per_s"]
        r["batch_size"] = args.batch_size
    r["cpu_per_event"] = sampler.per_event_us(committed)
    r.update(scenario=name, tool=tool, offered=rate if rate else f"max/{conns}c", cpu_pct=cpu, rss_mb=rss,
             duration_s=duration)
    if ceiling:
        r["ceiling_share"] = r["committed_per_s"] / ceiling
    if receiver:
        time.sleep(1.5)
        stats = json.load(open(os.path.join(RESULTS, "receiver.json")))
        r["deliveries_per_s"] = stats["deliveries"] / max(elapsed, 0.001)
        r["lag_ms"] = stats["lag_ms"]
        r["cpu_per_delivery"] = sampler.per_event_us(stats["deliveries"])
        if "lag_cdf" in stats:
            r["lag_cdf"] = stats["lag_cdf"]
    return r


def sweep(db, args, ceiling):
    """Open loop from 1,000 events/s up, doubling (then by half steps), until the server no longer
    keeps up: achieved below 90 % of offered, errors, or p99 above a second. Latency counts from each
    request's due time, so a stall is measured, not hidden. One server and one set of organizations
    for every step."""
    rows = scenario("latency-2.5k", db, args, ceiling, args.server_bin, sweep_plan(args))
    for r in rows:
        r.update(scenario=f"sweep {r['offered']:,}/s", sweep=True)
    return rows


def sweep_plan(args):
    """The sweep's steps: the next (rate, connections) after the rows so far, or None once the
    server fell behind (or the rates ran out)."""
    rates = [100, 200] if args.smoke else [1000, 2000, 4000, 8000, 12000, 16000, 24000, 32000, 48000, 64000,
                                           96000, 128000]

    def plan(done):
        if len(done) == len(rates):
            return None
        if done:
            last = done[-1]
            bad = sum(v for k, v in last["statuses"].items() if not k.startswith("2"))
            if last["achieved"] < 0.9 * last["offered"] or bad or last["p99"] > 1000:
                return None
        return rates[len(done)], args.connections or 64
    return plan


def remote_sweep(args, keys_file):
    """The open-loop sweep against a server the harness did not start (--url): latency against
    offered rate as the client sees it."""
    keys = [k for k in open(keys_file).read().split() if len(k) == 64]
    plan, rows = sweep_plan(args), []
    duration = min(args.duration, 3) if args.smoke else args.duration
    while (step := plan(rows)) is not None:
        log(f"  sweep against {BASE}: {step[0]:,}/s offered")
        r = run_tool("openloop", None, step[0], step[1], duration, keys_file, keys, args)
        r.update(scenario=f"sweep {step[0]:,}/s", tool="openloop", offered=step[0], cpu_pct=0.0, rss_mb=0.0,
                 duration_s=duration, url=BASE, sweep=True)
        rows.append(r)
    return rows


def connections(db, args, ceiling):
    """Closed loop (wrk, single events) at 8 to 1,024 connections: throughput and latency as the
    number of clients grows."""
    counts = [4, 16] if args.smoke else [8, 32, 128, 512, 1024]
    # Each step's connections are the plan's (smoke's cap of 16 applies only to a single run).
    rows = scenario("ingest-max", db, args, ceiling, args.server_bin,
                    lambda done: (None, counts[len(done)]) if len(done) < len(counts) else None)
    for r, c in zip(rows, counts):
        r.update(scenario=f"wrk c{c}", connections=c, connections_sweep=True)
    return rows


def remote(name, args, keys_file):
    """A scenario against a server the harness did not start (--url): only what the client sees
    (rate, latency, statuses); the server's CPU and the database are not this machine's to read."""
    if name not in SCENARIOS:
        raise SystemExit(f"{name} needs the server on this machine; with --url run one of: "
                         + ", ".join(n for n, v in SCENARIOS.items() if not v[5] and v[4] == "many"))
    tool, script, rate, conns, orgs, hooks = SCENARIOS[name]
    if hooks or orgs != "many":
        raise SystemExit(f"{name} needs the server on this machine (webhooks to a local receiver, or "
                         "an organization's limit raised in SQL); not with --url")
    rate = args.rate or rate
    conns = args.connections or conns
    duration = args.duration
    if args.smoke:
        rate, conns, duration = (min(rate, 200) if rate else None), (min(conns, 16) if conns else None), min(duration, 3)
    keys = [k for k in open(keys_file).read().split() if len(k) == 64]
    if not keys:
        raise SystemExit(f"{keys_file} holds no API keys (one per line; loadtest/orgs.sh writes them)")
    log(f"running {name} against {BASE} with {len(keys)} keys")
    r = run_tool(tool, script, rate, conns, duration, keys_file, keys, args)
    r.update(scenario=name, tool=tool, offered=rate if rate else f"max/{conns}c", cpu_pct=0.0, rss_mb=0.0,
             duration_s=duration, url=BASE)
    return r


def compare(name, db, args, ceiling):
    """The same scenario with two binaries, alternating A B A B ..., medians of each."""
    runs = {"A": [], "B": []}
    # Each binary on its own database: two versions may not share a schema.
    other = Database("triggers_loadtest_b")
    Server(other, 1, binary=args.against).stop()
    dbs = {"A": db, "B": other}
    for i in range(args.repeat):
        for label, binary in (("A", args.server_bin), ("B", args.against)):
            log(f"running {name} with {label} ({os.path.relpath(binary, ROOT)}), run {i + 1}/{args.repeat}")
            runs[label].append(scenario(name, dbs[label], args, ceiling, binary))
    rows = []
    for label, binary in (("A", args.server_bin), ("B", args.against)):
        ordered = sorted(runs[label], key=lambda r: r["achieved"])
        median = dict(ordered[len(ordered) // 2])
        median["scenario"] = f"{name}:{label}"
        median["runs"] = [round(r["achieved"]) for r in runs[label]]
        rows.append(median)
    a, b = rows[0]["achieved"], rows[1]["achieved"]
    log(f"A {os.path.relpath(args.server_bin, ROOT)}: {rows[0]['runs']} median {a:,.0f}/s")
    log(f"B {os.path.relpath(args.against, ROOT)}: {rows[1]['runs']} median {b:,.0f}/s")
    log(f"B/A = {b / a:.3f} ({(b / a - 1) * 100:+.1f}%)")
    # Latency and CPU per event, each as its own median over the runs (the row shown is the
    # run of median throughput; at a fixed rate every run achieves the same, so these decide).
    # (A drain has no events ingested: its CPU is per delivery. Scenarios without delivery have no
    # lag and skip those lines.)
    cpu = lambda r: r.get("cpu_per_event") or r.get("cpu_per_delivery") or {}
    part = lambda r, p: (cpu(r).get("pg_us_per_event_by_part") or {}).get(p)
    figures = (("p50", "p50 ms", lambda r: r.get("p50")), ("p99", "p99 ms", lambda r: r.get("p99")),
               ("server_us", "server CPU us/event", lambda r: cpu(r).get("server_us_per_event")),
               ("pg_us", "PostgreSQL CPU us/event", lambda r: cpu(r).get("pg_us_per_event")),
               ("pg_ingest_us", "  of which ingest", lambda r: part(r, "ingest")),
               ("box_us", "box CPU us/event (all processes)", lambda r: cpu(r).get("box_us_per_event")),
               ("receiver_us", "  of which the webhook receiver", lambda r: cpu(r).get("receiver_us_per_event")),
               ("pg_delivery_us", "  of which delivery", lambda r: part(r, "delivery")),
               ("xacts", "database transactions a delivery", lambda r: r.get("transactions_per_delivery")),
               ("waits", "waits for a turn a delivery", lambda r: r.get("waits_per_delivery")),
               ("busiest_node", "the busiest node's share of the deliveries, %", lambda r: r.get("busiest_node_pct")),
               ("deliveries", "deliveries/s", lambda r: r.get("deliveries_per_s") and round(r["deliveries_per_s"])),
               ("start_busiest", "start: busiest endpoint, % of what its bucket allows",
                lambda r: r.get("start_busiest_pct")),
               ("lag_p50", "delivery lag p50 ms", lambda r: (r.get("lag_ms") or {}).get("p50")),
               ("lag_p99", "delivery lag p99 ms", lambda r: (r.get("lag_ms") or {}).get("p99")))
    for key, what, get in figures:
        per = {label: [get(r) for r in runs[label]] for label in runs}
        if any(v is None for vs in per.values() for v in vs):
            continue
        med = {label: statistics.median(vs) for label, vs in per.items()}
        for row, label in zip(rows, ("A", "B")):
            row[f"{key}_runs"] = per[label]
            row[f"{key}_median"] = med[label]
        ratio = f" B/A = {med['B'] / med['A']:.3f}" if med["A"] else ""
        log(f"{what}: A {per['A']} median {med['A']:g}; B {per['B']} median {med['B']:g};{ratio}")
    return rows


def print_table(rows, ceiling, extra):
    print()
    if ceiling:
        print(f"COPY ceiling (same machine, same run): {ceiling:,.0f} rows/s")
    head = f"{'scenario':<16}{'tool':<6}{'offered':>11}{'achieved/s':>12}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}" \
           f"{'cpu %':>7}{'rss MB':>8}{'ceil %':>8}  statuses / extra"
    print(head)
    print("-" * len(head))
    for r in rows:
        share = f"{100 * r['ceiling_share']:.1f}" if "ceiling_share" in r else "-"
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(r["statuses"].items()))
        if "limits_per_s" in r:
            statuses += (f" | {100 * r['deliveries_per_s'] / r['limits_per_s']:.1f} % of the limits' sum"
                         f" | busiest endpoint {r['busiest_endpoint_per_s']:,}/s (limit {r['limit']:,})"
                         f" | at the start {r['start_busiest_pct']} % of what its bucket allows"
                         f" | {r['transactions_per_delivery']} database transactions and"
                         f" {r['waits_per_delivery']} waits for a turn a delivery"
                         + (f" | the busiest node sent {r['busiest_node_pct']} %" if r.get("nodes", 1) > 1 else ""))
        if "lag_ms" in r:
            statuses += f" | delivered {r['deliveries_per_s']:,.0f}/s lag p50 {r['lag_ms']['p50']} p99 {r['lag_ms']['p99']} ms"
        for label, key in (("per event", "cpu_per_event"), ("per delivery", "cpu_per_delivery")):
            c = r.get(key) or {}
            if c:
                pg = f", postgres {c['pg_us_per_event']} us" if "pg_us_per_event" in c else ""
                parts = {k: v for k, v in (c.get("pg_us_per_event_by_part") or {}).items() if v >= 0.05}
                if parts:
                    pg += " (" + ", ".join(f"{k} {v}" for k, v in parts.items()) + ")"
                box = ""
                if "box_us_per_event" in c:
                    receiver = (f"receiver {c['receiver_us_per_event']}, generator and the rest"
                                if "receiver_us_per_event" in c else "generator and the rest")
                    box = (f", box {c['box_us_per_event']} us ({receiver} {c['rest_us_per_event']}; "
                           f"CPUs {c['box_busy_pct']:.0f} % busy)")
                statuses += f" | cpu {label}: server {c['server_us_per_event']} us{pg}{box}"
                if label == "per event" and r.get("events_per_commit"):
                    statuses += f" | {r['commits_per_s']:,} commits/s of {r['events_per_commit']} events"
                    if r.get("commit_p99_ms") is not None:
                        # From the server's histograms (buckets 1, 2.5, 5, 10, 25 ms...; interpolated).
                        statuses += (f" (transaction p50 {r['commit_p50_ms']}, p99 {r['commit_p99_ms']} ms; "
                                     f"oldest event's wait for it p50 {r.get('wait_p50_ms')}, "
                                     f"p99 {r.get('wait_p99_ms')} ms)")
                    if r.get("served_p99_ms") is not None:
                        statuses += (f" | the server's own time per request p50 {r['served_p50_ms']}, "
                                     f"p99 {r['served_p99_ms']} ms")
                if label == "per event" and r.get("pg_waits"):
                    # Parts that only idled (the listener, the probe) are left out.
                    statuses += " | postgres backends on average: " + "; ".join(
                        f"{part} " + ", ".join(f"{state} {n}" for state, n in states.items() if n >= 0.01)
                        for part, states in r["pg_waits"]["backends"].items()
                        if any(state != "idle" and n >= 0.01 for state, n in states.items()))
                if label == "per event" and c.get("server_threads"):
                    busy = sorted(c["server_threads"].items(), key=lambda kv: -kv[1]["busy_pct"])
                    statuses += " | server threads busy: " + ", ".join(
                        f"{kind} {t['busy_pct']:.0f} %" + (f" ({t['threads']}, busiest {t['max_pct']:.0f})"
                                                          if t["threads"] > 1 else "")
                        for kind, t in busy if t["busy_pct"] >= 1)
        offered = f"{r['offered']:,}" if isinstance(r["offered"], int) else r["offered"]
        ms = "".join(f"{r[k]:>9.2f}" if r[k] is not None else f"{'-':>9}" for k in ("p50", "p90", "p99", "max"))
        print(f"{r['scenario']:<16}{r['tool']:<6}{offered:>11}{r['achieved']:>12,.0f}{ms}"
              f"{r['cpu_pct']:>7.0f}{r['rss_mb']:>8.1f}{share:>8}  {statuses}")
    for line in extra:
        print(line)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=list(SCENARIOS) + SPECIAL + ["all"])
    p.add_argument("--duration", default="30s", help="measured time per scenario (default 30s)")
    p.add_argument("--rate", type=int, help="offered rate for fixed-rate scenarios")
    p.add_argument("--connections", type=int, help="connections for wrk scenarios")
    p.add_argument("--cores", type=int, help="--ingress-cores for the server (default: its own)")
    p.add_argument("--core-counts", help="`cores`: the ingress core counts to measure, e.g. 1,2,4,8 "
                                         "(default 1 to the server's CPUs)")
    p.add_argument("--server-cpus", help="CPUs the server (and the COPY ceiling) may run on, e.g. 0-8; "
                                         "default: any. Its ingress threads pin to the first of them")
    p.add_argument("--postgres-cpus", help="CPUs for the project's PostgreSQL, e.g. 9-12 (set on its "
                                           "processes; new backends inherit it)")
    p.add_argument("--load-cpus", help="CPUs for the load generator and the receiver, e.g. 13-15; wrk "
                                       "then runs one thread per CPU (default 2 threads)")
    p.add_argument("--orgs", type=int, default=200, help="organizations created (default 200)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="events per request in ingest-batch and ingest-batch-k6 (default 100; 1..1000)")
    p.add_argument("--rate-limit", type=int, default=100,
                   help="rate-limited: each endpoint's rate_limit_per_second (default 100)")
    p.add_argument("--nodes", type=int, default=1,
                   help="rate-limited: nodes sharing the database and the endpoints' buckets (default 1)")
    p.add_argument("--smoke", action="store_true", help="a few seconds at low rate: what CI runs")
    p.add_argument("--server-args", default="", help="extra flags for the server")
    p.add_argument("--no-ceiling", action="store_true", help="skip the COPY ceiling measurement")
    p.add_argument("--ceiling-rows", type=int, default=400_000,
                   help="rows the COPY ceiling writes (default 400,000: about a second, a burst that meets "
                        "no checkpoint; ~15 × the ceiling's rate/s sustains it as long as a 15 s scenario)")
    p.add_argument("--server-bin", default=SERVER, help="the server binary to measure (default: the release build)")
    p.add_argument("--against", help="another server binary: run the scenario with both, alternating, and compare")
    p.add_argument("--repeat", type=int, default=3, help="runs per binary with --against (default 3; medians)")
    p.add_argument("--pg-waits", action="store_true",
                   help="sample what the server's PostgreSQL backends do (pg_stat_activity every 50 ms) during "
                        "each measured phase: backends per state on average, by part")
    p.add_argument("--perf", help="record a cpu-clock profile of the server during the scenario into this file")
    p.add_argument("--url", help="measure a server that is already running (local or remote) at this base URL, "
                                  "e.g. https://triggers.example.com; needs --keys; no server or database is started")
    p.add_argument("--keys", help="with --url: a file of API keys, one per line (bash loadtest/orgs.sh writes it)")
    p.add_argument("--report", metavar="DIR", help="also write DIR/index.html: the run's figures as SVG charts "
                                                   "(loadtest/report.py; `report` measures everything it draws)")
    p.add_argument("--database", default="triggers_loadtest",
                   help="the database to run in (default triggers_loadtest; give an older binary its own: "
                        "two versions may not share a schema)")
    args = p.parse_args()
    args.duration = seconds(args.duration)
    for role in PLACE:
        text = getattr(args, f"{role}_cpus")
        PLACE[role] = cpu_list(text) if text else None
    os.makedirs(RESULTS, exist_ok=True)
    if args.url:
        global BASE
        BASE = args.url.rstrip("/")
        if not args.keys:
            raise SystemExit("--url needs --keys FILE (bash loadtest/orgs.sh 200 URL DIR writes DIR/keys.txt)")
        names = [n for n in SCENARIOS if not SCENARIOS[n][5] and SCENARIOS[n][4] == "many"] \
            if args.scenario == "all" else [args.scenario]
        rows = []
        for name in names:
            if name == "sweep":
                rows.extend(remote_sweep(args, os.path.abspath(args.keys)))
            else:
                rows.append(remote(name, args, os.path.abspath(args.keys)))
        print_table(rows, None, [f"server: {BASE} (not started here; its CPU and RSS are not measured)"])
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = os.path.join(RESULTS, f"{stamp}-{args.scenario}-remote.json")
        data = {"results": rows, "args": vars(args), "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        json.dump(data, open(out, "w"), indent=1)
        log(f"results saved to {os.path.relpath(out, ROOT)}")
        if args.report:
            path, charts = report.write(data, args.report)
            log(f"report written to {path} (charts: {', '.join(charts) or 'none'})")
        return
    db = Database(args.database)
    place_postgres()
    names = ALL if args.scenario == "all" else REPORT if args.scenario == "report" else [args.scenario]
    rows, extra, ceiling = [], [], None
    # Migrations: a first start of the server applies them.
    Server(db, 1, binary=args.server_bin).stop()
    if not args.no_ceiling and args.scenario not in ("footprint",):
        ceiling = measure_ceiling(db, 40_000 if args.smoke else args.ceiling_rows)
    for name in names:
        if name == "ceiling":
            continue
        if name == "footprint":
            f = footprint(db, args)
            extra.append("footprint: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items()))
            continue
        if name == "disk":
            r, line = disk(db, args, ceiling)
            rows.append(r)
            extra.append(line)
            continue
        if name == "sweep":
            rows.extend(sweep(db, args, ceiling))
            continue
        if name == "connections":
            rows.extend(connections(db, args, ceiling))
            continue
        if name == "cores":
            counts = [int(n) for n in args.core_counts.split(",")] if args.core_counts else \
                range(1, len(PLACE["server"] or os.sched_getaffinity(0)) + 1)
            for cores in counts:
                args.cores = cores
                r = scenario("ingest-max", db, args, ceiling, args.server_bin)
                r["scenario"] = f"cores={cores}"
                rows.append(r)
            continue
        if args.against:
            rows.extend(compare(name, db, args, ceiling))
            continue
        log(f"running {name}")
        rows.append(scenario(name, db, args, ceiling, args.server_bin))
    print_table(rows, ceiling, extra)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = os.path.join(RESULTS, f"{stamp}-{args.scenario}.json")
    data = {"ceiling_rows_per_s": ceiling, "results": rows, "extra": extra, "args": vars(args),
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
            "placement": {role: sorted(cpus) if cpus else None for role, cpus in PLACE.items()}}
    json.dump(data, open(out, "w"), indent=1)
    log(f"results saved to {os.path.relpath(out, ROOT)}")
    if args.report:
        path, charts = report.write(data, args.report)
        log(f"report written to {path} (charts: {', '.join(charts) or 'none'})")


if __name__ == "__main__":
    main()
