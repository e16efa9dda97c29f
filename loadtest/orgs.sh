#!/usr/bin/env bash
# Create N enterprise organizations on a running server and print one API key per line, or, given a
# directory, write there the key files the load tools read: keys.txt (one key per line: k6, wrk,
# loadtest/run.sh --keys) and drill-keys.csv (a "key" column: loadtest/benchmark.yml).
#   bash loadtest/orgs.sh 200 http://127.0.0.1:8080 > keys.txt
#   bash loadtest/orgs.sh 200 https://triggers.example.com loadtest/results
# then drill (its plan reads ./drill-keys.csv beside the plan, and takes the server from `base:`):
#   sed "s#^base: .*#base: 'https://triggers.example.com'#" loadtest/benchmark.yml > loadtest/results/benchmark.yml
#   (cd loadtest/results && drill --benchmark benchmark.yml --stats --quiet)
# or k6 / the harness with the same keys:
#   k6 run -e BASE=https://triggers.example.com -e KEYS_FILE=loadtest/results/keys.txt loadtest/ingest.js
#   bash loadtest/run.sh ingest-1k --url https://triggers.example.com --keys loadtest/results/keys.txt
# Key creation is limited per client address (--key-ops-per-minute); raise it on the server, or set
# TRIGGERS_ADMIN_TOKEN when the server requires an admin token for key creation.
set -euo pipefail
N=${1:-200}
URL=${2:-http://127.0.0.1:8080}
DIR=${3:-}
create() {
  for i in $(seq 1 "$N"); do
    curl -sf -X POST "$URL/api/keys/generate" -H 'Content-Type: application/json' \
      ${TRIGGERS_ADMIN_TOKEN:+-H "Authorization: Bearer $TRIGGERS_ADMIN_TOKEN"} \
      -d "{\"organization_name\":\"load-$i\",\"tier\":\"enterprise\"}" | sed -E 's/.*"api_key":"([^"]+)".*/\1/'
    echo
  done | grep -E '^.{64}$'
}
if [ -z "$DIR" ]; then
  create
  exit 0
fi
mkdir -p "$DIR"
create > "$DIR/keys.txt"
got=$(wc -l < "$DIR/keys.txt")
{ echo key; cat "$DIR/keys.txt"; } > "$DIR/drill-keys.csv"
[ "$got" -eq "$N" ] || { echo "orgs: $got of $N organizations created (key creation limited?)" >&2; exit 1; }
echo "orgs: $got keys in $DIR/keys.txt and $DIR/drill-keys.csv" >&2
