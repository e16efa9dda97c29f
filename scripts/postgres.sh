#!/usr/bin/env bash
# Start (or reuse) a private PostgreSQL cluster for this project and print its URL on stdout.
#
#   scripts/postgres.sh            start if needed; print postgres://triggers@127.0.0.1:54329/triggers
#   scripts/postgres.sh stop [MODE]      stop it (MODE fast, the default, or immediate)
#   scripts/postgres.sh restart [MODE]   restart it (fault drills)
#   scripts/postgres.sh start            start it if needed (same as no argument)
#   scripts/postgres.sh db NAME          also (re)create database NAME and print its URL instead
#
# Installs Debian's `postgresql` package when no server binaries are found (root or sudo needed).
# The cluster lives in $TRIGGERS_PG_DIR (default /var/tmp/triggers-pg), listens on 127.0.0.1 and a
# Unix socket at $TRIGGERS_PG_PORT (default 54329), trusts local connections, and runs as the
# `postgres` user when started by root (PostgreSQL refuses to run as root).
set -euo pipefail

DIR=${TRIGGERS_PG_DIR:-/var/tmp/triggers-pg}
PORT=${TRIGGERS_PG_PORT:-54329}
log() { echo "postgres.sh: $*" >&2; }

find_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

BIN=$(find_bin)
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  log "PostgreSQL server not found; installing Debian's postgresql package"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2
  # The package's own cluster is not needed: keep it from being created and started.
  $SUDO mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.d/triggers.conf >/dev/null
  $SUDO apt-get install -y -qq postgresql >&2
  BIN=$(find_bin)
fi

AS=()
if [ "$(id -u)" -eq 0 ]; then
  AS=(runuser -u postgres --)
fi

pgctl() { "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" "$@"; }

if [ "${1:-}" = "stop" ]; then
  pgctl status >/dev/null 2>&1 && pgctl stop -m "${2:-fast}" -w >&2
  exit 0
fi
if [ "${1:-}" = "restart" ]; then
  pgctl restart -m "${2:-fast}" -w -t 60 -l "$DIR/server.log" >&2
  exit 0
fi

mkdir -p "$DIR"
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$DIR"
if [ ! -f "$DIR/data/PG_VERSION" ]; then
  log "initializing a cluster in $DIR/data"
  "${AS[@]}" "$BIN/initdb" -D "$DIR/data" -U triggers --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
fi
if ! pgctl status >/dev/null 2>&1; then
  log "starting PostgreSQL on 127.0.0.1:$PORT"
  # max_wal_size 8GB: sustained batch ingest writes ~150 MB/s of WAL; with Debian's 1 GB a
  # checkpoint is forced every few seconds (p99 per batch 200+ ms, BENCHMARKS.md). WAL only grows
  # that far under such load; tests never come near it.
  pgctl -l "$DIR/server.log" -w -t 60 start -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=400 -c shared_buffers=256MB -c max_wal_size=8GB" >&2
fi

PSQL=("$BIN/psql" -h 127.0.0.1 -p "$PORT" -U triggers -v ON_ERROR_STOP=1 -qAt)
DB=triggers
if [ "${1:-}" = "db" ]; then
  DB=${2:?database name}
  "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >&2
fi
if [ -z "$("${PSQL[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" ]; then
  "${PSQL[@]}" -d postgres -c "CREATE DATABASE \"$DB\"" >&2
fi
echo "postgres://triggers@127.0.0.1:$PORT/$DB"
