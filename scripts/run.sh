#!/usr/bin/env bash
# Build rimg (release) and run the main job: a real `convert`.
#   scripts/run.sh                 make a 2 GiB test image (25% data) and convert it
#   scripts/run.sh SRC DST [ARGS]  rimg convert ARGS SRC DST
# The result is checked with the real `qemu-img compare` when qemu-img is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p rimg-cli
RIMG="$PWD/target/release/rimg"

if [ $# -ge 2 ]; then
    src=$1 dst=$2
    shift 2
    "$RIMG" convert -p "$@" "$src" "$dst"
else
    dir=$(mktemp -d)
    trap 'rm -rf "$dir"' EXIT
    src=$dir/source.raw dst=$dir/converted.raw
    "$RIMG" create -q -f raw "$src" 2G
    # Fill every fourth MiB with pseudo-random data; the rest stays a hole.
    python3 - "$src" <<'PY'
import os, sys, random
rnd = random.Random(1)
with open(sys.argv[1], "r+b") as f:
    for mib in range(0, 2048, 4):
        f.seek(mib << 20)
        f.write(rnd.randbytes(1 << 20))
PY
    "$RIMG" info "$src"
    echo "rimg convert -p -f raw -O raw $src $dst"
    time "$RIMG" convert -p -f raw -O raw "$src" "$dst"
    "$RIMG" info "$dst"
fi
if command -v qemu-img >/dev/null 2>&1 && [ -f "$dst" ]; then
    echo "checking with the real qemu-img:"
    qemu-img compare "$src" "$dst"
fi
