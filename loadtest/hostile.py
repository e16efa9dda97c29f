#!/usr/bin/env python3
"""What hostile clients cost the server, measured (issue: hostile input can't hurt).

    bash loadtest/run.sh slowloris [--connections 10000] [--duration 20s] [--rate 2000]
    bash loadtest/run.sh big-payloads [--duration 60s] [--connections 64]

slowloris: normal traffic (examples/openloop at a fixed rate, latency from each request's due time)
alone, then beside N connections that each send one byte of a never-ending request head per
second (reconnecting when the server closes them at its head timeout). Prints the normal traffic's
p50/p99 both ways, and the server's CPU and peak RSS.

big-payloads: 400 organizations, each with a webhook to a receiver that refuses every connection,
send 262,000-byte payloads as fast as wrk can for the duration; the deliveries fail and are retried,
so payloads pile up in every queue. Prints the peak RSS beside the sum of the configured byte
budgets (write queue, deliveries in memory, bodies in flight).

Both use the release server and the project's PostgreSQL, like loadtest/run.py, and save their
results in loadtest/results/.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the harness: Database, Server, Sampler, create_orgs, ...)


SLOWLORIS = os.path.join(run.ROOT, "target", "release", "examples", "slowloris")


def slowloris(args):
    # The client (a child process) inherits this limit: 10,000 sockets need more than 1,024.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    db = run.Database("triggers_loadtest")
    run.Server(db, 1).stop()
    runs = {}
    plan = [("alone", 0), (f"with {args.connections:,} slow connections", args.connections)]
    for label, n in plan * args.repeat:
        db.reset()
        server = run.Server(db, args.cores)
        try:
            keys = run.create_orgs(20)
            keys_file = os.path.join(run.RESULTS, "keys.txt")
            open(keys_file, "w").write("\n".join(keys) + "\n")
            loris = None
            if n:
                # The slow connections open over the first second and run past the measurement.
                loris = subprocess.Popen([SLOWLORIS, f"127.0.0.1:{run.PORT}", str(n), str(int(args.duration) + 5)],
                                         stdout=subprocess.PIPE, text=True)
                time.sleep(3.0)
            sampler = run.Sampler(server)
            sampler.start()
            r = run.run_openloop(args.rate, 64, args.duration, keys_file)
            cpu, rss = sampler.finish()
            counts = json.loads(loris.communicate()[0]) if loris else {}
            r.update(cpu_pct=cpu, rss_mb=rss, slow=counts)
            runs.setdefault(label, []).append(r)
            run.log(f"slowloris {label}: p50 {r['p50']:.2f} p99 {r['p99']:.2f} ms, {r['achieved']:,.0f}/s, "
                    f"cpu {cpu:.0f}%, rss {rss:.1f} MB, {counts}")
        finally:
            server.stop()
    # The median run of each kind by p99 (these machines are noisy; the runs alternate).
    rows = {label: sorted(rs, key=lambda r: r["p99"])[len(rs) // 2] for label, rs in runs.items()}
    print()
    print(f"p99 of each run: " + "; ".join(f"{label}: {[round(r['p99'], 2) for r in rs]}" for label, rs in runs.items()))
    print(f"{'run':<40}{'achieved/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'cpu %':>7}{'rss MB':>8}  statuses")
    for label, r in rows.items():
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(r["statuses"].items()))
        print(f"{label:<40}{r['achieved']:>12,.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['max']:>9.2f}"
              f"{r['cpu_pct']:>7.0f}{r['rss_mb']:>8.1f}  {statuses}")
    base, loaded = list(rows.values())
    print(f"p99 ratio {loaded['p99'] / base['p99']:.2f}x (goal <= 2x); peak RSS {loaded['rss_mb']:.1f} MB (goal <= 256)")
    save("slowloris", runs)


def big_payloads(args):
    db = run.Database("triggers_loadtest")
    run.Server(db, 1).stop()
    db.reset()
    server = run.Server(db, args.cores)
    help_text = subprocess.run([server.proc.args[0], "--help"], capture_output=True, text=True).stdout
    try:
        keys = run.create_orgs(400)
        keys_file = os.path.join(run.RESULTS, "keys.txt")
        open(keys_file, "w").write("\n".join(keys) + "\n")
        # Port 9 (discard) refuses connections here: every delivery fails and is retried.
        for k in keys:
            run.call("POST", "/api/webhook/config", k, {"webhook_url": "http://127.0.0.1:9/hook"})
        sampler = run.Sampler(server)
        sampler.start()
        env = dict(os.environ, KEYS_FILE=keys_file)
        out = subprocess.run(["wrk", "-t2", f"-c{args.connections}", f"-d{args.duration}s", "-s",
                              os.path.join(run.HERE, "big.lua"), f"http://127.0.0.1:{run.PORT}"],
                             env=env, capture_output=True, text=True, check=True).stdout
        cpu, rss = sampler.finish()
        metrics = urllib_text(f"http://127.0.0.1:{run.METRICS_PORT}/metrics")
    finally:
        server.stop()
    budgets = {}
    for flag in ("write-queue-bytes-max", "delivery-memory-bytes-max", "inflight-body-bytes-max"):
        budgets[flag] = default_of(help_text, flag)
    total_budget = sum(budgets.values()) / 2**20
    requests = out.split("requests:")[1].split(",")[0].strip() if "requests:" in out else "?"
    ingested = metric(metrics, "triggers_events_ingested_total")
    retries = metric(metrics, 'triggers_deliveries_total{outcome="retry"}')
    result = {"peak_rss_mb": rss, "cpu_pct": cpu, "requests": requests, "ingested": ingested,
              "delivery_retries": retries, "budgets_mib": {k: v / 2**20 for k, v in budgets.items()},
              "budget_sum_mib": total_budget, "wrk": out}
    print()
    print(f"400 organizations, 262,000-byte payloads, failing receiver, {args.duration}s, c{args.connections}:")
    print(f"  requests {requests}, events accepted {ingested:,.0f}, delivery attempts failed and retried {retries:,.0f}")
    print(f"  server peak RSS {rss:.1f} MB, cpu {cpu:.0f}%; byte budgets {', '.join(f'{k} {v / 2**20:.0f} MiB' for k, v in budgets.items())}"
          f" = {total_budget:.0f} MiB in all")
    save("big-payloads", result)


def default_of(help_text, flag):
    lines = help_text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"--{flag}":
            return int(lines[i + 1].split("[default: ")[1].rstrip("]"))
    raise SystemExit(f"no --{flag} in the server's help")


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def urllib_text(url):
    import urllib.request
    return urllib.request.urlopen(url, timeout=10).read().decode()


def save(name, data):
    os.makedirs(run.RESULTS, exist_ok=True)
    out = os.path.join(run.RESULTS, time.strftime("%Y%m%d-%H%M%S") + f"-{name}.json")
    json.dump(data, open(out, "w"), indent=1)
    run.log(f"results saved to {os.path.relpath(out, run.ROOT)}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["slowloris", "big-payloads"])
    p.add_argument("--duration", default=None)
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--connections", type=int, default=None)
    p.add_argument("--cores", type=int)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind, alternating (medians)")
    args = p.parse_args()
    if args.scenario == "slowloris":
        args.connections = args.connections or (200 if args.smoke else 10000)
        args.duration = run.seconds(args.duration or ("3s" if args.smoke else "20s"))
        if args.smoke:
            args.rate, args.repeat = min(args.rate, 200), 1
        slowloris(args)
    else:
        args.connections = args.connections or (4 if args.smoke else 64)
        args.duration = int(run.seconds(args.duration or ("3s" if args.smoke else "60s")))
        big_payloads(args)


if __name__ == "__main__":
    main()
