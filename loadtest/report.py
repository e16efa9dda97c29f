#!/usr/bin/env python3
"""The load-test report: one HTML page with SVG charts from a run's results.

    bash loadtest/run.sh report --duration 10s --report DIR   # measure, then write DIR/index.html
    python3 loadtest/report.py RESULTS.json DIR               # draw an earlier run's results again

Charts (each drawn only when the run measured it; each also written as DIR/<name>.svg):
  latency     p50/p90/p99/max against the offered rate of the open-loop sweep (`sweep`), log scales
  achieved    achieved against offered rate in the sweep, with the COPY ceiling line
  stalls      the worst latency in each second of each sweep step (where a stall was)
  sweep-cpu   server and PostgreSQL CPU per event at each rate of the sweep
  connections events/s against wrk connections (`connections`), with the COPY ceiling line
  cpu         server, PostgreSQL and box CPU per event (and per delivery) for every scenario of the run
  lag         the distribution of delivery lag (created_at to arrival at the receiver)

Python's standard library only: the charts are lines and bars on scaled axes, and a plotting
library (matplotlib and numpy) would be the harness's largest dependency by far.
"""

import html
import json
import math
import os
import sys
import time

WIDTH, HEIGHT = 720, 400
LEFT, RIGHT, TOP, BOTTOM = 78, 150, 40, 56
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]


def fmt(v):
    """A tick label: 1.5k, 20k, 2.5, 0.25."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e3:
        return f"{v / 1e3:g}k"
    if a >= 1:
        return f"{v:g}"
    return f"{v:.3g}"


class Axis:
    """A linear or base-10 logarithmic mapping from data to pixels, with its ticks."""

    def __init__(self, lo, hi, p0, p1, log=False):
        if log:
            lo = max(lo, 1e-9)
            hi = max(hi, lo * 1.0001)
            # Snapped to the 1-2-5 steps around the data, not to whole decades.
            steps = [m * 10 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
                     for m in (1, 2, 5)]
            self.lo = max(v for v in steps if v <= lo * 1.0001)
            self.hi = min(v for v in steps if v >= hi / 1.0001)
            if self.hi <= self.lo:
                self.hi = self.lo * 2
        else:
            lo = min(lo, 0.0)
            hi = hi if hi > lo else lo + 1
            step = nice_step((hi - lo) / 5)
            self.lo, self.hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
            self.step = step
        self.p0, self.p1, self.log = p0, p1, log

    def __call__(self, v):
        if self.log:
            v = max(v, self.lo)
            f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / (self.hi - self.lo)
        return self.p0 + f * (self.p1 - self.p0)

    def ticks(self):
        if not self.log:
            n = int(round((self.hi - self.lo) / self.step))
            return [(self.lo + i * self.step, True) for i in range(n + 1)]
        out = []
        e = math.floor(math.log10(self.lo) + 1e-9)
        while 10 ** e <= self.hi * 1.0001:
            for m in (1, 2, 5):
                v = m * 10 ** e
                if self.lo <= v <= self.hi * 1.0001:
                    out.append((v, m == 1))
            e += 1
        return out


def nice_step(raw):
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def frame(title, xlabel, ylabel, x, y, xticks=None):
    """The chart's box, grid, ticks and labels."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
           f'height="{HEIGHT}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{html.escape(title)}</text>']
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    for v, major in y.ticks():
        py = y(v)
        out.append(f'<line x1="{x0}" y1="{py:.1f}" x2="{x1}" y2="{py:.1f}" stroke="#{"ccc" if major else "eee"}"/>')
        out.append(f'<text x="{x0 - 6}" y="{py + 4:.1f}" text-anchor="end">{fmt(v)}</text>')
    if xticks is None:
        for v, major in x.ticks():
            px = x(v)
            out.append(f'<line x1="{px:.1f}" y1="{y0}" x2="{px:.1f}" y2="{y1}" stroke="#{"ccc" if major else "eee"}"/>')
            out.append(f'<text x="{px:.1f}" y="{y0 + 16}" text-anchor="middle">{fmt(v)}</text>')
    else:
        crowded = len(xticks) > 6
        for px, label in xticks:
            if crowded:
                # Many categories: names slanted so they do not run into each other.
                out.append(f'<text transform="translate({px:.1f} {y0 + 12}) rotate(-30)" text-anchor="end" '
                           f'font-size="10">{html.escape(label)}</text>')
            else:
                out.append(f'<text x="{px:.1f}" y="{y0 + 16}" text-anchor="middle">{html.escape(label)}</text>')
    out.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{(x0 + x1) / 2}" y="{HEIGHT - 14}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text transform="translate(18 {(y0 + y1) / 2}) rotate(-90)" text-anchor="middle">'
               f'{html.escape(ylabel)}</text>')
    return out


def legend(names):
    out = []
    for i, (name, color, dashed) in enumerate(names):
        y = TOP + 10 + i * 20
        x = WIDTH - RIGHT + 12
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        out.append(f'<line x1="{x}" y1="{y}" x2="{x + 22}" y2="{y}" stroke="{color}" stroke-width="2.5"{dash}/>')
        out.append(f'<text x="{x + 28}" y="{y + 4}">{html.escape(name)}</text>')
    return out


def line_chart(title, xlabel, ylabel, series, xlog=False, ylog=False, hlines=(), xlabels=None):
    """series: [(name, [(x, y), ...])]; hlines: [(name, y)], drawn dashed across the chart;
    xlabels: [(x, label)] in place of the axis's own ticks."""
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts] + [y for _, y in hlines]
    if not xs:
        return None
    x = Axis(min(xs), max(xs), LEFT, WIDTH - RIGHT, xlog)
    y = Axis(min(ys), max(ys) * (1.0 if ylog else 1.05), HEIGHT - BOTTOM, TOP, ylog)
    ticks = [(x(v), label) for v, label in xlabels] if xlabels else None
    out = frame(title, xlabel, ylabel, x, y, xticks=ticks)
    names = []
    for i, (name, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{x(px):.1f},{y(py):.1f}" for px, py in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2.5"/>')
        for px, py in pts:
            out.append(f'<circle cx="{x(px):.1f}" cy="{y(py):.1f}" r="3.5" fill="{color}">'
                       f'<title>{html.escape(name)}: {fmt(px)} → {py:,.2f}</title></circle>')
        names.append((name, color, False))
    for j, (name, value) in enumerate(hlines):
        color = COLORS[(len(series) + j) % len(COLORS)]
        out.append(f'<line x1="{LEFT}" y1="{y(value):.1f}" x2="{WIDTH - RIGHT}" y2="{y(value):.1f}" '
                   f'stroke="{color}" stroke-width="2" stroke-dasharray="6 4"/>')
        names.append((f"{name} {fmt(float(f'{value:.3g}'))}", color, True))
    out += legend(names)
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(title, ylabel, categories, groups):
    """groups: [(name, [value per category or None])]: bars side by side in each category."""
    values = [v for _, vs in groups for v in vs if v is not None]
    if not values or not categories:
        return None
    y = Axis(0, max(values) * 1.1, HEIGHT - BOTTOM, TOP)
    span = (WIDTH - RIGHT - LEFT) / len(categories)
    bar = span * 0.8 / len(groups)
    ticks = [(LEFT + span * (i + 0.5), c) for i, c in enumerate(categories)]
    out = frame(title, "", ylabel, None, y, xticks=ticks)
    names = []
    for g, (name, vs) in enumerate(groups):
        color = COLORS[g % len(COLORS)]
        for i, v in enumerate(vs):
            if v is None:
                continue
            px = LEFT + span * i + span * 0.1 + g * bar
            out.append(f'<rect x="{px:.1f}" y="{y(v):.1f}" width="{bar:.1f}" height="{y(0) - y(v):.1f}" '
                       f'fill="{color}"><title>{html.escape(name)}: {v:,.1f}</title></rect>')
            if bar >= 16:
                out.append(f'<text x="{px + bar / 2:.1f}" y="{y(v) - 4:.1f}" text-anchor="middle" '
                           f'font-size="10">{v:,.1f}</text>')
        names.append((name, color, False))
    out += legend(names)
    out.append("</svg>")
    return "\n".join(out)


def charts(data):
    """Every chart the results hold: [(file name, caption, svg)]."""
    rows = data.get("results", [])
    ceiling = data.get("ceiling_rows_per_s")
    hlines = [("COPY ceiling", ceiling)] if ceiling else []
    out = []
    sweep = sorted((r for r in rows if r.get("sweep")), key=lambda r: r["offered"])
    if sweep:
        series = [(label, [(r["offered"], r[key]) for r in sweep if r.get(key)])
                  for label, key in (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("max", "max"))]
        out.append(("latency", "Open-loop sweep: latency of durable single-event ingest against the offered "
                    "rate (measured from each request's due time, so a stall counts).",
                    line_chart("Latency against offered rate (open loop)", "offered events/s",
                               "latency, ms", series, xlog=True, ylog=True)))
        out.append(("achieved", "Open-loop sweep: events acknowledged per second against the rate offered; "
                    "where the line bends away from the diagonal the server is saturated.",
                    line_chart("Achieved against offered rate", "offered events/s", "achieved events/s",
                               [("achieved", [(r["offered"], r["achieved"]) for r in sweep]),
                                ("offered", [(r["offered"], r["offered"]) for r in sweep])],
                               xlog=True, ylog=True, hlines=hlines)))
        timeline = [(f"{fmt(r['offered'])}/s", [(i + 1, max(ms, 0.01)) for i, ms in enumerate(r["worst_ms_by_second"])])
                    for r in sweep if r.get("worst_ms_by_second")]
        if timeline:
            out.append(("stalls", "Open-loop sweep: the worst latency of the requests due in each second of each "
                        "step. A pause of the server, of PostgreSQL or of the box shows as one bad second; "
                        "a server falling behind as a climb.",
                        line_chart("Worst latency in each second", "second of the step", "worst latency, ms",
                                   timeline, ylog=True)))
        cpu = [("server", [(r["offered"], r["cpu_per_event"]["server_us_per_event"]) for r in sweep
                           if r.get("cpu_per_event")])]
        pg = [(r["offered"], r["cpu_per_event"]["pg_us_per_event"]) for r in sweep
              if (r.get("cpu_per_event") or {}).get("pg_us_per_event") is not None]
        if pg:
            cpu.append(("PostgreSQL", pg))
        if cpu[0][1]:
            out.append(("sweep-cpu", "CPU per acknowledged event at each offered rate (from /proc): fixed costs "
                        "per wake-up and per commit are shared by more events as the rate grows.",
                        line_chart("CPU per event against offered rate", "offered events/s", "CPU µs per event",
                                   cpu, xlog=True)))
    conns = sorted((r for r in rows if r.get("connections_sweep")), key=lambda r: r["connections"])
    if conns:
        out.append(("connections", "Closed loop (wrk, single events): durable events/s against connections, "
                    "beside the raw binary COPY ceiling measured in the same run.",
                    line_chart("Throughput against connections", "connections", "events/s",
                               [("events/s", [(r["connections"], r["achieved"]) for r in conns])],
                               xlog=True, hlines=hlines)))
        out.append(("connections-p99", "Closed loop: latency percentiles against connections.",
                    line_chart("Latency against connections", "connections", "latency, ms",
                               [(k, [(r["connections"], r[k]) for r in conns if r.get(k)])
                                for k in ("p50", "p99")], xlog=True, ylog=True)))
    plain = [r for r in rows if not r.get("sweep") and not r.get("connections_sweep") and r.get("cpu_per_event")]
    if plain:
        cats = [r["scenario"] for r in plain]
        groups = [("server / event", [r["cpu_per_event"].get("server_us_per_event") for r in plain]),
                  ("PostgreSQL / event", [r["cpu_per_event"].get("pg_us_per_event") for r in plain])]
        if any(r["cpu_per_event"].get("box_us_per_event") for r in plain):
            groups.append(("box / event", [r["cpu_per_event"].get("box_us_per_event") for r in plain]))
        if any(r.get("cpu_per_delivery") for r in plain):
            groups.append(("server / delivery", [(r.get("cpu_per_delivery") or {}).get("server_us_per_event")
                                                 for r in plain]))
        out.append(("cpu", "CPU per acknowledged event (and per delivery where webhooks were delivered), "
                    "server, PostgreSQL and the whole box (every process, the load generator's included), read from /proc: "
                    "the server's and PostgreSQL's figures do not depend on who shares the box.",
                    bar_chart("CPU per event by scenario", "CPU µs", cats, groups)))
    lag = [r for r in rows if r.get("lag_cdf")]
    if lag:
        # Percentiles on a "nines" axis: 90 -> 1, 99 -> 2, 99.9 -> 3.
        series = []
        for r in lag:
            pts = [(nines(p), ms) for p, ms in r["lag_cdf"] if p < 100]
            series.append((r["scenario"], pts))
        svg = line_chart("Delivery lag distribution", "percentile", "lag, ms", series, ylog=True,
                         xlabels=[(0, "0"), (1, "90"), (2, "99"), (3, "99.9"), (4, "99.99")])
        out.append(("lag", "End-to-end delivery lag (the event's created_at to its arrival at the receiver) "
                    "by percentile.", svg))
    return [c for c in out if c[2]]


def nines(p):
    return -math.log10(1 - p / 100) if p < 100 else 5.0


def table(data):
    rows = data.get("results", [])
    head = ["scenario", "offered", "achieved/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "server µs/event",
            "PostgreSQL µs/event", "box µs/event (CPUs busy)", "statuses"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        c = r.get("cpu_per_event") or {}
        cells = [r.get("scenario"), r.get("offered"), f"{r.get('achieved', 0):,.0f}"]
        cells += [f"{r[k]:.2f}" if isinstance(r.get(k), (int, float)) else "-" for k in ("p50", "p90", "p99", "max")]
        pg = str(c.get("pg_us_per_event", "-"))
        parts = {k: v for k, v in (c.get("pg_us_per_event_by_part") or {}).items() if v >= 0.05}
        if parts:
            pg += " (" + ", ".join(f"{k} {v}" for k, v in parts.items()) + ")"
        box = f"{c['box_us_per_event']} ({c['box_busy_pct']:.0f} %)" if "box_us_per_event" in c else "-"
        cells += [c.get("server_us_per_event", "-"), pg, box,
                  " ".join(f"{k}:{v}" for k, v in sorted((r.get("statuses") or {}).items()))]
        out.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def write(data, out_dir):
    """Writes out_dir/index.html, one .svg per chart and the results as results.json."""
    os.makedirs(out_dir, exist_ok=True)
    found = charts(data)
    for name, _, svg in found:
        open(os.path.join(out_dir, f"{name}.svg"), "w").write(svg + "\n")
    json.dump(data, open(os.path.join(out_dir, "results.json"), "w"), indent=1)
    machine = data.get("machine") or {}
    ceiling = data.get("ceiling_rows_per_s")
    args = data.get("args") or {}
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>Triggers load-test report</title>",
             "<style>body{font-family:sans-serif;margin:24px;max-width:1100px}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:right}th{background:#f4f4f4}figure{margin:24px 0}figcaption{color:#444;"
             "max-width:720px}</style></head><body>",
             "<h1>Triggers load-test report</h1>",
             f"<p>{html.escape(data.get('when') or time.strftime('%Y-%m-%d %H:%M:%S'))}; "
             f"{machine.get('cpus', '?')} CPUs, kernel {html.escape(str(machine.get('kernel', '?')))}; "
             f"scenario <code>{html.escape(str(args.get('scenario', '?')))}</code>, "
             + (f"smoke run ({min(args.get('duration') or 3, 3)} s a step)" if args.get("smoke")
                else f"{html.escape(str(args.get('duration', '?')))} s a step")
             + (f"; COPY ceiling {ceiling:,.0f} rows/s" if ceiling else "") + ".</p>",
             "<p>Every event acknowledged here was committed to PostgreSQL before its 201. CPU figures are "
             "read from /proc for the server process and for every PostgreSQL backend.</p>"]
    if not found:
        parts.append("<p>This run measured nothing that is drawn (run <code>report</code>, <code>sweep</code>, "
                     "<code>connections</code> or a delivery scenario).</p>")
    for name, caption, svg in found:
        parts.append(f'<figure id="{name}">{svg}<figcaption>{html.escape(caption)} '
                     f'(<a href="{name}.svg">{name}.svg</a>)</figcaption></figure>')
    parts += ["<h2>Every measured step</h2>", table(data), "</body></html>"]
    path = os.path.join(out_dir, "index.html")
    open(path, "w").write("\n".join(parts) + "\n")
    return path, [name for name, _, _ in found]


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    path, names = write(json.load(open(sys.argv[1])), sys.argv[2])
    print(f"report: {path} ({', '.join(names) or 'no charts'})")


if __name__ == "__main__":
    main()
