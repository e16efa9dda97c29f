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
