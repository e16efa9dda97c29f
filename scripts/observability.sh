#!/usr/bin/env bash
# Check what operators load into Prometheus and Grafana: the alert rules and the example
# configuration with `promtool` (Debian's prometheus package), and a real /metrics scrape with
# `promtool check metrics` (names, types, help text). That every metric the rules and the dashboard
# name is served is asserted by tests/ops.rs. Then the systemd unit (scripts/systemd-check.sh).
#   bash scripts/observability.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
if ! command -v promtool >/dev/null 2>&1; then
  need_packages promtool prometheus
  no_prometheus_service
fi
promtool check rules deploy/prometheus/alerts.yml
promtool check config deploy/prometheus/prometheus.yml
python3 -c "import json; d = json.load(open('deploy/grafana/triggers.json')); print('dashboard:', len(d['panels']), 'panels')"
URL=$(bash scripts/postgres.sh db triggers_observability)
cargo build -q --release --locked --bin triggers
port=18380
./target/release/triggers serve --database-url "$URL" --listen 127.0.0.1:$port \
  --metrics-listen 127.0.0.1:$((port + 1)) --log warn > /dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
wait_ready "http://127.0.0.1:$port/health/ready" "$pid" /dev/null
curl -fsS "http://127.0.0.1:$((port + 1))/metrics" > /tmp/triggers-metrics.txt
promtool check metrics < /tmp/triggers-metrics.txt
echo "observability: rules, configuration and a live scrape ($(grep -c '^# TYPE' /tmp/triggers-metrics.txt) metrics) pass promtool"
kill $pid 2>/dev/null; wait $pid 2>/dev/null || true
trap - EXIT
# The systemd unit: verified, its sandbox's exposure, and the server's system calls under it.
bash scripts/systemd-check.sh
