#!/usr/bin/env python3
"""Fault drills: real faults under load, then the database is checked.

    bash loadtest/run.sh faults [--smoke] [--only DRILL,...] [--rounds N]

Every drill runs the release server against the project's PostgreSQL with clients that send
events at a steady rate, each with its own dedup id, retrying on 503, timeouts and broken
connections as a careful client does, and recording every acknowledged id. After the drill the
database is checked: every acknowledged event is there (missing), no dedup id was written twice
(duplicates), and for deliveries every event reached the receiver at least once, with no two
attempts of one event overlapping.

Drills (all real faults, no mocks):
  kill9            kill -9 the server every few seconds and restart it on the same port
  pg-fast          pg_ctl restart -m fast mid-load
  pg-immediate     pg_ctl stop -m immediate mid-load, start again after a pause
  read-only        ALTER SYSTEM default_transaction_read_only = on (as after a failover), durable
  read-only-fast   the same in fast-ack mode (202 events must all be written once it clears)
  timeout          ALTER SYSTEM statement_timeout = 1ms, durable and fast
  disk-full        a real full disk: the database's whole data directory, WAL included, on a
                   64 MB disk of its own (scripts/small-disk.sh, a tmpfs in a mount namespace)
                   filled to the last byte each round, and in every other round a checkpoint
                   that makes PostgreSQL panic; freed after 4 s (2 s smoke), durable and fast
                   (skipped where mount namespaces are not allowed)
  blackhole        a TCP proxy between server and database stops forwarding without closing
  db-cut           the same proxy resets every connection at once (a pooler or load balancer
                   restarted, a firewall's state flushed) while the database stays up, every
                   1.5 s: each answer must be exact (no event stored after a 503, none answered
                   409 as its own duplicate), and every read of the inbox and of an event,
                   and every ack, meanwhile 200; durable and fast
  receiver-down    the webhook receiver is down for 60 s (5 s smoke), then back
  node-kill        two nodes share the database; one is killed -9 with deliveries in flight
  node-freeze      two nodes share the database; one is stopped (SIGSTOP: a paused VM, a stall)
                   under load for 10 s (8 s smoke), past its 3 s leases, then goes on (SIGCONT):
                   what it held is delivered by the other node while it is stopped
  read-pool        the read pool is held by slow queries (a lock on organizations) while
                   events are ingested at 1,000/s
  haproxy          three nodes behind deploy/haproxy/haproxy.cfg: the API through it, a free-tier
                   organization's limit through the proxy and sent to all three nodes at once
                   (the cluster's bucket: at most RATE_OVERSHOOT_MAX over), kill -9 of one node under load (nothing
                   acknowledged lost, its deliveries taken over after the lease without
                   overlapping attempts); without --smoke also wrk throughput through HAProxy
                   with 1, 2 and 3 nodes

Prints one row per drill: rounds, load, acknowledged, missing, duplicates, worst time-to-503
(how long a client waited for a 503 while the fault lasted), worst time-to-recover (from the end
of the fault to the first 201), and notes (4xx answers that blame the client, stored-anyway,
dropped). Exits 1 if any drill loses or duplicates an event, answers a 4xx for the server's
trouble, or misses its bounds.
"""

import argparse
import http.client
import http.server
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

API_PORTS = (18280, 18281, 18282)
METRICS_PORTS = (19280, 19281, 19282)
HAPROXY_PORT = 18290
PROXY_PORT = 15432
RECEIVER_PORT = 19998


def log(msg):
    print(f"faults: {msg}", file=sys.stderr, flush=True)


def pg(*args):
    """scripts/postgres.sh SUBCOMMAND ... on the project's cluster."""
    subprocess.run(["bash", os.path.join(run.ROOT, "scripts/postgres.sh"), *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def admin_sql(db, statements):
    """As the cluster's superuser, on the test database; each statement on its own (ALTER SYSTEM
    may not run in the transaction a multi-statement string would be)."""
    cmd = ["psql", db.url, "-qAt", "-v", "ON_ERROR_STOP=1"]
    for statement in statements:
        cmd += ["-c", statement]
    # The drill's own session is exempt from the faults it injects.
    env = dict(os.environ, PGOPTIONS="-c statement_timeout=0 -c default_transaction_read_only=off")
    subprocess.run(cmd, check=True, capture_output=True, env=env)


def query(db, statement):
    env = dict(os.environ, PGOPTIONS="-c statement_timeout=0")
    out = subprocess.run(["psql", db.url, "-qAtc", statement], check=True, capture_output=True, text=True, env=env)
    return [line for line in out.stdout.splitlines() if line]


RUNNING = []


class Node:
    """One server process on its own ports."""

    def __init__(self, url, index=0, extra=()):
        self.url, self.index, self.extra = url, index, list(extra)
        self.proc = None
        RUNNING.append(self)
        self.start()

    @property
    def port(self):
        return API_PORTS[self.index]

    def start(self):
        known = run.supported_flags(run.SERVER)
        harness = [x for flag, value in run.HARNESS_FLAGS if flag in known for x in (flag, value)]
        args = [run.SERVER, "serve", "--database-url", self.url, "--listen", f"127.0.0.1:{self.port}",
                "--metrics-listen", f"127.0.0.1:{METRICS_PORTS[self.index]}", "--log-format", "text",
                "--log", "warn", "--allow-private-webhooks", *harness, *self.extra]
        log_path = os.path.join(run.RESULTS, f"faults-node{self.index}.log")
        self.proc = subprocess.Popen(args, stdout=open(log_path, "a"), stderr=subprocess.STDOUT)
        run.wait_http(f"http://127.0.0.1:{self.port}/health", 60, self.proc)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def metric(self, name):
        text = run.urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORTS[self.index]}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def call(port, method, path, key=None, body=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = key
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, (json.loads(data) if data else None)


def new_org(port, name):
    status, body = call(port, "POST", "/api/keys/generate", body={"organization_name": name, "tier": "enterprise"})
    assert status == 201, (status, body)
    return body["api_key"], body["organization_id"]


class Workers:
    """`threads` threads, each running `self.work(i)` until `stop`."""

    def __init__(self, threads):
        self.threads = threads
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.workers = [threading.Thread(target=self.work, args=(i,), daemon=True) for i in range(threads)]

    def start(self):
        self.t0 = time.monotonic()
        for w in self.workers:
            w.start()
        return self

    def stop(self):
        self.stop_flag.set()
        for w in self.workers:
            w.join()


class Load(Workers):
    """Clients posting events at `rate`/s in all over `threads` keep-alive connections, spread over
    `ports` (nodes). Each logical event has a dedup id and is retried until acknowledged or the
    load stops; every answer is recorded with its time."""

    def __init__(self, ports, keys, rate, threads=8, fast=False):
        self.ports, self.keys, self.rate, self.fast = ports, keys, rate, fast
        self.acked = {}          # dedup id -> event id
        self.acked_at = {}       # dedup id -> when its acknowledgement came
        self.answers = []        # (t_start, t_end, status)
        self.stored_anyway = 0   # a retry found the first try stored (409 naming it)
        super().__init__(threads)

    def work(self, i):
        interval = self.threads / self.rate
        port = self.ports[i % len(self.ports)]
        key = self.keys[i % len(self.keys)]
        conn, seq, due = None, 0, time.monotonic()
        retries = 0
        while not self.stop_flag.is_set():
            dedup = f"w{i}-{seq}"
            body = json.dumps({"type": "drill", "payload": {"w": i, "seq": seq}, "dedup_id": dedup})
            t_start = time.monotonic()
            status, answer = None, None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/api/events", body=body,
                             headers={"Content-Type": "application/json", "X-API-Key": key})
                r = conn.getresponse()
                status, data = r.status, r.read()
                answer = json.loads(data) if data else None
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                status = "timeout" if isinstance(sys.exc_info()[1], socket.timeout) else "conn"
                if conn:
                    conn.close()
                conn = None
            t_end = time.monotonic()
            with self.lock:
                self.answers.append((t_start, t_end, status))
            if status in (201, 202):
                with self.lock:
                    self.acked[dedup] = answer["id"]
                    self.acked_at[dedup] = t_end
                seq, retries = seq + 1, 0
            elif status == 409 and answer and answer.get("code") == "duplicate":
                # An earlier try of this event was stored after all: acknowledged now.
                with self.lock:
                    self.acked[dedup] = answer["event_id"]
                    self.stored_anyway += 1
                seq, retries = seq + 1, 0
            else:
                retries += 1
                time.sleep(min(0.05 * retries, 0.5))
                continue
            due += interval
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                due = time.monotonic()

    def statuses(self, since=None, until=None):
        counts = {}
        for s, e, st in self.answers:
            if (since is None or s >= since) and (until is None or s < until):
                counts[str(st)] = counts.get(str(st), 0) + 1
        return counts

    def worst_wait_for(self, status, since, until):
        """The longest a client waited for an answer of `status` in [since, until)."""
        waits = [e - s for s, e, st in self.answers if st == status and since <= s < until]
        return max(waits) if waits else None

    def first(self, statuses, since):
        ends = [e for s, e, st in self.answers if st in statuses and s >= since]
        return min(ends) if ends else None

    def recovered_after(self, since, statuses=(201,), limit=30):
        """Seconds from `since` to the first answer of `statuses` to a request sent from then on,
        waiting up to `limit` seconds for one; None if none came."""
        first = self.first(statuses, since)
        while first is None and time.monotonic() - since < limit:
            time.sleep(0.05)
            first = self.first(statuses, since)
        return None if first is None else first - since


class Receiver:
    """A webhook receiver that records every request with its start and end, answers after
    `hold` seconds (so two overlapping attempts of one event would show), and can be taken down."""

    def __init__(self, hold=0.02):
        self.hold = hold
        self.lock = threading.Lock()
        self.seen = []   # (event id, attempt, t_start, t_end)
        self.server = None
        self.open = set()  # connections being served, closed by down()
        self.is_up = False
        self.up()

    def up(self):
        recv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with recv.lock:
                    recv.open.add(self.connection)

            def finish(self):
                with recv.lock:
                    recv.open.discard(self.connection)
                super().finish()

            def do_POST(self):
                t_start = time.monotonic()
                if not recv.is_up:
                    self.close_connection = True
                    return
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(recv.hold)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with recv.lock:
                    recv.seen.append((self.headers.get("webhook-id"), int(self.headers.get("X-Delivery-Attempt", 0)),
                                      t_start, time.monotonic()))

            def log_message(self, *a):
                pass

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            # socketserver's default backlog is 5: a burst of new connections (a backlog of
            # deliveries let go at once after a fault) overflowed it, and a request whose
            # connection the kernel held back reached the handler only after the server had
            # given that attempt up and made the next (seen as attempt 2 before attempt 1).
            request_queue_size = 1024

            def handle_error(self, request, client_address):
                # A node killed or stopped mid-request resets its connections: not the drill's
                # concern (what it delivered is counted), and no traceback on the drill's output.
                if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", RECEIVER_PORT), Handler)
        self.server.daemon_threads = True
        self.is_up = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self):
        """Down as a crashed receiver is: the port refuses, open connections are cut."""
        if not self.is_up:
            return
        self.is_up = False
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for c in list(self.open):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def delivered(self):
        with self.lock:
            return {e for e, _, _, _ in self.seen}

    def overlaps(self):
        by_event = {}
        with self.lock:
            for e, a, s, t in self.seen:
                by_event.setdefault(e, []).append((s, t))
        n = 0
        for spans in by_event.values():
            spans.sort()
            for (s1, t1), (s2, t2) in zip(spans, spans[1:]):
                if s2 < t1:
                    n += 1
        return n


class Proxy:
    """A TCP proxy to PostgreSQL that can stop forwarding without closing anything."""

    def __init__(self, upstream_port):
        self.upstream = ("127.0.0.1", upstream_port)
        self.flowing = threading.Event()
        self.flowing.set()
        self.lock = threading.Lock()
        self.open = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", PROXY_PORT))
        self.listener.listen(256)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    def close(self):
        """Stop accepting (the port is free for the next drill's proxy) and end what is open."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread (close alone would not)
        except OSError:
            pass
        self.listener.close()
        self.cut()

    def cut(self):
        """End every open connection at once, both sides, data in flight lost."""
        with self.lock:
            open_now, self.open = self.open, []
        for s in open_now:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # shutdown wakes the pumps blocked on it (close alone would not).
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        return len(open_now) // 2

    def pump(self, a, b):
        while True:
            try:
                data = a.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            self.flowing.wait()
            try:
                b.sendall(data)
            except OSError:
                return


def check(db, org_ids, load):
    """Missing acknowledged events and duplicate dedup ids, from the database."""
    orgs = ",".join(f"'{o}'" for o in org_ids)
    rows = query(db, f"SELECT id, dedup_id FROM events WHERE org_id IN ({orgs}) AND type = 'drill'")
    stored = {}
    dup = 0
    for line in rows:
        eid, dedup = line.split("|")
        if dedup in stored:
            dup += 1
        stored[dedup] = eid
    missing = sum(1 for d, eid in load.acked.items() if stored.get(d) != eid)
    return missing, dup


class Result:
    def __init__(self, drill, rounds, load_desc):
        self.drill, self.rounds, self.load_desc = drill, rounds, load_desc
        self.acked = self.missing = self.duplicates = 0
        self.t503 = self.recover = None
        self.notes, self.failures = [], []

    def row(self):
        t503 = f"{self.t503 * 1000:.0f} ms" if self.t503 is not None else "-"
        rec = f"{self.recover * 1000:.0f} ms" if self.recover is not None else "-"
        return (f"| {self.drill} | {self.rounds} | {self.load_desc} | {self.acked:,} | {self.missing} | "
                f"{self.duplicates} | {t503} | {rec} | {'; '.join(self.notes)} |")


def blamed_client(counts):
    """Answers that blame the client for what was the server's trouble."""
    return {k: v for k, v in counts.items() if k.isdigit() and 400 <= int(k) < 500 and k not in ("409", "429")}


def settle(load, node_or_nodes, result, db, org_ids):
    load.stop()
    time.sleep(0.5)
    nodes = node_or_nodes if isinstance(node_or_nodes, list) else [node_or_nodes]
    for n in nodes:
        dropped = n.metric("triggers_events_dropped_total")
        if dropped:
            result.failures.append(f"{dropped:.0f} events dropped")
            result.notes.append(f"dropped {dropped:.0f}")
    result.acked = len(load.acked)
    result.missing, result.duplicates = check(db, org_ids, load)
    if result.missing or result.duplicates:
        result.failures.append(f"missing {result.missing}, duplicates {result.duplicates}")
    blamed = blamed_client(load.statuses())
    if blamed:
        result.failures.append(f"client blamed: {blamed}")
        result.notes.append(f"4xx {blamed}")
    if load.stored_anyway:
        result.notes.append(f"{load.stored_anyway} stored anyway (503/timeout, then 409 on retry)")
    counts = load.statuses()
    unavailable = {k: v for k, v in counts.items() if k in ("503", "timeout", "conn")}
    if unavailable:
        result.notes.append("answers " + ", ".join(f"{k}:{v}" for k, v in sorted(unavailable.items())))


def all_delivered(r, load, receiver, limit=60):
    """Deliveries resume after the fault: every acknowledged event reaches the receiver within
    `limit` seconds, no two attempts of one event overlap; how many were sent more than once
    (at-least-once allows it) goes into the notes."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not set(load.acked.values()) <= receiver.delivered():
        time.sleep(0.5)
    undelivered = len(set(load.acked.values()) - receiver.delivered())
    if undelivered:
        r.failures.append(f"{undelivered} acknowledged events never delivered")
    r.notes.append(f"delivered {len(set(load.acked.values()) & receiver.delivered()):,}, "
                   f"{len(receiver.seen) - len(receiver.delivered())} sent more than once")
    if receiver.overlaps():
        r.failures.append(f"{receiver.overlaps()} overlapping attempts")


def with_webhooks(node, keys):
    """Each organization's webhook is the drill's receiver."""
    for k, _ in keys:
        call(node.port, "POST", "/api/webhook/config", k, {"webhook_url": f"http://127.0.0.1:{RECEIVER_PORT}/hook"})


def within_bounds(r, t503_max, recover_max):
    """The worst wait for a 503 while the fault lasted, and the time to the first 201 after it."""
    if r.t503 is not None and r.t503 > t503_max:
        r.failures.append(f"a 503 took {r.t503:.2f} s (bound {t503_max:g} s)")
    if r.recover is None or r.recover > recover_max:
        r.failures.append(f"recovery took {r.recover} s (bound {recover_max:g} s)")


def timed_fault(load, hold, inject, clear):
    """Inject a fault, hold it, clear it; returns (fault start, fault end)."""
    t_fault = time.monotonic()
    inject()
    time.sleep(hold)
    clear()
    return t_fault, time.monotonic()


def drill_kill9(db, args):
    rounds = args.rounds or (2 if args.smoke else 20)
    r = Result("kill -9 the server, restart", rounds, f"{args.rate}/s")
    node = Node(db.url)
    keys = [new_org(node.port, f"kill9-{i}") for i in range(4)]
    load = Load([node.port], [k for k, _ in keys], args.rate).start()
    for i in range(rounds):
        time.sleep(2.0 if args.smoke else 3.0)
        t_kill = time.monotonic()
        node.kill()
        node.start()
        took = load.recovered_after(t_kill)
        if took is not None:
            r.recover = max(r.recover or 0, took)
    time.sleep(1.0)
    settle(load, node, r, db, [o for _, o in keys])
    node.stop()
    return r


def drill_pg(db, args, mode):
    rounds = args.rounds or (1 if args.smoke else 3)
    name = "pg_ctl restart -m fast" if mode == "fast" else "pg_ctl stop -m immediate, start after 3 s"
    r = Result(name, rounds, f"{args.rate}/s")
    receiver = Receiver()
    node = Node(db.url)
    keys = [new_org(node.port, f"pg-{mode}-{i}") for i in range(4)]
    with_webhooks(node, keys)
    load = Load([node.port], [k for k, _ in keys], args.rate).start()
    for _ in range(rounds):
        time.sleep(2.0)
        t_fault = time.monotonic()
        if mode == "fast":
            pg("restart", "fast")
        else:
            pg("stop", "immediate")
            time.sleep(3.0)
            pg("start")
        t_back = time.monotonic()
        worst = load.worst_wait_for(503, t_fault, t_back)
        if worst is not None:
            r.t503 = max(r.t503 or 0, worst)
        took = load.recovered_after(t_back)
        if took is not None:
            r.recover = max(r.recover or 0, took)
    time.sleep(1.0)
    settle(load, node, r, db, [o for _, o in keys])
    all_delivered(r, load, receiver)
    node.stop()
    receiver.down()
    within_bounds(r, 1.0, 2.0)
    return r


def drill_sql_fault(db, args, name, inject_sql, clear_sql, fast):
    rounds = args.rounds or (1 if args.smoke else 3)
    r = Result(f"{name} ({'fast' if fast else 'durable'})", rounds, f"{args.rate}/s")
    node = Node(db.url, extra=["--ack", "fast"] if fast else [])
    keys = [new_org(node.port, f"{name}-{i}") for i in range(4)]
    load = Load([node.port], [k for k, _ in keys], args.rate, fast=fast).start()
    for _ in range(rounds):
        time.sleep(1.5)
        t_fault, t_back = timed_fault(load, 2.0 if args.smoke else 4.0,
                                      lambda: admin_sql(db, inject_sql), lambda: admin_sql(db, clear_sql))
        worst = load.worst_wait_for(503, t_fault, t_back)
        if worst is not None:
            r.t503 = max(r.t503 or 0, worst)
        took = load.recovered_after(t_back, (201, 202))
        if took is not None:
            r.recover = max(r.recover or 0, took)
    # Fast mode: what was answered 202 during the fault is written once it clears.
    time.sleep(3.0 if fast else 1.0)
    settle(load, node, r, db, [o for _, o in keys])
    node.stop()
    return r


RELOAD = "SELECT pg_reload_conf()"
READ_ONLY = (["ALTER SYSTEM SET default_transaction_read_only = on", RELOAD],
             ["ALTER SYSTEM RESET default_transaction_read_only", RELOAD])
TIMEOUT = (["ALTER SYSTEM SET statement_timeout = '1ms'", RELOAD],
           ["ALTER SYSTEM RESET statement_timeout", RELOAD])


class SmallDisk:
    """A PostgreSQL cluster whose whole data directory, WAL included, is on a small disk of its
    own that fills for real (scripts/small-disk.sh: a tmpfs in a mount namespace); `url` is its
    `triggers_faults` database, or None where mount namespaces are not allowed."""

    PORT = 15433

    def __init__(self, size_mb=64):
        # Not under the checkout: PostgreSQL runs as the postgres user when the drills run as
        # root, and a checkout may sit in a directory only root may enter (a mktemp -d).
        self.dir = os.path.join(tempfile.gettempdir(), "triggers-small-disk-faults")
        subprocess.run(["rm", "-rf", self.dir], check=True)
        os.makedirs(self.dir)
        self.proc = subprocess.Popen(["bash", os.path.join(run.ROOT, "scripts/small-disk.sh"), self.dir,
                                      str(self.PORT), str(size_mb)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        self.url = None
        if line[:1] == ["ready"]:
            subprocess.run(["psql", line[1], "-qc", "CREATE DATABASE triggers_faults"], check=True,
                           capture_output=True)
            self.url = line[1].rsplit("/", 1)[0] + "/triggers_faults"
        elif self.proc.wait() != 3:
            raise RuntimeError("scripts/small-disk.sh failed")

    def command(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def checkpoint(self):
        """A checkpoint on a full disk: PostgreSQL's checkpointer panics, every session ends."""
        subprocess.run(["psql", self.url, "-qc", "CHECKPOINT"], capture_output=True)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        subprocess.run(["rm", "-rf", self.dir])


def drill_disk_full(db, args, fast):
    """A real full disk (SmallDisk) under load: each round fills it to the last byte, and every
    other round also makes PostgreSQL panic (a checkpoint with no room) so that every session
    ends; then frees it, as an operator would (starting PostgreSQL again if it stopped)."""
    rounds = args.rounds or (2 if args.smoke else 4)
    r = Result(f"disk full, for real ({'fast' if fast else 'durable'})", rounds, f"{args.rate}/s")
    try:
        disk = SmallDisk()
    except RuntimeError as e:
        r.failures.append(str(e))
        return r
    if disk.url is None:
        r.notes.append("skipped: mount namespaces are not allowed here")
        return r
    try:
        small = types.SimpleNamespace(url=disk.url)
        receiver = Receiver()
        node = Node(disk.url, extra=["--ack", "fast"] if fast else [])
        keys = [new_org(node.port, f"disk-full-{i}") for i in range(4)]
        with_webhooks(node, keys)
        load = Load([node.port], [k for k, _ in keys], args.rate, fast=fast).start()
        freed = []
        for i in range(rounds):
            time.sleep(1.5)
            t_fault = time.monotonic()
            answer = disk.command("fill")
            if answer != "full 0":
                r.failures.append(f"the disk did not fill: {answer}")
            if i % 2:
                disk.checkpoint()
            time.sleep(2.0 if args.smoke else 4.0)
            t_back = time.monotonic()
            freed.append(disk.command("free").split()[-1])
            worst = load.worst_wait_for(503, t_fault, t_back)
            if worst is not None:
                r.t503 = max(r.t503 or 0, worst)
            if not load.statuses(t_fault, t_back).get("503"):
                r.failures.append(f"round {i + 1}: no 503 while the disk was full")
            took = load.recovered_after(t_back, (201, 202))
            if took is not None:
                r.recover = max(r.recover or 0, took)
        # Fast mode: what was answered 202 while the disk was full is written once it is freed.
        time.sleep(3.0 if fast else 1.0)
        settle(load, node, r, small, [o for _, o in keys])
        all_delivered(r, load, receiver)
        node.stop()
        receiver.down()
        r.notes.append("PostgreSQL " + ", ".join(freed) + " after each round")
    finally:
        disk.close()
    within_bounds(r, 5.0, 10.0)
    return r


def drill_blackhole(db, args):
    r = Result("network blackhole to the database", 1, f"{args.rate}/s")
    proxy = Proxy(int(db.url.rsplit(":", 1)[1].split("/")[0]))
    url = db.url.replace(db.url.rsplit("@", 1)[1].split("/")[0], f"127.0.0.1:{PROXY_PORT}")
    receiver = Receiver()
    # A batch whose COMMIT reaches the database only after its writer gave up (answered 503) is
    # committed with its delivery lease: another pass takes it over when the lease expires. A
    # 12 s lease (the attempt timeout is 10 s) lets the drill see those delivered too.
    node = Node(url, extra=["--db-timeout-ms", "2000", "--retry-schedule", "500ms,1s,1s,2s,4s,8s",
                            "--delivery-lease-s", "12"])
    keys = [new_org(node.port, f"blackhole-{i}") for i in range(4)]
    with_webhooks(node, keys)
    load = Load([node.port], [k for k, _ in keys], args.rate).start()
    time.sleep(2.0)
    t_fault = time.monotonic()
    proxy.flowing.clear()
    time.sleep(3.0 if args.smoke else 8.0)
    proxy.flowing.set()
    t_back = time.monotonic()
    r.t503 = load.worst_wait_for(503, t_fault, t_back)
    r.recover = load.recovered_after(t_back)
    time.sleep(1.0)
    settle(load, node, r, db, [o for _, o in keys])
    all_delivered(r, load, receiver)
    if r.t503 is not None and r.t503 > 2.0 + 1.0:
        r.failures.append(f"a 503 took {r.t503:.2f} s (bound --db-timeout-ms 2 s + 1 s)")
    node.stop()
    receiver.down()
    proxy.close()
    return r


class Reader(Workers):
    """Two clients reading what was acknowledged while the load runs, each over one keep-alive
    connection: an organization's inbox page of delivered events, then the first event of it by
    id, and an ack of it (delivered already: nothing left to deliver is parked). Every answer's
    status is counted."""

    def __init__(self, port, keys, threads=2):
        self.port, self.keys = port, keys
        self.counts = {}
        super().__init__(threads)

    def stop(self):
        super().stop()
        return self.counts

    def get(self, conn, path, key, method="GET"):
        conn.request(method, path, headers={"X-API-Key": key})
        r = conn.getresponse()
        data = r.read()
        with self.lock:
            self.counts[r.status] = self.counts.get(r.status, 0) + 1
        return r.status, (json.loads(data) if data else None)

    def work(self, i):
        conn, n = None, i
        while not self.stop_flag.is_set():
            key = self.keys[n % len(self.keys)]
            n += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                status, page = self.get(conn, "/api/inbox?limit=5&status=delivered", key)
                if status == 200 and page["events"]:
                    self.get(conn, f"/api/events/{page['events'][0]['id']}", key)
                    self.get(conn, f"/api/ack/{page['events'][0]['id']}", key, "POST")
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.counts["conn"] = self.counts.get("conn", 0) + 1
                if conn:
                    conn.close()
                conn = None
            time.sleep(0.005)


def drill_db_cut(db, args, fast):
    rounds = args.rounds or (2 if args.smoke else 10)
    mode = "fast" if fast else "durable"
    r = Result(f"every database connection reset, the database up ({mode})", rounds, f"{args.rate}/s")
    proxy = Proxy(int(db.url.rsplit(":", 1)[1].split("/")[0]))
    url = db.url.replace(db.url.rsplit("@", 1)[1].split("/")[0], f"127.0.0.1:{PROXY_PORT}")
    receiver = Receiver()
    node = Node(url, extra=["--ack", "fast"] if fast else [])
    keys = [new_org(node.port, f"db-cut-{mode}-{i}") for i in range(4)]
    with_webhooks(node, keys)
    load = Load([node.port], [k for k, _ in keys], args.rate, fast=fast).start()
    reader = Reader(node.port, [k for k, _ in keys]).start()
    t_first, cut = time.monotonic(), 0
    for _ in range(rounds):
        time.sleep(1.5)
        cut += proxy.cut()
    r.t503 = load.worst_wait_for(503, t_first, time.monotonic())
    reads = reader.stop()
    r.notes.append("reads and acks " + " ".join(f"{k}:{v:,}" for k, v in sorted(reads.items(), key=str)))
    time.sleep(1.0)
    settle(load, node, r, db, [o for _, o in keys])
    all_delivered(r, load, receiver)
    r.notes.append(f"{cut} connections reset")
    # The database never went away: a writer that lost its connection reaches it again at once,
    # so every event's answer says what became of it.
    if load.stored_anyway:
        r.failures.append(f"{load.stored_anyway} stored anyway (answered 503, or 409 naming itself)")
    # Nor did a read find it gone: each goes again on a new connection.
    if any(k != 200 for k in reads):
        r.failures.append("reads or acks not answered 200: " + ", ".join(f"{k}: {v}" for k, v in reads.items() if k != 200))
    if r.t503 is not None and r.t503 > 1.0:
        r.failures.append(f"a 503 took {r.t503:.2f} s (bound 1 s)")
    node.stop()
    receiver.down()
    proxy.close()
    return r


def drill_receiver_down(db, args):
    down_s = 5 if args.smoke else 60
    r = Result(f"receiver down {down_s} s, then back", 1, f"{args.rate}/s")
    receiver = Receiver()
    schedule = "1s,2s,4s,8s,16s,32s,60s"
    node = Node(db.url, extra=["--retry-schedule", schedule])
    keys = [new_org(node.port, f"recv-{i}") for i in range(4)]
    with_webhooks(node, keys)
    load = Load([node.port], [k for k, _ in keys], args.rate).start()
    time.sleep(1.0)
    receiver.down()
    acked_before_down = len(load.acked)
    time.sleep(down_s)
    receiver.up()
    time.sleep(1.0)
    settle(load, node, r, db, [o for _, o in keys])
    acked = set(load.acked.values())
    deadline = time.monotonic() + 130
    while time.monotonic() < deadline and not acked <= receiver.delivered():
        time.sleep(0.5)
    undelivered = len(acked - receiver.delivered())
    if undelivered:
        r.failures.append(f"{undelivered} acknowledged events never delivered")
    retried = node.metric("triggers_deliveries_total{outcome=\"retry\"}")
    r.notes.append(f"delivered {len(acked & receiver.delivered()):,}, {retried:.0f} retries on {schedule}")
    # The schedule is honoured: each retry of an event came at least its delay (less the 10 %
    # jitter) after the attempt before it, as the event's own attempt log shows. Checked on events
    # sent while the receiver was down (those have retries).
    delays = [run.seconds(d) for d in schedule.split(",")]
    checked = early = 0
    key_of = {}
    for k, o in keys:
        key_of[o] = k
    for dedup, eid in list(load.acked.items())[acked_before_down:acked_before_down + 200]:
        for k, _ in keys:
            status, detail = call(node.port, "GET", f"/api/events/{eid}", k)
            if status == 200:
                break
        else:
            continue
        ats = [a["at"] for a in detail["delivery_attempts"]]
        stamps = [time.mktime(time.strptime(a[:19], "%Y-%m-%dT%H:%M:%S")) + float("0." + a[20:26]) for a in ats]
        for i in range(1, len(stamps)):
            checked += 1
            if stamps[i] - stamps[i - 1] < 0.9 * delays[i - 1] - 0.05:
                early += 1
    r.notes.append(f"{checked} retry gaps checked against the schedule, {early} early")
    if early:
        r.failures.append(f"{early} retries came before their scheduled delay")
    overlaps = receiver.overlaps()
    if overlaps:
        r.failures.append(f"{overlaps} overlapping attempts")
    node.stop()
    receiver.down()
    return r


def kill_under_load(db, r, load, node, org_ids, smoke, after):
    """Under `load`, kill -9 `node`, let the load go on for `after` (smoke, full) seconds, stop it
    and record on `r` what was acknowledged, missing and duplicated. Returns the time of the kill."""
    time.sleep(2.0 if smoke else 5.0)
    t_kill = time.monotonic()
    node.kill()
    time.sleep(after[0] if smoke else after[1])
    load.stop()
    r.acked = len(load.acked)
    r.missing, r.duplicates = check(db, org_ids, load)
    if r.missing or r.duplicates:
        r.failures.append(f"missing {r.missing}, duplicates {r.duplicates}")
    return t_kill


def check_deliveries(load, receiver, r, limit=60):
    """Wait up to `limit` s for every acknowledged event to reach the receiver; a failure on `r`
    for any that did not and for overlapping attempts. Returns (delivered, overlapping)."""
    acked = set(load.acked.values())
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not acked <= receiver.delivered():
        time.sleep(0.5)
    undelivered = len(acked - receiver.delivered())
    if undelivered:
        r.failures.append(f"{undelivered} acknowledged events never delivered")
    overlaps = receiver.overlaps()
    if overlaps:
        r.failures.append(f"{overlaps} overlapping attempts of one event")
    return len(acked & receiver.delivered()), overlaps


def drill_node_kill(db, args):
    r = Result("kill -9 one of two nodes", 1, f"{args.rate}/s over 2 nodes")
    receiver = Receiver(hold=0.05)
    extra = ["--delivery-lease-s", "3", "--delivery-timeout-ms", "2000", "--delivery-poll-ms", "200"]
    nodes = [Node(db.url, 0, extra), Node(db.url, 1, extra)]
    keys = [new_org(nodes[0].port, f"nodes-{i}") for i in range(4)]
    for k, _ in keys:
        call(nodes[0].port, "POST", "/api/webhook/config", k, {"webhook_url": f"http://127.0.0.1:{RECEIVER_PORT}/hook"})
    load = Load([n.port for n in nodes], [k for k, _ in keys], args.rate).start()
    # The survivor's clients keep going; the dead node's clients get connection errors and retry.
    t_kill = kill_under_load(db, r, load, nodes[0], [o for _, o in keys], args.smoke, (1.0, 3.0))
    delivered, overlaps = check_deliveries(load, receiver, r)
    r.recover = time.monotonic() - t_kill
    r.notes.append(f"delivered {delivered:,} (the killed node's taken over after "
                   f"its 3 s lease), overlapping attempts {overlaps}")
    nodes[1].stop()
    receiver.down()
    return r


def drill_node_freeze(db, args):
    r = Result("SIGSTOP one of two nodes, SIGCONT after its leases", 1, f"{args.rate}/s over 2 nodes")
    receiver = Receiver(hold=0.05)
    extra = ["--delivery-lease-s", "3", "--delivery-timeout-ms", "2000", "--delivery-poll-ms", "200",
             "--db-timeout-ms", "2000"]
    nodes = [Node(db.url, 0, extra), Node(db.url, 1, extra)]
    keys = [new_org(nodes[0].port, f"freeze-{i}") for i in range(4)]
    for k, _ in keys:
        call(nodes[0].port, "POST", "/api/webhook/config", k, {"webhook_url": f"http://127.0.0.1:{RECEIVER_PORT}/hook"})
    load = Load([n.port for n in nodes], [k for k, _ in keys], args.rate).start()
    time.sleep(2.0 if args.smoke else 5.0)
    t_freeze = time.monotonic()
    # Stopped where it stands: its sockets stay open, its transactions and leases stay its own
    # until the database ends the one and the other node takes the other over.
    nodes[0].proc.send_signal(signal.SIGSTOP)
    time.sleep(8.0 if args.smoke else 10.0)
    # Everything acknowledged before the stop is delivered by now, by the other node: its lease
    # (3 s) and the stopped node's transactions (--db-timeout-ms) are long over.
    with load.lock:
        before = {e for d, e in load.acked.items() if load.acked_at[d] < t_freeze - 0.5}
    held_back = len(before - receiver.delivered())
    if held_back:
        r.failures.append(f"{held_back} events acknowledged before the stop were not delivered "
                          f"while it lasted")
    nodes[0].proc.send_signal(signal.SIGCONT)
    t_thaw = time.monotonic()
    time.sleep(2.0 if args.smoke else 5.0)
    load.stop()
    r.acked = len(load.acked)
    r.missing, r.duplicates = check(db, [o for _, o in keys], load)
    if r.missing or r.duplicates:
        r.failures.append(f"missing {r.missing}, duplicates {r.duplicates}")
    delivered, overlaps = check_deliveries(load, receiver, r)
    r.recover = time.monotonic() - t_freeze
    if call(nodes[0].port, "GET", "/health/ready")[0] != 200:
        r.failures.append("the node that was stopped is not ready again")
    first_after = load.first((201,), t_thaw)
    r.notes.append(f"delivered {delivered:,} (the stopped node's taken over after its 3 s lease), "
                   f"overlapping attempts {overlaps}; first 201 {((first_after or t_thaw) - t_thaw) * 1000:.0f} ms "
                   f"after SIGCONT; answers {load.statuses(t_freeze, t_thaw)}")
    for n in nodes:
        n.stop()
    receiver.down()
    return r


def drill_read_pool(db, args):
    rate = 200 if args.smoke else 1000
    r = Result("read pool held by slow queries", 1, f"{rate}/s")
    node = Node(db.url)
    keys = [new_org(node.port, f"pool-{i}") for i in range(4)]
    # Hold every read connection: GET /api/keys waits on a lock another session holds.
    locker = subprocess.Popen(["psql", db.url, "-qAt"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, text=True)
    locker.stdin.write("BEGIN; LOCK TABLE organizations IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(3600);\n")
    locker.stdin.flush()
    time.sleep(0.5)
    readers = [threading.Thread(target=lambda k=k: call(node.port, "GET", "/api/keys", k, timeout=30), daemon=True)
               for k, _ in keys for _ in range(8)]
    for t in readers:
        t.start()
    time.sleep(0.5)
    load = Load([node.port], [k for k, _ in keys], rate).start()
    time.sleep(3.0 if args.smoke else 10.0)
    # The lock goes with its session (killing psql alone would leave the backend asleep with it).
    admin_sql(db, ["SELECT pg_terminate_backend(pid) FROM pg_locks WHERE relation = 'organizations'::regclass AND mode = 'AccessExclusiveLock'"])
    locker.kill()
    settle(load, node, r, db, [o for _, o in keys])
    counts = load.statuses()
    ok = counts.get("201", 0)
    if ok != sum(counts.values()):
        r.failures.append(f"ingest did not keep answering 201: {counts}")
    r.notes.append(f"answers {counts}")
    node.stop()
    return r


class HAProxy:
    """deploy/haproxy/haproxy.cfg as shipped, with the drill's ports, in front of `ports`."""

    def __init__(self, ports):
        cfg = open(os.path.join(run.ROOT, "deploy", "haproxy", "haproxy.cfg")).read()
        cfg = cfg.replace("bind :8080", f"bind 127.0.0.1:{HAPROXY_PORT}")
        # HAProxy needs two descriptors per connection; a test machine's limit may be 20,000.
        cfg = cfg.replace("maxconn 100000", "maxconn 4000")
        lines = [l for l in cfg.splitlines() if not l.strip().startswith("server node")]
        lines += [f"    server node{i + 1} 127.0.0.1:{p} check" for i, p in enumerate(ports)]
        path = os.path.join(run.RESULTS, "haproxy.cfg")
        open(path, "w").write("\n".join(lines) + "\n")
        subprocess.run(["haproxy", "-c", "-q", "-f", path], check=True)
        self.proc = subprocess.Popen(["haproxy", "-f", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run.wait_http(f"http://127.0.0.1:{HAPROXY_PORT}/health", 10, self.proc)
        # Every node up in HAProxy's eyes (checks every second, two to rise).
        time.sleep(2.5)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


# Events of a free-tier organization admitted beyond its 100 when three nodes are hit at once:
# a bound on what they spend before their reports to the cluster's bucket cross (measured 3 and 16
# on the 2-core box, 116 and 177 in all in two runs of 2026-12-04, the second in CI's smoke pass
# on a busy box, where the first report's round trip is slow; buckets per node admit 300 in all,
# an overshoot of 200, so this bound still tells the two apart).
RATE_OVERSHOOT_MAX = 100


def burst(port, key, n, threads=8):
    """Send n events as fast as `threads` connections allow; returns answers by status."""
    counts, lock = {}, threading.Lock()

    def worker(share):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for j in range(share):
            conn.request("POST", "/api/events", body=json.dumps({"type": "burst", "payload": j}),
                         headers={"Content-Type": "application/json", "X-API-Key": key})
            r = conn.getresponse()
            r.read()
            with lock:
                counts[r.status] = counts.get(r.status, 0) + 1
        conn.close()

    ts = [threading.Thread(target=worker, args=(n // threads + (1 if i < n % threads else 0),))
          for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return counts


def drill_haproxy(db, args):
    r = Result("3 nodes behind HAProxy, kill -9 one", 1, f"{args.rate}/s through HAProxy")
    receiver = Receiver(hold=0.05)
    extra = ["--delivery-lease-s", "3", "--delivery-timeout-ms", "2000", "--delivery-poll-ms", "200"]
    nodes = [Node(db.url, i, extra) for i in range(3)]
    proxy = HAProxy([n.port for n in nodes])
    port = HAPROXY_PORT
    try:
        # The API through the proxy: keys, webhooks, events, reads.
        keys = [new_org(port, f"haproxy-{i}") for i in range(12)]
        for k, _ in keys:
            status, _ = call(port, "POST", "/api/webhook/config", k, {"webhook_url": f"http://127.0.0.1:{RECEIVER_PORT}/hook"})
            assert status == 200, status
        status, body = call(port, "GET", "/api/keys", keys[0][0])
        assert status == 200, (status, body)
        # Organizations spread over the nodes (hash on the key), each pinned to one.
        served = [n.metric("triggers_auth_cache_misses_total") for n in nodes]
        r.notes.append("key checks per node " + "/".join(f"{v:.0f}" for v in served))

        # A free-tier organization: 100 a minute in total, whichever node the proxy picks.
        status, body = call(port, "POST", "/api/keys/generate", body={"organization_name": "free", "tier": "free"})
        assert status == 201, (status, body)
        counts = burst(port, body["api_key"], 300)
        accepted = counts.get(201, 0)
        r.notes.append(f"free tier, 300 sent at once: {accepted} accepted, {counts.get(429, 0)} answered 429")
        # The bucket holds 100 and refills at 100/min: a few seconds' burst gets ~100, not 300.
        if not 100 <= accepted <= 110 or accepted + counts.get(429, 0) != 300:
            r.failures.append(f"free tier through the proxy: {counts}")

        # The case the proxy's hashing avoids: one free-tier organization sent to all three nodes
        # at once. The limit is the cluster's (rate_budgets): nodes report their spend every few
        # milliseconds, so the overshoot is what they admit before the reports cross.
        status, body = call(port, "POST", "/api/keys/generate", body={"organization_name": "free-3", "tier": "free"})
        assert status == 201, (status, body)
        counts = {}
        ts = [threading.Thread(target=lambda p=n.port: [counts.__setitem__(k, counts.get(k, 0) + v)
                                                        for k, v in burst(p, body["api_key"], 100).items()])
              for n in nodes]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        accepted = counts.get(201, 0)
        r.notes.append(f"free tier, 100 sent at each of 3 nodes at once: {accepted} accepted "
                       f"(overshoot {max(accepted - 100, 0)}), {counts.get(429, 0)} answered 429")
        if not 100 <= accepted <= 100 + RATE_OVERSHOOT_MAX or accepted + counts.get(429, 0) != 300:
            r.failures.append(f"free tier across three nodes: {counts}")

        # Kill -9 one node under load through the proxy.
        load = Load([port], [k for k, _ in keys], args.rate, threads=12).start()
        t_kill = kill_under_load(db, r, load, nodes[0], [o for _, o in keys], args.smoke, (3.0, 8.0))
        blamed = blamed_client(load.statuses())
        if blamed:
            r.failures.append(f"client blamed: {blamed}")
        r.recover = load.recovered_after(t_kill, limit=10)
        after = load.statuses(since=t_kill)
        r.notes.append("answers after the kill " + ", ".join(f"{k}:{v}" for k, v in sorted(after.items())))
        delivered, overlaps = check_deliveries(load, receiver, r)
        r.notes.append(f"delivered {delivered:,} of {len(load.acked):,}, overlapping attempts {overlaps}")
        if not args.smoke:
            proxy.stop()
            nodes[0].start()
            receiver.down()
            r.notes.append("wrk through HAProxy: " + throughput(nodes))
            proxy = HAProxy([n.port for n in nodes])
    finally:
        proxy.stop()
        for n in nodes:
            n.stop()
        receiver.down()
    return r


def throughput(nodes):
    """wrk ingest through HAProxy in front of 1, 2 and 3 of the nodes (10 s each), for 64
    organizations of their own (no webhooks: ingest only)."""
    keys_file = os.path.join(run.RESULTS, "haproxy-keys.txt")
    out = []
    for n in (1, 2, 3):
        proxy = HAProxy([x.port for x in nodes[:n]])
        if n == 1:
            keys = [new_org(HAPROXY_PORT, f"throughput-{i}")[0] for i in range(64)]
            open(keys_file, "w").write("\n".join(keys) + "\n")
        try:
            run.BASE = f"http://127.0.0.1:{HAPROXY_PORT}"
            res = run.run_wrk("ingest.lua", 256, 10, keys_file)
        finally:
            proxy.stop()
        out.append(f"{n} node{'s' if n > 1 else ''} {res['achieved']:,.0f}/s p99 {res['p99']:.1f} ms")
    return "; ".join(out)


DRILLS = {
    "kill9": drill_kill9,
    "pg-fast": lambda db, a: drill_pg(db, a, "fast"),
    "pg-immediate": lambda db, a: drill_pg(db, a, "immediate"),
    "read-only": lambda db, a: drill_sql_fault(db, a, "read-only", *READ_ONLY, fast=False),
    "read-only-fast": lambda db, a: drill_sql_fault(db, a, "read-only", *READ_ONLY, fast=True),
    "timeout": lambda db, a: drill_sql_fault(db, a, "statement_timeout 1ms", *TIMEOUT, fast=False),
    "timeout-fast": lambda db, a: drill_sql_fault(db, a, "statement_timeout 1ms", *TIMEOUT, fast=True),
    "disk-full": lambda db, a: drill_disk_full(db, a, fast=False),
    "disk-full-fast": lambda db, a: drill_disk_full(db, a, fast=True),
    "blackhole": drill_blackhole,
    "db-cut": lambda db, a: drill_db_cut(db, a, fast=False),
    "db-cut-fast": lambda db, a: drill_db_cut(db, a, fast=True),
    "receiver-down": drill_receiver_down,
    "node-kill": drill_node_kill,
    "node-freeze": drill_node_freeze,
    "read-pool": drill_read_pool,
    "haproxy": drill_haproxy,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["faults"])
    p.add_argument("--smoke", action="store_true", help="short versions (CI)")
    p.add_argument("--only", help="comma-separated drills (default: all)")
    p.add_argument("--rounds", type=int, help="rounds of the repeated drills")
    p.add_argument("--rate", type=int, default=None, help="events/s of the load (default 500; 100 smoke)")
    args = p.parse_args()
    args.rate = args.rate or (100 if args.smoke else 500)
    os.makedirs(run.RESULTS, exist_ok=True)
    names = args.only.split(",") if args.only else list(DRILLS)
    db = run.Database("triggers_faults")
    results = []
    try:
        for name in names:
            log(f"drill {name}")
            # Whatever a failed drill left behind is cleared before the next one.
            for sql in (READ_ONLY[1], TIMEOUT[1]):
                admin_sql(db, sql)
            r = DRILLS[name](db, args)
            log(f"{name}: acknowledged {r.acked}, missing {r.missing}, duplicates {r.duplicates}"
                + (f", FAILED: {'; '.join(r.failures)}" if r.failures else ""))
            results.append(r)
    finally:
        # A drill that failed half-way leaves nothing behind: no server, no fault.
        for node in RUNNING:
            node.kill()
        for sql in (READ_ONLY[1], TIMEOUT[1]):
            try:
                admin_sql(db, sql)
            except subprocess.CalledProcessError:
                pass
    print()
    print("| drill | rounds | load | acknowledged | missing | duplicates | worst time-to-503 | worst time-to-recover | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(r.row())
    failed = [r for r in results if r.failures]
    for r in failed:
        print(f"FAILED {r.drill}: {'; '.join(r.failures)}")
    out = os.path.join(run.RESULTS, time.strftime("%Y%m%d-%H%M%S") + "-faults.json")
    json.dump([vars(r) for r in results], open(out, "w"), indent=1, default=str)
    log(f"results saved to {os.path.relpath(out, run.ROOT)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
