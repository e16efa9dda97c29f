#!/usr/bin/env bash
# Measure on a machine that can install nothing (no registries): carry this box's PostgreSQL, psql
# and wrk there as one archive, with the shared libraries they need that such a machine may lack.
#
#   bash loadtest/bundle.sh make DIR      # here: DIR/bundle.tar.xz (~25 MB), from Debian's packages
#   bash loadtest/bundle.sh unpack DIR    # there, as root: unpack it to the same paths, then
#                                         #   export LD_LIBRARY_PATH=/opt/triggers-libs
#                                         #   python3 loadtest/run.py cores ... (no cargo needed;
#                                         #   carry target/release/triggers and the examples it runs)
#
# The libraries go to /opt/triggers-libs, and `unpack` keeps only those whose soname the machine
# does not already have, so its own programs keep their own libraries. glibc is never carried: the
# other machine's must be as new as this one's (2.36) or newer. `unpack` also creates the `postgres`
# user that scripts/postgres.sh runs the cluster as.
set -euo pipefail
cmd=${1:?make or unpack}
dir=${2:?a directory}
LIBS=/opt/triggers-libs
PG=/usr/lib/postgresql/15

case "$cmd" in
make)
  [ -x "$PG/bin/postgres" ] || bash "$(dirname "$0")/../scripts/postgres.sh" >/dev/null
  command -v wrk >/dev/null || { echo "bundle: wrk is not installed (apt-get install wrk)" >&2; exit 1; }
  mkdir -p "$dir"
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  files=("$PG/bin/postgres" "$PG/bin/initdb" "$PG/bin/pg_ctl" "$PG/bin/psql" "$(command -v wrk)")
  # The server's modules, less LLVM's JIT (run.py's cluster never needs it; it is most of the size).
  mapfile -t modules < <(ls "$PG"/lib/*.so | grep -v llvmjit)
  for f in "${files[@]}" "${modules[@]}"; do
    mkdir -p "$stage$(dirname "$f")"
    cp -p "$f" "$stage$f"
  done
  mkdir -p "$stage/usr/share/postgresql" "$stage/usr/share/zoneinfo"
  cp -a /usr/share/postgresql/15 "$stage/usr/share/postgresql/"
  cp -a /usr/share/zoneinfo/UTC /usr/share/zoneinfo/Etc "$stage/usr/share/zoneinfo/"
  mkdir -p "$stage$LIBS"
  ldd "${files[@]}" "${modules[@]}" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u |
    grep -Ev '/(libc|libm|libpthread|libdl|librt|libresolv|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$stage$LIBS/"; done
  # Its top folders by name, never `.`: unpacked at /, `.` would give / the stage's mode (0700).
  tar -C "$stage" -cJf "$dir/bundle.tar.xz" usr opt
  du -h "$dir/bundle.tar.xz" >&2
  ;;
unpack)
  [ "$(id -u)" -eq 0 ] || { echo "bundle: unpack needs root" >&2; exit 1; }
  # Python's tarfile: the other machine may lack xz.
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall("/", filter="fully_trusted")' \
    "$dir/bundle.tar.xz"
  for lib in "$LIBS"/*; do
    if ldconfig -p | grep -q "^[[:space:]]*$(basename "$lib") "; then rm -f "$lib"; fi
  done
  echo "bundle: carried libraries kept: $(ls "$LIBS" | tr '\n' ' ')" >&2
  if ! id postgres >/dev/null 2>&1; then
    useradd -r -M -d /var/tmp -s /bin/sh postgres 2>/dev/null || {
      echo "postgres:x:999:999::/var/tmp:/bin/sh" >>/etc/passwd
      echo "postgres:x:999:" >>/etc/group
    }
  fi
  ;;
*)
  echo "bundle: make DIR or unpack DIR" >&2
  exit 1
  ;;
esac
