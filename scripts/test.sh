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
# and starts the server from its exported filesystem (scripts/image.sh). The tools the later stages
# need are installed while the first ones run (scripts/tools.sh). Skips:
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
# What later stages need and a fresh machine lacks is installed while the first ones run
# (scripts/tools.sh): Debian's packages and the Python tools at once, during clippy (they are
# mostly downloads); the nightly toolchain, cargo-fuzz and drill, built from source (about 7 min of
# CPU), at the lowest CPU priority, on what the stages before them leave idle. A stage that needs
# them waits for them first; a failed install fails the run there, with its log.
stages=""
[ "$SKIP_FUZZ" = "1" ] || stages+=" fuzz"
[ "$SKIP_LOADTEST" = "1" ] || stages+=" loadtest"
[ "$SKIP_FAULTS" = "1" ] || stages+=" faults"
[ "$SKIP_IMAGE" = "1" ] || stages+=" image"
tools_logs=$(mktemp -d)
bash scripts/tools.sh packages $stages > "$tools_logs/packages" 2>&1 &
packages_pid=$!
nice -n 19 bash scripts/tools.sh builds $stages > "$tools_logs/builds" 2>&1 &
builds_pid=$!
# tools_ready packages|builds: wait for that job, show what it said, and fail the run if it failed.
tools_ready() {
  local pid status=0
  pid=$([ "$1" = packages ] && echo "$packages_pid" || echo "$builds_pid")
  [ -n "$pid" ] || return 0
  wait "$pid" || status=$?
  if [ "$1" = packages ]; then packages_pid=""; else builds_pid=""; fi
  cat "$tools_logs/$1" >&2
  [ "$status" -eq 0 ] || { echo "tools: installing the $1 failed (exit $status)" >&2; exit 1; }
}
stop_tools() {
  local pid
  for pid in $packages_pid $builds_pid; do
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
  done
  rm -rf "$tools_logs"
}
# Each stage says how long it took, and the run its whole time (CI's budget is 30 minutes).
STAGE= STAGE_AT=$SECONDS
stage() {
  [ -n "$STAGE" ] && echo "   ($STAGE: $((SECONDS - STAGE_AT)) s)" >&2
  STAGE=$1 STAGE_AT=$SECONDS
  [ -n "$1" ] && echo "== $1" >&2
  return 0
}
trap 'rc=$?; stop_tools; stage ""; echo "   (all: $SECONDS s, exit $rc)" >&2' EXIT
stage "cargo fmt --check"
cargo fmt --all -- --check
stage "import loops between files"
python3 scripts/import-cycles.py
stage "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
stage "cargo test"
# A test runs a node with its clock moved (libfaketime); it says SKIPPED without it.
tools_ready packages
cargo test --locked --no-fail-fast -- --test-threads 4
stage "alert rules, Prometheus configuration and a live scrape (promtool); the systemd unit"
bash scripts/observability.sh
if [ "$SKIP_SCHEMATHESIS" != "1" ]; then
  stage "schemathesis over /openapi.json"
  bash scripts/schemathesis.sh 100
fi
if [ "$SKIP_FUZZ" != "1" ]; then
  stage "fuzzing ($FUZZ_SECONDS s per target)"
  tools_ready builds
  bash scripts/fuzz.sh "$FUZZ_SECONDS"
fi
if [ "$SKIP_LOADTEST" != "1" ]; then
  stage "load-test scenarios (smoke)"
  tools_ready builds
  bash loadtest/run.sh all --smoke --report target/report
  # The report as a reader sees it: rendered by headless Chromium, every chart drawn.
  bash scripts/report-check.sh target/report latency achieved stalls sweep-cpu connections cpu lag
  bash loadtest/run.sh slowloris --smoke
  bash loadtest/run.sh big-payloads --smoke
fi
if [ "$SKIP_FAULTS" != "1" ]; then
  stage "fault drills (smoke)"
  bash loadtest/run.sh faults --smoke
fi
if [ "$SKIP_IMAGE" != "1" ]; then
  stage "container image (podman, from scratch)"
  bash scripts/image.sh
fi
if [ "$ARM64" = "1" ]; then
  stage "aarch64 build, unit tests and smoke run under qemu"
  bash scripts/arm64.sh
fi
