#!/usr/bin/env bash
# Build the server for 64-bit ARM (aarch64-unknown-linux-gnu) on an x86-64 Debian/Ubuntu box and
# check it under emulation: Debian's rustc-web/cargo-web with the arm64 standard library
# (multiarch), the aarch64 GNU cross linker, and qemu-user.
#
#   1. installs what it needs (apt; adds the arm64 architecture);
#   2. builds the release binary for aarch64 (target/arm64/aarch64-unknown-linux-gnu/release/);
#   3. runs the unit tests for aarch64 under qemu-aarch64;
#   4. smoke-runs the aarch64 server under qemu against the local PostgreSQL: a key, a webhook to
#      a local receiver, events in, the inbox, every event delivered and signed, the metrics.
#
# Where qemu-user cannot start threads (seen in some sandboxes: qemu 7.2 spins forever in glibc's
# pthread_create, even for a five-line C program, which the script tries first), the unit tests
# and the smoke run are skipped and said so; the single-threaded checks still run: --version,
# --help, a bad configuration refused, and the aarch64 `triggers probe` against a live server.
#
# io_uring is usually missing under qemu-user, so the server's epoll fallback is what runs there;
# on real ARM hardware (Raspberry Pi OS 64-bit, Graviton) the same binary uses io_uring when the
# kernel allows it. On an ARM box itself none of this is needed: `bash scripts/run.sh` builds
# natively.
#
#   bash scripts/arm64.sh           # ~15-25 min on 2 cores, most of it the two builds
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
TARGET=aarch64-unknown-linux-gnu
started=$(date +%s)

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  $SUDO dpkg --add-architecture arm64
fi
if ! dpkg -s cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu qemu-user >/dev/null 2>&1; then
  echo "arm64: installing rustc-web, cargo-web, libstd-rust-web-dev:arm64, gcc-aarch64-linux-gnu, qemu-user" >&2
  $SUDO apt-get update -qq >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rustc-web cargo-web libstd-rust-web-dev:arm64 \
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user curl python3 >&2
fi
CARGO=$(dpkg -L cargo-web | grep -E '/bin/cargo$' | head -1)
RUSTC_WEB=$(dpkg -L rustc-web | grep -E '/bin/rustc$' | head -1)
[ -x "$CARGO" ] && [ -x "$RUSTC_WEB" ] || { echo "arm64: cargo-web or rustc-web not found" >&2; exit 1; }
echo "arm64: $("$RUSTC_WEB" --version), $("$CARGO" --version)" >&2
installed=$(date +%s)

export RUSTC="$RUSTC_WEB"
export CARGO_TARGET_DIR=target/arm64
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
QEMU="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$QEMU"

"$CARGO" build -q --release --locked --target $TARGET --bin triggers
BIN="$CARGO_TARGET_DIR/$TARGET/release/triggers"
file "$BIN" 2>/dev/null >&2 || true
built=$(date +%s)

# Unit tests, built for aarch64 (the integration tests start in-process servers that need the
# whole host set-up; the smoke run below covers the server end to end).
"$CARGO" test -q --locked --target $TARGET --lib --no-run 2>&1 | tail -n 3 >&2
TESTS=$(ls -t "$CARGO_TARGET_DIR/$TARGET/debug/deps/"triggers-* | grep -v '\.d$' | head -1)

# Single-threaded checks under qemu: the binary starts, parses its configuration, refuses a bad
# one, and (below) its health probe (plain TCP) talks to a server on this machine.
$QEMU "$BIN" --version >&2
$QEMU "$BIN" --help | grep -q -- '--retention-days'
if $QEMU "$BIN" serve --retention-days 99999 >/dev/null 2>&1; then
  echo "arm64: a bad configuration was taken" >&2; exit 1
fi

# Can qemu-user start a thread here? Some sandboxes' qemu-user 7.2 spins forever in glibc's
# pthread_create (a five-line C program shows it); then nothing threaded can run under it.
probe_c="${TMPDIR:-/tmp}/arm64-thread.c"
printf '%s\n' '#include <pthread.h>' 'static void *f(void *a) { return a; }' \
  'int main(void) { pthread_t t; return pthread_create(&t, 0, f, 0) || pthread_join(t, 0); }' > "$probe_c"
aarch64-linux-gnu-gcc -O1 -pthread -o "${probe_c%.c}" "$probe_c"
THREADS=1
timeout 20 $QEMU "${probe_c%.c}" || THREADS=0
if [ "$THREADS" = 1 ]; then
  timeout 1800 $QEMU "$TESTS" -q 2>&1 | tail -n 3 >&2
else
  echo "arm64: qemu-user on this machine cannot start a thread (pthread_create never returns," \
    "even in a five-line C program): the unit tests and the server smoke run need threads and" \
    "are skipped; the single-threaded checks still run" >&2
fi
tested=$(date +%s)

# Smoke run under qemu against the local PostgreSQL.
. scripts/common.sh
if [ "$THREADS" != 1 ]; then
  # The aarch64 binary's own health probe against the x86-64 server of this machine (built by
  # the host toolchain into the usual target/, not with the settings above).
  (unset RUSTC CARGO_TARGET_DIR; cargo build -q --release --locked --bin triggers)
  URL=$(bash scripts/postgres.sh db triggers_arm64)
  ./target/release/triggers serve --database-url "$URL" --listen 127.0.0.1:18480 \
    --metrics-listen 127.0.0.1:18481 --log warn >/dev/null 2>&1 &
  host=$!
  wait_ready http://127.0.0.1:18480/health "$host" /dev/null
  $QEMU "$BIN" probe --listen 127.0.0.1:18480 || { kill $host; echo "arm64: probe failed" >&2; exit 1; }
  kill $host; wait $host 2>/dev/null || true
  echo "arm64: aarch64 release binary and unit tests built; under qemu: --version, --help, a bad" \
    "configuration refused, triggers probe against a live server ok; unit tests and the server" \
    "smoke run skipped (qemu-user here cannot start threads)"
  echo "arm64: install $((installed - started)) s, release build $((built - installed)) s," \
    "tests build and checks $((tested - built)) s"
  exit 0
fi
URL=$(bash scripts/postgres.sh db triggers_arm64)
port=18480
work=$(mktemp -d)
server=""; receiver=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null
  [ -n "$receiver" ] && kill "$receiver" 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cat > "$work/receiver.py" <<'EOF'
import http.server, json, sys
seen = open(sys.argv[2], "a")
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        seen.write(json.dumps({"id": self.headers.get("webhook-id"),
                               "signature": self.headers.get("webhook-signature"),
                               "body": body.decode()}) + "\n")
        seen.flush()
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
EOF
python3 "$work/receiver.py" $((port + 2)) "$work/received.jsonl" &
receiver=$!
$QEMU "$BIN" serve --database-url "$URL" --listen 127.0.0.1:$port \
  --metrics-listen 127.0.0.1:$((port + 1)) --allow-private-webhooks > "$work/server.log" 2>&1 &
server=$!
wait_ready "http://127.0.0.1:$port/health/ready" "$server" "$work/server.log"
api() { curl -fsS "$@"; }
key=$(api -X POST "http://127.0.0.1:$port/api/keys/generate" -H 'Content-Type: application/json' \
  -d '{"organization_name": "arm64", "tier": "pro"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
api -X POST "http://127.0.0.1:$port/api/webhook/config" -H "X-API-Key: $key" -H 'Content-Type: application/json' \
  -d "{\"webhook_url\": \"http://127.0.0.1:$((port + 2))/hook\"}" >/dev/null
n=50
for i in $(seq 1 $n); do
  api -X POST "http://127.0.0.1:$port/api/events" -H "X-API-Key: $key" -H 'Content-Type: application/json' \
    -d "{\"type\": \"arm64.check\", \"payload\": {\"i\": $i}, \"dedup_id\": \"arm-$i\"}" >/dev/null
done
status=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$port/api/events" -H "X-API-Key: $key" \
  -H 'Content-Type: application/json' -d '{"type": "arm64.check", "payload": {}, "dedup_id": "arm-1"}')
[ "$status" = 409 ] || { echo "arm64: a repeated dedup_id answered $status" >&2; exit 1; }
for _ in $(seq 1 150); do
  [ "$(wc -l < "$work/received.jsonl" 2>/dev/null || echo 0)" -ge $n ] && break
  sleep 0.2
done
got=$(wc -l < "$work/received.jsonl")
[ "$got" -ge $n ] || { tail -20 "$work/server.log" >&2; echo "arm64: $got of $n deliveries" >&2; exit 1; }
grep -c '"v1,' "$work/received.jsonl" >/dev/null || { echo "arm64: unsigned deliveries" >&2; exit 1; }
for _ in $(seq 1 50); do
  delivered=$(api "http://127.0.0.1:$port/api/inbox?status=delivered&limit=1000" -H "X-API-Key: $key" \
    | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["events"]))')
  [ "$delivered" -ge $n ] && break
  sleep 0.2
done
[ "$delivered" -ge $n ] || { echo "arm64: the inbox shows $delivered of $n delivered" >&2; exit 1; }
committed=$(api "http://127.0.0.1:$((port + 1))/metrics" | awk '/^triggers_events_committed_total /{print $2}')
driver=$(grep -o '"io_driver[^,}]*' "$work/server.log" | tail -1)
echo "arm64: $($QEMU "$BIN" --version) under qemu: $n events in (1 duplicate 409), $got deliveries signed, inbox $delivered delivered," \
  "metrics committed $committed, $driver"
echo "arm64: install $((installed - started)) s, release build $((built - installed)) s," \
  "unit tests $((tested - built)) s, smoke $(( $(date +%s) - tested )) s"
