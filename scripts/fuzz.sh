#!/usr/bin/env bash
# Fuzz every parser that reads what a client sends, for SECONDS each (default 60), with
# libFuzzer through cargo-fuzz (nightly). Installs cargo-fuzz when it is missing.
#
#   bash scripts/fuzz.sh            # 60 s per target
#   bash scripts/fuzz.sh 600        # a long run
#
# Targets (fuzz/fuzz_targets/): head (request head, incremental end search), chunked (chunked
# decoder: limit and split invariance), event_body (event validator; the JSON layer against
# serde_json), inbox_query (inbox query string and cursor), endpoint_body (endpoint
# create/patch/recover bodies, event-type patterns),
# batch_body (the batch envelope and its items), values (API key, UUID path segment, RFC 3339
# time, a receiver's Retry-After), answer (a webhook receiver's answer, as the delivery client
# reads it: framing, limit and split invariance), config (the arguments and environment an
# operator gives: no overflow, every time at most ten years; the database URL's TLS parameters
# taken out whole), certificate (the database server's certificate, read for channel binding).
# Seeds are in fuzz/seeds/<target>; what
# libFuzzer learns goes to fuzz/corpus/<target> (not committed); a crash is saved in
# fuzz/artifacts/<target> and fails the run. Prints executions and crashes per target.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
EACH=${1:-60}
need_cargo_fuzz
targets=(head chunked event_body inbox_query endpoint_body batch_body values answer config certificate)
# fuzz/Cargo.lock is committed and holds the server's own versions (Cargo.lock) of every crate the
# two share, so what is fuzzed is what ships: refuse a lock that needs changing or has drifted.
# After a dependency update: cp Cargo.lock fuzz/Cargo.lock && (cd fuzz && cargo +nightly fetch).
(cd fuzz && cargo +nightly fetch --locked -q) || {
  echo "fuzz: fuzz/Cargo.lock needs updating (see the comment above this line in scripts/fuzz.sh)" >&2
  exit 1
}
drift=$(awk '
  FNR == 1 || /^\[\[package\]\]/ { name = "" }
  /^name = / { name = $3 }
  /^version = / && name != "" { if (FILENAME == ARGV[1]) main[name "@" $3] = 1; else fuzz[name "@" $3] = 1 }
  END {
    for (k in main) { split(k, a, "@"); names[a[1]] = 1 }
    for (k in fuzz) { split(k, a, "@"); if ((a[1] in names) && !(k in main)) print k }
  }' Cargo.lock fuzz/Cargo.lock | tr -d '"' | sort)
if [ -n "$drift" ]; then
  echo "fuzz: fuzz/Cargo.lock has versions the server's Cargo.lock does not:" $drift >&2
  echo "fuzz: cp Cargo.lock fuzz/Cargo.lock && (cd fuzz && cargo +nightly fetch)" >&2
  exit 1
fi
echo "fuzz: building ${#targets[@]} targets" >&2
# Optimized, with debug assertions and overflow checks (-a): an arithmetic overflow is a crash.
(cd fuzz && cargo +nightly fuzz build -O -a >&2)
# The targets run side by side, one per CPU (libFuzzer's process is single-threaded), each for
# EACH seconds: the same executions per target in less wall time.
parallel=$(nproc 2>/dev/null || echo 1)
logs=$(mktemp -d)
run_target() {
  local t=$1 status=0
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  (cd fuzz && cargo +nightly fuzz run -O -a "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$EACH" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048) \
      >"$logs/$t.log" 2>&1 || status=$?
  echo "$status" >"$logs/$t.status"
}
running=0
for t in "${targets[@]}"; do
  run_target "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true
total=0
failed=0
printf '%-14s %14s %10s\n' target executions crashes
for t in "${targets[@]}"; do
  log="$logs/$t.log"
  status=$(cat "$logs/$t.status" 2>/dev/null || echo 1)
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1 || true)
  execs=${execs:-0}
  crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
  printf '%-14s %14s %10s\n' "$t" "$execs" "$crashes"
  total=$((total + execs))
  if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    failed=1
    echo "fuzz: $t failed (exit $status); the end of its log:" >&2
    tail -n 40 "$log" >&2
  fi
done
rm -rf "$logs"
printf '%-14s %14s\n' total "$total"
exit "$failed"
