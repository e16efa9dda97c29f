#!/usr/bin/env bash
# Run the server on :8080 (API) and :9090 (metrics) on a fresh Debian/Ubuntu machine: installs
# PostgreSQL if missing, starts a private cluster for the project, builds a release binary, serves.
# Webhooks to private addresses (localhost receivers) are allowed here; they are not by default.
# Extra arguments go to `triggers serve`, e.g. `bash scripts/run.sh --ack fast`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
URL=$(bash scripts/postgres.sh)
cargo build --release --locked
echo "triggers: serving on http://localhost:8080 (database $URL)" >&2
exec ./target/release/triggers serve --database-url "$URL" --allow-private-webhooks --log-format text "$@"
