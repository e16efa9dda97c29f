#!/usr/bin/env bash
# A PostgreSQL cluster on a small disk of its own, which can be filled: a real "No space left on
# device" for the disk-full drill (loadtest/faults.py) and test (tests/durability.rs).
#
#   scripts/small-disk.sh DIR PORT SIZE_MB
#
# Mounts a tmpfs of SIZE_MB at DIR/disk in a private mount namespace (as root `unshare -m`,
# otherwise a user namespace, `unshare -rm`), puts a fresh cluster's whole data directory on it,
# WAL included, starts PostgreSQL on 127.0.0.1:PORT and prints one line:
#   ready postgres://triggers@127.0.0.1:PORT/postgres
# Then it reads commands on stdin, one a line, and answers each with one line:
#   fill   write a ballast file until the disk has no space left     -> full <KiB free>
#   free   remove the ballast, wait until PostgreSQL accepts connections, and start it again if
#          the full disk stopped it                                  -> freed <restarted|running>
#   stop   (or the end of stdin) stop PostgreSQL and exit; the disk goes with the namespace
# PostgreSQL dies with this script (PR_SET_PDEATHSIG), so a test that is killed leaves no cluster
# behind. Exits 3, before "ready", where namespaces are not allowed.
#
# With SMALL_DISK_TLS=CERT_DIR, PostgreSQL also serves TLS with CERT_DIR's leaf.pem and leaf.key,
# takes the role `triggers_tls` over TLS only, and `triggers_scram` over TLS with a SCRAM password
# (channel binding), every other role as before: the database-over-TLS test (tests/ops.rs).
set -euo pipefail

DIR=${1:?DIR} PORT=${2:?PORT} SIZE=${3:?SIZE_MB}
DISK="$DIR/disk"
log() { echo "small-disk.sh: $*" >&2; }

if [ -z "${SMALL_DISK_INSIDE:-}" ]; then
  mkdir -p "$DISK"
  chmod go+rx "$DIR"
  export SMALL_DISK_INSIDE=1
  MOUNT='mount -t tmpfs -o "size=${3}m,mode=0777" triggers-small-disk "$1/disk"'
  if [ "$(id -u)" -eq 0 ] && unshare -m true 2>/dev/null; then
    exec unshare -m bash -c "$MOUNT"' && exec bash "$0" "$@"' "$0" "$@"
  elif unshare -rm true 2>/dev/null; then
    # Mounted as the namespace's root, then a namespace inside it maps this user back to itself
    # (root, without the right to mount here, to the postgres user): PostgreSQL refuses to run
    # as root.
    SMALL_DISK_UID=$(id -u) SMALL_DISK_GID=$(id -g)
    if [ "$SMALL_DISK_UID" -eq 0 ]; then
      SMALL_DISK_UID=$(id -u postgres) SMALL_DISK_GID=$(id -g postgres)
    fi
    export SMALL_DISK_UID SMALL_DISK_GID
    exec unshare -rm bash -c "$MOUNT"' && exec unshare --map-user="$SMALL_DISK_UID" --map-group="$SMALL_DISK_GID" bash "$0" "$@"' \
      "$0" "$@"
  fi
  log "mount namespaces are not allowed here"
  exit 3
fi

# PostgreSQL runs as another user when this runs as root: it needs to reach DIR (so DIR must not
# be under a directory only root may enter, such as a mktemp -d), and a working directory it may
# enter.
cd "$DIR"
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$BIN/postgres" ] || { log "PostgreSQL not found (run scripts/postgres.sh once)"; exit 1; }
AS=()
if [ "$(id -u)" -eq 0 ]; then
  chown postgres:postgres "$DISK"
  AS=(--reuid postgres --regid postgres --init-groups)
fi
as_pg() { setpriv "${AS[@]}" -- "$@"; }

as_pg "$BIN/initdb" -D "$DISK/data" -U triggers --auth=trust -E UTF8 --locale=C.UTF-8 \
  --wal-segsize=1 >/dev/null
TLS=()
if [ -n "${SMALL_DISK_TLS:-}" ]; then
  cp "$SMALL_DISK_TLS/leaf.pem" "$DISK/data/server.crt"
  cp "$SMALL_DISK_TLS/leaf.key" "$DISK/data/server.key"
  printf '%s\n' 'hostssl all triggers_tls 127.0.0.1/32 trust' \
    'hostnossl all triggers_tls 127.0.0.1/32 reject' \
    'hostssl all triggers_scram 127.0.0.1/32 scram-sha-256' 'host all all 127.0.0.1/32 trust' \
    >"$DISK/data/pg_hba.conf"
  chmod 600 "$DISK/data/server.key"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$DISK/data/server.crt" "$DISK/data/server.key" \
    "$DISK/data/pg_hba.conf"
  TLS=(-c ssl=on)
fi

PID=""
start() {
  # Small WAL (1 MB segments, recycled past 8 MB) so that the disk, not a WAL budget, runs out.
  setpriv "${AS[@]}" --pdeathsig KILL -- "$BIN/postgres" -D "$DISK/data" -p "$PORT" \
    -c listen_addresses=127.0.0.1 -c unix_socket_directories= -c max_connections=100 \
    -c shared_buffers=16MB -c min_wal_size=2MB -c max_wal_size=8MB "${TLS[@]}" \
    >>"$DIR/server.log" 2>&1 &
  PID=$!
  for _ in $(seq 600); do
    "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U triggers -d postgres && return 0
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.05
  done
  log "PostgreSQL did not start; $DIR/server.log:"
  tail -n 20 "$DIR/server.log" >&2
  return 1
}
stop() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -INT "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
}
trap stop EXIT

start
echo "ready postgres://triggers@127.0.0.1:$PORT/postgres"
while read -r command; do
  case "$command" in
    fill)
      dd if=/dev/zero of="$DISK/ballast" bs=64k status=none 2>/dev/null || true
      echo "full $(df --output=avail -k "$DISK" | tail -n 1 | tr -d ' ')"
      ;;
    free)
      rm -f "$DISK/ballast"
      # PostgreSQL may be on its way down still (a crash recovery whose checkpoint found no room
      # gives up): wait until it accepts connections, and start it again if it is gone.
      how=running
      for _ in $(seq 600); do
        "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U triggers -d postgres && break
        if ! kill -0 "$PID" 2>/dev/null; then
          wait "$PID" 2>/dev/null || true
          start
          how=restarted
          break
        fi
        sleep 0.05
      done
      echo "freed $how"
      ;;
    stop) break ;;
    *) echo "unknown command: $command" ;;
  esac
done
