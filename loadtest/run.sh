#!/usr/bin/env bash
# The load-test entry point: installs what is missing (PostgreSQL, wrk, k6, and drill when its
# scenario runs), builds the release server and the load-test tools, then runs loadtest/run.py.
#   bash loadtest/run.sh ingest-max --duration 30s
#   bash loadtest/run.sh all --smoke        # every scenario for a few seconds (CI)
#   bash loadtest/run.sh slowloris          # what hostile clients cost (loadtest/hostile.py)
#   bash loadtest/run.sh faults [--smoke]   # fault drills under load (loadtest/faults.py)
#   bash loadtest/run.sh ingest-1k --url https://triggers.example.com --keys keys.txt   # a running server
# See loadtest/README.md for the scenarios and how to read the table.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
need_apt=()
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# The fault drills put HAProxy (deploy/haproxy/haproxy.cfg) in front of three nodes.
if [ "${1:-}" = faults ] && ! command -v haproxy >/dev/null 2>&1; then need_apt+=(haproxy); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "loadtest: installing ${need_apt[*]}" >&2
  $SUDO apt-get update -qq >&2 && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >&2
fi
need_k6
case " $* " in
  *" drill "*|*" all "*) need_drill ;;
esac
case " $* " in
  *" --url "*|*" --url="*)
    # A server that is already running: no database, no server here; only the open-loop client.
    echo "loadtest: building the load-test client" >&2
    cargo build -q --release --locked --example openloop
    exec python3 loadtest/run.py "$@" ;;
esac
bash scripts/postgres.sh >/dev/null
echo "loadtest: building the release server and the load-test tools" >&2
cargo build -q --release --locked --bin triggers --example receiver --example copy_ceiling --example openloop --example slowloris
case "${1:-}" in
  slowloris|big-payloads) exec python3 loadtest/hostile.py "$@" ;;
  faults) exec python3 loadtest/faults.py "$@" ;;
esac
exec python3 loadtest/run.py "$@"
