#!/usr/bin/env bash
# Profile-guided build driven by a load-test scenario, and the measured gain.
#   bash pgo/build.sh [scenario (default ingest-max)] [--duration 20s]
# 1. build the server instrumented (-Cprofile-generate) and run the scenario against it;
# 2. merge the profile with an llvm-profdata of the LLVM version rustc is built on;
# 3. rebuild with -Cprofile-use into target/pgo/release/triggers;
# 4. run the scenario with the plain release build and the PGO build, alternating three times each,
#    and print both medians and the gain.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
SCENARIO=${1:-ingest-max}
shift || true
LLVM=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
find_profdata() {
  for c in "llvm-profdata-$LLVM" "/usr/lib/llvm-$LLVM/bin/llvm-profdata" llvm-profdata \
           "$(ls ~/.rustup/toolchains/*/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1)"; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 || continue
    if "$c" merge --version 2>/dev/null | grep -q "LLVM version $LLVM\."; then echo "$c"; return; fi
  done
}
PROFDATA=$(find_profdata || true)
if [ -z "$PROFDATA" ]; then
  echo "pgo: rustc uses LLVM $LLVM; installing Debian's llvm-$LLVM for a matching llvm-profdata" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >&2 || true
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$LLVM" >&2 || true
  PROFDATA=$(find_profdata || true)
fi
if [ -z "$PROFDATA" ]; then
  echo "pgo: need llvm-profdata from LLVM $LLVM (rustc -vV says so): apt-get install llvm-$LLVM," >&2
  echo "     or rustup component add llvm-tools; none was found or could be installed" >&2
  exit 2
fi
echo "pgo: using $PROFDATA (LLVM $LLVM)" >&2
OUT=$PWD/pgo/out
rm -rf "$OUT/raw" && mkdir -p "$OUT/raw"
echo "pgo: instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$OUT/raw" cargo build -q --release --locked --bin triggers --target-dir target/pgo-gen
bash loadtest/run.sh "$SCENARIO" --no-ceiling --duration 20s "$@" --server-bin "$PWD/target/pgo-gen/release/triggers"
"$PROFDATA" merge -o "$OUT/merged.profdata" "$OUT"/raw/*.profraw
echo "pgo: optimized build with the profile" >&2
RUSTFLAGS="-Cprofile-use=$OUT/merged.profdata" cargo build -q --release --locked --bin triggers --target-dir target/pgo
echo "pgo: measuring: plain release (A) against PGO (B)" >&2
bash loadtest/run.sh "$SCENARIO" --no-ceiling --duration 20s "$@" --repeat 3 \
  --server-bin "$PWD/target/release/triggers" --against "$PWD/target/pgo/release/triggers"
echo "pgo: the PGO binary is target/pgo/release/triggers" >&2
