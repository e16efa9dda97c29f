#!/usr/bin/env bash
# Check deploy/systemd/triggers.service, the unit an operator installs on a box of their own:
#  1. `systemd-analyze verify` (its syntax, and that its command runs), on a copy pointing at the
#     release binary and the example environment file;
#  2. `systemd-analyze security --offline`: the sandbox's exposure stays at most 2.0 of 10 ("OK";
#     `--threshold` counts in tenths);
#  3. the sandbox lets the server do its work: the release server runs under strace with the unit's
#     command line and the example environment file (the database URL and ports made local), takes
#     a key, an endpoint by host name and events, delivers them, and stops on SIGTERM; every system
#     call it made must be in the unit's SystemCallFilter (@system-service without @privileged),
#     and every socket family in its RestrictAddressFamilies.
# systemd itself need not run here (no unit is started); where ptrace is not allowed, step 3 says
# SKIPPED.
#   bash scripts/systemd-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
need_packages systemd-analyze systemd
need_packages strace strace
UNIT=deploy/systemd/triggers.service
ENVFILE=deploy/systemd/triggers.env
BIN=$PWD/target/release/triggers
cargo build -q --release --locked --bin triggers
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1 and 2.
sed -e "s|^ExecStart=/usr/local/bin/triggers|ExecStart=$BIN|" \
    -e "s|^EnvironmentFile=.*|EnvironmentFile=$PWD/$ENVFILE|" "$UNIT" > "$work/triggers.service"
systemd-analyze verify "$work/triggers.service"
systemd-analyze security --offline=yes --threshold=20 "$work/triggers.service" | tail -1

# 3. The allowed system calls, groups expanded.
expand() {
  systemd-analyze syscall-filter "$1" | sed -n '2,$p' | awk '$1 !~ /^#/ && NF {print $1}' |
    while read -r x; do case $x in @*) expand "$x" ;; *) echo "$x" ;; esac; done
}
allow=$(grep '^SystemCallFilter=@' "$UNIT" | cut -d= -f2)
deny=$(grep '^SystemCallFilter=~' "$UNIT" | cut -d= -f2 | tr -d '~')
expand "$allow" | sort -u > "$work/allowed"
expand "$deny" | sort -u > "$work/denied"
families=$(grep '^RestrictAddressFamilies=' "$UNIT" | cut -d= -f2)
if ! strace -f -qq -o /dev/null true 2>/dev/null; then
  echo "systemd-check: SKIPPED the system-call check: ptrace is not allowed here" >&2
  echo "systemd-check: the unit verifies and its exposure is OK"
  exit 0
fi
URL=$(bash scripts/postgres.sh db triggers_systemd)
port=18480
# A receiver for the deliveries.
python3 - "$((port + 2))" > "$work/receiver.log" 2>&1 <<'PY' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
        print("delivered", self.headers.get("x-event-id"), flush=True)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
receiver=$!
# The unit's environment: the example file, with what must be local here put over it.
set -a
# shellcheck disable=SC1090
. "$ENVFILE"
set +a
export DATABASE_URL=$URL TRIGGERS_LISTEN=127.0.0.1:$port TRIGGERS_METRICS_LISTEN=127.0.0.1:$((port + 1))
export TRIGGERS_ALLOW_PRIVATE_WEBHOOKS=true
cmd=$(grep '^ExecStart=' "$UNIT" | cut -d= -f2- | sed "s|^/usr/local/bin/triggers|$BIN|")
# shellcheck disable=SC2086
strace -f -qq -o "$work/strace" $cmd > "$work/server.log" 2>&1 &
pid=$!
trap 'kill $pid $receiver 2>/dev/null; rm -rf "$work"' EXIT
wait_ready "http://127.0.0.1:$port/health/ready" "$pid" "$work/server.log"
api=http://127.0.0.1:$port
key=$(curl -fsS -X POST $api/api/keys/generate -H "Authorization: Bearer $TRIGGERS_ADMIN_TOKEN" \
  -H 'Content-Type: application/json' -d '{"organization_name": "systemd", "tier": "pro"}' |
  python3 -c 'import sys,json; print(json.load(sys.stdin)["api_key"])')
curl -fsS -o /dev/null -X POST $api/api/endpoints -H "X-API-Key: $key" -H 'Content-Type: application/json' \
  -d "{\"url\": \"http://localhost:$((port + 2))/in\"}"
for n in 1 2 3; do
  curl -fsS -o /dev/null -X POST $api/api/events -H "X-API-Key: $key" -H 'Content-Type: application/json' \
    -d "{\"type\": \"t\", \"payload\": {\"n\": $n}}"
done
for _ in $(seq 1 100); do
  [ "$(grep -c delivered "$work/receiver.log" || true)" -ge 3 ] && break
  sleep 0.2
done
[ "$(grep -c delivered "$work/receiver.log" || true)" -ge 3 ] || { cat "$work/server.log" >&2; echo "not delivered" >&2; exit 1; }
curl -fsS -o /dev/null "http://127.0.0.1:$((port + 1))/metrics"
# The server, not strace (which holds fatal signals while it writes to a file), gets the SIGTERM.
kill -TERM "$(pgrep -P $pid)"
wait $pid || { cat "$work/server.log" >&2; echo "the server did not stop cleanly" >&2; exit 1; }
# Every call made (strace writes `name(` after the pid, or `<... name resumed>`).
sed -nE 's/^[0-9]+ +(<\.\.\. )?([a-z0-9_]+)[( ].*/\2/p' "$work/strace" | sort -u > "$work/used"
bad=$(comm -23 "$work/used" "$work/allowed"; comm -12 "$work/used" "$work/denied")
if [ -n "$bad" ]; then
  echo "systemd-check: system calls the unit's filter refuses: $(echo $bad)" >&2
  exit 1
fi
for f in $(grep -oE 'socket\((AF_[A-Z0-9]+)' "$work/strace" | cut -d'(' -f2 | sort -u); do
  case " $families " in *" $f "*) ;; *) echo "systemd-check: socket family $f is not in RestrictAddressFamilies" >&2; exit 1 ;; esac
done
echo "systemd-check: the unit verifies, its exposure is OK, and the server made $(wc -l < "$work/used") kinds of system call, all allowed, over $(grep -oE 'socket\((AF_[A-Z0-9]+)' "$work/strace" | cut -d'(' -f2 | sort -u | tr '\n' ' ')"
