#!/usr/bin/env bash
# Run schemathesis (PyPI) over the server's own /openapi.json: every operation, generated valid and
# invalid requests, every check (no 5xx, every status, header and body as documented, invalid
# input refused, valid input taken). A fixed seed makes a run repeatable.
#
#   bash scripts/schemathesis.sh [MAX_EXAMPLES]     # default 150 per operation
#
# Starts the project's PostgreSQL and a server (target/debug/triggers, built if missing) on a
# fresh database, makes an enterprise key and runs against it. `POST /api/keys/rotate` is left
# out: rotating the key would lock the run out (rotation is covered by tests/keys.rs). Exits
# non-zero on any failure; the report is in target/schemathesis/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
EXAMPLES=${1:-150}
PORT=${SCHEMATHESIS_PORT:-18181}
need_schemathesis
[ -x target/debug/triggers ] || cargo build -q --locked --bin triggers
URL=$(bash scripts/postgres.sh db triggers_schemathesis)
OUT=target/schemathesis
mkdir -p "$OUT"
# Webhook hosts are looked up when they are configured, and a resolver that fails for now is a
# 503 (the server's trouble, not the client's), which schemathesis counts as a server error: with
# thousands of made-up host names, this machine's DNS may throttle or fail some. So that the run
# tests the API and not the machine's DNS, the server resolves names from /etc/hosts alone where
# a user and mount namespace can be had (any other name: no such host, 422), as before otherwise.
printf 'hosts: files\n' >"$OUT/nsswitch.conf"
HOSTS_ONLY=()
if unshare -rm true 2>/dev/null; then
  HOSTS_ONLY=(unshare -rm sh -c 'mount --bind "$1" /etc/nsswitch.conf && shift && exec "$@"' sh "$OUT/nsswitch.conf")
fi
${HOSTS_ONLY[@]+"${HOSTS_ONLY[@]}"} ./target/debug/triggers serve --database-url "$URL" --listen "127.0.0.1:$PORT" --metrics-listen off \
  --allow-private-webhooks --key-ops-per-minute 100000 --key-ops-per-minute-node 100000 \
  --log warn --log-format text >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 0.1
done
KEY=$(curl -sf -X POST "http://127.0.0.1:$PORT/api/keys/generate" -H 'Content-Type: application/json' \
  -d '{"organization_name":"schemathesis","tier":"enterprise"}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
st --config-file scripts/schemathesis.toml run "http://127.0.0.1:$PORT/openapi.json" \
  -H "X-API-Key: $KEY" \
  --exclude-path /api/keys/rotate \
  --seed 20261201 \
  --max-examples "$EXAMPLES" \
  --generation-database none \
  --workers 2 \
  --no-color \
  --report junit --report-dir "$OUT"
