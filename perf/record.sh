#!/usr/bin/env bash
# Record a CPU profile of the server under a load-test scenario and render a flame graph.
#   bash perf/record.sh [scenario] [--duration 20s] [other loadtest/run.py options]
# Output: perf/out/<scenario>.svg (flame graph), perf/out/<scenario>-top.txt (hottest symbols),
# perf/out/<scenario>-threads.txt (time per thread), perf/out/<scenario>.data (raw, for perf report).
# Installs linux-perf (apt) and inferno (cargo install inferno) when missing. cpu-clock sampling
# is used: it works in VMs where hardware counters don't. See perf/README.md to read the result.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
SCENARIO=${1:-ingest-max}
shift || true
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v perf >/dev/null 2>&1; then
  $SUDO apt-get update -qq >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >&2 \
    || $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-tools-generic >&2
fi
if ! command -v inferno-flamegraph >/dev/null 2>&1; then
  cargo install -q inferno --locked >&2
fi
# Let perf sample this user's processes (a no-op where it is already allowed).
[ -w /proc/sys/kernel/perf_event_paranoid ] && echo 1 > /proc/sys/kernel/perf_event_paranoid || true
echo "perf: building the server with symbols (cargo build --profile profiling)" >&2
cargo build -q --profile profiling --locked --bin triggers
mkdir -p perf/out
DATA=perf/out/$SCENARIO.data
bash loadtest/run.sh "$SCENARIO" --no-ceiling --duration 20s "$@" \
  --server-bin "$PWD/target/profiling/triggers" --perf "$PWD/$DATA"
perf script -i "$DATA" 2>/dev/null | inferno-collapse-perf > "perf/out/$SCENARIO.folded"
inferno-flamegraph --title "triggers: $SCENARIO" < "perf/out/$SCENARIO.folded" > "perf/out/$SCENARIO.svg"
# sed, not head: head would close the pipe early and pipefail would stop the script.
perf report -i "$DATA" -g none --no-children --sort dso,symbol --stdio 2>/dev/null \
  | grep -E '^ +[0-9]' | sed -n 1,60p > "perf/out/$SCENARIO-top.txt"
perf report -i "$DATA" -g none --no-children --sort comm --stdio 2>/dev/null \
  | grep -E '^ +[0-9]' > "perf/out/$SCENARIO-threads.txt"
echo "perf: flame graph perf/out/$SCENARIO.svg; hottest symbols:" >&2
sed -n 1,15p "perf/out/$SCENARIO-top.txt" >&2
echo "perf: time per thread:" >&2
cat "perf/out/$SCENARIO-threads.txt" >&2
