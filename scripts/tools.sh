#!/usr/bin/env bash
# Install, ahead of time, what the stages of scripts/test.sh need and a fresh machine lacks, so
# that test.sh can do it while its first stages run. Each stage's own script still installs what is
# missing when run alone; this only does it sooner, and once.
#
#   bash scripts/tools.sh packages [fuzz] [loadtest] [faults] [image]
#       Debian's packages (one `apt-get update`) and the Python tools (schemathesis, k6): mostly
#       downloads. `faketime`, `promtool`, `strace` and `systemd-analyze` always; the rest for the
#       stages named.
#   bash scripts/tools.sh builds [fuzz] [loadtest]
#       What is built from source: the nightly toolchain and cargo-fuzz (fuzz), drill (loadtest);
#       about 7 minutes of CPU on 2 cores, so test.sh runs it at the lowest priority, on the CPU
#       that the tests and their servers leave idle.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
what=$1
shift
stages=" $* "
has() { command -v "$1" >/dev/null 2>&1; }
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
case "$what" in
  packages)
    plain=() full=()
    has faketime || plain+=(faketime)
    has promtool || plain+=(prometheus)
    has strace || plain+=(strace)
    has systemd-analyze || plain+=(systemd)
    has python3 || plain+=(python3 python3-pip)
    if [[ $stages == *" loadtest "* ]]; then
      has wrk || full+=(wrk)
      has chromium || has chromium-browser || full+=(chromium)
    fi
    if [[ $stages == *" faults "* ]] && ! has haproxy; then full+=(haproxy); fi
    if [[ $stages == *" image "* ]] && ! has podman; then plain+=(podman); fi
    if [ $((${#plain[@]} + ${#full[@]})) -gt 0 ]; then
      echo "tools: installing ${plain[*]} ${full[*]}" >&2
      export DEBIAN_FRONTEND=noninteractive
      $SUDO apt-get update -qq >&2
      # As each stage's script installs them: its own few without recommended packages; wrk,
      # haproxy and chromium (whose recommended fonts the report check draws with) with them.
      [ ${#plain[@]} -eq 0 ] || $SUDO apt-get install -y -qq --no-install-recommends "${plain[@]}" >&2
      [ ${#full[@]} -eq 0 ] || $SUDO apt-get install -y -qq "${full[@]}" >&2
      if [[ " ${plain[*]} " == *" prometheus "* ]]; then no_prometheus_service; fi
    fi
    need_schemathesis
    if [[ $stages == *" loadtest "* || $stages == *" faults "* ]]; then need_k6; fi
    ;;
  builds)
    if [[ $stages == *" fuzz "* ]]; then need_cargo_fuzz; fi
    if [[ $stages == *" loadtest "* ]]; then need_drill; fi
    ;;
  *)
    echo "usage: bash scripts/tools.sh packages|builds [fuzz] [loadtest] [faults] [image]" >&2
    exit 2
    ;;
esac
