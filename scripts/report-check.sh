#!/usr/bin/env bash
# Checks a load-test report (loadtest/run.sh ... --report DIR) the way a reader sees it: renders
# DIR/index.html in headless Chromium (Debian's `chromium`, installed when missing), saves the
# screenshot as DIR/screenshot.png, and fails unless every expected chart is in the page and the
# screenshot shows them: the charts' blue and red lines are drawn, and the page is not blank.
#   bash scripts/report-check.sh DIR [CHART ...]   # default charts: latency achieved connections cpu lag
set -euo pipefail
dir=${1:?usage: report-check.sh DIR [CHART ...]}
shift
charts=("$@")
[ ${#charts[@]} -gt 0 ] || charts=(latency achieved connections cpu lag)
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "report-check: installing chromium" >&2
  $SUDO apt-get update -qq >&2 && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
  browser=$(command -v chromium)
fi
[ -f "$dir/index.html" ] || { echo "report-check: $dir/index.html is missing" >&2; exit 1; }
for c in "${charts[@]}"; do
  [ -s "$dir/$c.svg" ] || { echo "report-check: chart $c.svg is missing" >&2; exit 1; }
  grep -q "<figure id=\"$c\"><svg" "$dir/index.html" || { echo "report-check: chart $c is not in the page" >&2; exit 1; }
done
abs=$(cd "$dir" && pwd)
height=$(( 440 * ${#charts[@]} + 1200 ))
# The DOM after Chromium parsed and laid out the page: every chart is an SVG element it built.
"$browser" --headless --no-sandbox --disable-gpu --dump-dom "file://$abs/index.html" 2>/dev/null > "$abs/dom.html"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,$height \
  --screenshot="$abs/screenshot.png" "file://$abs/index.html" >/dev/null 2>&1
python3 - "$abs" "${#charts[@]}" <<'EOF'
import struct, sys, zlib

out, want = sys.argv[1], int(sys.argv[2])
dom = open(f"{out}/dom.html").read()
svgs = dom.count("<svg")
if svgs < want:
    sys.exit(f"report-check: Chromium's DOM holds {svgs} SVG charts, expected {want}")


def pixels(path):
    """Decodes an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes) into rows of bytes."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, head = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, color, _, _, interlace = head
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unexpected PNG format {head}"
    bpp = 3 if color == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), w * bpp, [], bytearray(w * bpp)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


w, h, bpp, rows = pixels(f"{out}/screenshot.png")
near = lambda px, rgb: all(abs(px[k] - rgb[k]) <= 12 for k in range(3))
blue = red = ink = 0
for row in rows:
    for x in range(0, w * bpp, bpp):
        px = row[x:x + 3]
        if px != b"\xff\xff\xff":
            ink += 1
            if near(px, (0x1f, 0x77, 0xb4)):
                blue += 1
            elif near(px, (0xd6, 0x27, 0x28)):
                red += 1
share = ink / (w * h)
print(f"report-check: {svgs} charts in the DOM; screenshot {w}x{h}: {share:.1%} of pixels drawn, "
      f"{blue} blue and {red} red chart pixels")
if share < 0.01 or blue < 500 or red < 500:
    sys.exit("report-check: the screenshot does not show the charts")
EOF
echo "report-check: $abs/screenshot.png"
