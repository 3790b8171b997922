#!/usr/bin/env bash
# qcow2 workloads, rimg vs qemu-img, alternating, median of N runs (default 3).
#   perf-scripts/qcow2-side-by-side.sh [RUNS] [SIZE_MIB]
# Prints one line per workload: median seconds of each tool and the ratio qemu-img/rimg.
set -euo pipefail
runs=${1:-3}
mib=${2:-1024}
root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p rimg-cli
R="${RIMG:-$root/target/release/rimg}"
Q="${QEMU_IMG:-qemu-img}"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"

python3 - "$mib" <<'PY'
import os, random, sys
mib = int(sys.argv[1]); rnd = random.Random(7)
with open("dense.raw", "wb") as f:
    for _ in range(mib): f.write(os.urandom(1 << 20))
with open("sparse.raw", "wb") as f:
    f.truncate(mib << 20)
    for i in range(0, mib, 4):
        f.seek(i << 20); f.write(os.urandom(1 << 20))
words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 10))) for _ in range(4000)]
with open("text.raw", "wb") as f:
    n = 0
    while n < (mib << 19):
        chunk = b" ".join(rnd.choice(words) for _ in range(20000)) + b"\n"
        f.write(chunk); n += len(chunk)
    f.truncate(mib << 19)
PY
"$Q" convert -f raw -O qcow2 dense.raw dense.qcow2
"$Q" convert -f raw -O qcow2 text.raw text.qcow2
"$Q" convert -c -f raw -O qcow2 text.raw textc.qcow2

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }

run() {
    local name=$1; shift
    local rt=() qt=()
    for i in $(seq "$runs"); do
        rm -f out.*
        if [ $((i % 2)) = 1 ]; then
            rt+=("$(t "$R" "$@")"); rm -f out.*; qt+=("$(t "$Q" "$@")")
        else
            qt+=("$(t "$Q" "$@")"); rm -f out.*; rt+=("$(t "$R" "$@")")
        fi
    done
    local rm qm
    rm=$(printf '%s\n' "${rt[@]}" | median)
    qm=$(printf '%s\n' "${qt[@]}" | median)
    printf '%-28s rimg %7.3fs  qemu-img %7.3fs  ratio %5.2fx\n' "$name" "$rm" "$qm" "$(echo "$qm / $rm" | bc -l)"
}

echo "size ${mib} MiB, ${runs} alternating runs each, median wall time"
run "raw->qcow2 dense"          convert -f raw -O qcow2 dense.raw out.qcow2
run "raw->qcow2 25% sparse"     convert -f raw -O qcow2 sparse.raw out.qcow2
run "qcow2->raw"                convert -f qcow2 -O raw dense.qcow2 out.raw
run "qcow2->qcow2 -c zlib"      convert -c -f qcow2 -O qcow2 text.qcow2 out.qcow2
run "qcow2->qcow2 -c zstd"      convert -c -o compression_type=zstd -f qcow2 -O qcow2 text.qcow2 out.qcow2
run "compressed qcow2->raw"     convert -f qcow2 -O raw textc.qcow2 out.raw
run "compare qcow2 vs raw"      compare -f qcow2 -F raw dense.qcow2 dense.raw
