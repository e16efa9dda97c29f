#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian/Ubuntu machine: installs PostgreSQL if missing, starts
# the project's private cluster, recreates the test database, checks formatting, import loops and
# lints, runs every test (unit and integration; the integration tests start the real server), checks
# the alert rules and a live /metrics scrape with promtool and the systemd unit (its sandbox
# against the system calls the server makes), runs
# schemathesis over the OpenAPI document against a real server, fuzzes every parser briefly, then
# runs every load-test scenario for a few seconds at a low rate so the benchmark scripts never rot
# (no speed is asserted) and checks its HTML report in headless Chromium, then the fault drills briefly (these do assert: nothing acknowledged
# lost, no 4xx for the server's trouble), then builds the container image from scratch with podman
# and starts the server from its exported filesystem (scripts/image.sh). Skips:
# TRIGGERS_SKIP_SCHEMATHESIS=1, TRIGGERS_SKIP_FUZZ=1, TRIGGERS_SKIP_LOADTEST=1,
# TRIGGERS_SKIP_FAULTS=1, TRIGGERS_SKIP_IMAGE=1. TRIGGERS_FUZZ_SECONDS sets the fuzzing time per
# target (default 20). TRIGGERS_ARM64=1 adds the aarch64 build, unit tests and smoke run under
# qemu (scripts/arm64.sh; about 20 min on 2 cores, so not in CI's default run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
# The skips are this script's own: read them, then keep them out of the environment (the server
# refuses TRIGGERS_* variables it does not know, and the stages below start servers).
SKIP_SCHEMATHESIS=${TRIGGERS_SKIP_SCHEMATHESIS:-0}
SKIP_FUZZ=${TRIGGERS_SKIP_FUZZ:-0}
SKIP_LOADTEST=${TRIGGERS_SKIP_LOADTEST:-0}
SKIP_FAULTS=${TRIGGERS_SKIP_FAULTS:-0}
SKIP_IMAGE=${TRIGGERS_SKIP_IMAGE:-0}
ARM64=${TRIGGERS_ARM64:-0}
FUZZ_SECONDS=${TRIGGERS_FUZZ_SECONDS:-20}
unset TRIGGERS_SKIP_SCHEMATHESIS TRIGGERS_SKIP_FUZZ TRIGGERS_SKIP_LOADTEST TRIGGERS_SKIP_FAULTS \
  TRIGGERS_SKIP_IMAGE TRIGGERS_ARM64 TRIGGERS_FUZZ_SECONDS
export TEST_DATABASE_URL=$(bash scripts/postgres.sh db triggers_test)
# A test runs a node with its clock moved (libfaketime); it says SKIPPED without it.
need_packages faketime faketime
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== import loops between files" >&2
python3 scripts/import-cycles.py
echo "== cargo clippy" >&2
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test" >&2
cargo test --locked --no-fail-fast -- --test-threads 4
echo "== alert rules, Prometheus configuration and a live scrape (promtool); the systemd unit" >&2
bash scripts/observability.sh
if [ "$SKIP_SCHEMATHESIS" != "1" ]; then
  echo "== schemathesis over /openapi.json" >&2
  bash scripts/schemathesis.sh 100
fi
if [ "$SKIP_FUZZ" != "1" ]; then
  echo "== fuzzing ($FUZZ_SECONDS s per target)" >&2
  bash scripts/fuzz.sh "$FUZZ_SECONDS"
fi
if [ "$SKIP_LOADTEST" != "1" ]; then
  echo "== load-test scenarios (smoke)" >&2
  bash loadtest/run.sh all --smoke --report target/report
  # The report as a reader sees it: rendered by headless Chromium, every chart drawn.
  bash scripts/report-check.sh target/report latency achieved stalls sweep-cpu connections cpu lag
  bash loadtest/run.sh slowloris --smoke
  bash loadtest/run.sh big-payloads --smoke
fi
if [ "$SKIP_FAULTS" != "1" ]; then
  echo "== fault drills (smoke)" >&2
  bash loadtest/run.sh faults --smoke
fi
if [ "$SKIP_IMAGE" != "1" ]; then
  echo "== container image (podman, from scratch)" >&2
  bash scripts/image.sh
fi
if [ "$ARM64" = "1" ]; then
  echo "== aarch64 build, unit tests and smoke run under qemu" >&2
  bash scripts/arm64.sh
fi
