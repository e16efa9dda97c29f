#!/usr/bin/env bash
# Create N enterprise organizations on a running server and print one API key per line.
#   bash loadtest/orgs.sh 200 http://127.0.0.1:8080 > loadtest/results/keys.txt
set -euo pipefail
N=${1:-200}
URL=${2:-http://127.0.0.1:8080}
for i in $(seq 1 "$N"); do
  curl -sf -X POST "$URL/api/keys/generate" -H 'Content-Type: application/json' \
    ${TRIGGERS_ADMIN_TOKEN:+-H "Authorization: Bearer $TRIGGERS_ADMIN_TOKEN"} \
    -d "{\"organization_name\":\"load-$i\",\"tier\":\"enterprise\"}" | sed -E 's/.*"api_key":"([^"]+)".*/\1/'
  echo
done | grep -E '^.{64}$'
