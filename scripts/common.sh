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
