#!/usr/bin/env bash
# Prove the container image where no base image can be pulled and no container can start (this
# sandbox; CI): build an image FROM scratch holding the release binary and the shared libraries
# it loads, with podman; export its filesystem; start the server from it with chroot against the
# local PostgreSQL; check /health/ready, an event stored through it, and the image's own health
# check (`triggers probe`). Prints the image size and fails above 30 MB.
#
# The image users build is the Dockerfile's (Debian slim base, same binary); this one differs
# only in the base layer, so what runs here is what runs there.
#
#   bash scripts/image.sh            # needs root (apt for podman, chroot)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_cargo
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
need_packages podman podman
URL=$(bash scripts/postgres.sh db triggers_image)
cargo build -q --release --locked --bin triggers
work=$(mktemp -d)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  $SUDO rm -rf "$work"
}
trap cleanup EXIT

# The root filesystem: the binary, its loader and libraries (from ldd), a passwd entry for the
# non-root user. Nothing else: no shell, no package manager.
root="$work/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp"
cp target/release/triggers "$root/usr/local/bin/triggers"
for lib in $(ldd target/release/triggers | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
echo "nobody:x:65534:65534:nobody:/:/nonexistent" > "$root/etc/passwd"
echo "nogroup:x:65534:" > "$root/etc/group"
chmod 1777 "$root/tmp"
cat > "$work/Containerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
USER 65534:65534
ENV TRIGGERS_LISTEN=0.0.0.0:8080 TRIGGERS_METRICS_LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD ["/usr/local/bin/triggers", "probe"]
ENTRYPOINT ["/usr/local/bin/triggers"]
CMD ["serve"]
EOF
podman build -q --format docker -t localhost/triggers:scratch -f "$work/Containerfile" "$work" >&2
bytes=$(podman image inspect --format '{{.Size}}' localhost/triggers:scratch)
echo "image: localhost/triggers:scratch $(awk -v b="$bytes" 'BEGIN{printf "%.1f MB", b/1e6}') ($bytes bytes)"

# Its filesystem, as a container runtime would unpack it.
out="$work/exported"
mkdir -p "$out"
# (podman may complain that it has no systemd to time the health check: no container runs here.)
ctr=$(podman create localhost/triggers:scratch 2>/dev/null)
podman export "$ctr" | tar -x -C "$out"
podman rm "$ctr" >/dev/null 2>&1
[ -x "$out/usr/local/bin/triggers" ] || { echo "image: the binary is not in the image" >&2; exit 1; }
echo "image: exported filesystem: $(cd "$out" && find . -type f | sort | tr '\n' ' ')" >&2

# Start it from that filesystem: chroot, as the image's user, with the image's environment.
port=18180
CHROOT=$(command -v chroot)
env -i TRIGGERS_LISTEN=127.0.0.1:$port TRIGGERS_METRICS_LISTEN=127.0.0.1:$((port + 1)) \
  DATABASE_URL="$URL" "$CHROOT" --userspec=65534:65534 "$out" /usr/local/bin/triggers serve \
  > "$work/server.log" 2>&1 &
pid=$!
wait_ready "http://127.0.0.1:$port/health/ready" "$pid" "$work/server.log"
curl -fsS "http://127.0.0.1:$port/health/ready" >&2; echo >&2
key=$(curl -fsS -X POST "http://127.0.0.1:$port/api/keys/generate" -H 'Content-Type: application/json' \
  -d '{"organization_name": "image", "tier": "pro"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
status=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$port/api/events" \
  -H "X-API-Key: $key" -H 'Content-Type: application/json' -d '{"type": "image.check", "payload": {}}')
[ "$status" = 201 ] || { echo "image: POST /api/events answered $status" >&2; exit 1; }
env -i TRIGGERS_LISTEN=127.0.0.1:$port "$CHROOT" --userspec=65534:65534 "$out" \
  /usr/local/bin/triggers probe || { echo "image: its health check failed" >&2; exit 1; }
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
echo "image: started from the exported image: /health/ready 200, an event stored (201), health check ok"
limit=$((30 * 1000 * 1000))
[ "$bytes" -le "$limit" ] || { echo "image: $bytes bytes is over the 30 MB goal" >&2; exit 1; }
