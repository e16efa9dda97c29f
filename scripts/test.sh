#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian/Ubuntu machine: installs PostgreSQL if missing, starts
# the project's private cluster, recreates the test database, checks formatting and lints, runs
# every test (unit and integration; the integration tests start the real server), then runs every
# load-test scenario for a few seconds at a low rate so the benchmark scripts never rot (no speed
# is asserted). TRIGGERS_SKIP_LOADTEST=1 skips that last step.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
export TEST_DATABASE_URL=$(bash scripts/postgres.sh db triggers_test)
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== import loops between files" >&2
python3 scripts/import-cycles.py
echo "== cargo clippy" >&2
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test" >&2
cargo test --locked -- --test-threads 4
if [ "${TRIGGERS_SKIP_LOADTEST:-0}" != "1" ]; then
  echo "== load-test scenarios (smoke)" >&2
  bash loadtest/run.sh all --smoke
fi
