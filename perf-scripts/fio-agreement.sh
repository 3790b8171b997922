#!/usr/bin/env bash
# Does `rimg bench` agree with fio? Both run on the same file with the same parameters, alternately,
# and the median IOPS of each and the difference are printed (target: within 10 %). A benchmark, not a
# unit test: run it on a quiet machine.
#
#   perf-scripts/fio-agreement.sh [--size 1G] [--runs 7] [--dir DIR] [--quick] [--rimg PATH]
#
# Cases (fio: one job, the same queue depth; rimg: its default shards):
#   randread-4k-qd32-direct   4 KiB random reads, queue depth 32, O_DIRECT, io_uring
#   write-1m-qd4-direct       1 MiB sequential writes, queue depth 4, O_DIRECT, io_uring, the
#                             file written 4 times over (a run of one pass lasts ~0.5 s here,
#                             too short for fio's millisecond clock)
#   read-4k-qd1-cached        4 KiB sequential reads, queue depth 1, through the (warm) page
#                             cache, the file read 4 times over; fio runs with --invalidate=0,
#                             since by default it drops the file's cached pages before a job
# Memory: rimg's buffers sit in 2 MiB huge pages (so a 1 MiB O_DIRECT request is one memory segment;
# in 4 KiB pages it is 256, more than a virtio disk takes, and the kernel splits it in two). fio gets
# the same with --mem=mmaphuge: the script reserves a few huge pages (vm.nr_hugepages, root only) for
# the run and puts the old count back at the end; without them fio uses malloc and says so.
# Exits 0 when every case is within 10 %, 1 otherwise, 2 on a setup error. Installs fio with apt-get
# if it is missing.
set -euo pipefail

size=1G
runs=7
dir=
rimg=${RIMG:-}
n4k=131072
while [ $# -gt 0 ]; do
    case $1 in
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --rimg) rimg=$2; shift 2 ;;
    --quick) size=128M; runs=1; n4k=16384; shift ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fio-agreement: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$rimg" ]; then
    cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p rimg-cli --bin rimg
    rimg=${CARGO_TARGET_DIR:-$root/target}/release/rimg
fi
if ! command -v fio >/dev/null; then
    echo "fio not found: installing it with apt-get" >&2
    if ! { apt-get install -y -qq fio >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq fio >/dev/null 2>&1; }; }; then
        echo "fio-agreement: could not install fio (apt-get install fio)" >&2
        exit 2
    fi
fi
command -v python3 >/dev/null || { echo "fio-agreement: needs python3 to read the JSON reports" >&2; exit 2; }

if [ -n "$dir" ]; then
    mkdir -p "$dir"
    work=$(mktemp -d "$dir/fio-agreement.XXXXXX")
else
    work=$(mktemp -d "${TMPDIR:-/var/tmp}/rimg-fio-agreement.XXXXXX")
fi
hp_file=/proc/sys/vm/nr_hugepages
hp_old=$(cat "$hp_file" 2>/dev/null || echo)
fio_mem=()
# 16 huge pages (32 MiB) hold fio's buffers for every case (at most 4 x 1 MiB).
if [ -n "$hp_old" ] && echo $((hp_old + 16)) >"$hp_file" 2>/dev/null &&
    [ "$(awk '/HugePages_Free/{print $2}' /proc/meminfo)" -ge 16 ]; then
    fio_mem=(--mem=mmaphuge)
    trap 'rm -rf "$work"; echo "$hp_old" >"$hp_file"' EXIT
else
    [ -n "$hp_old" ] && echo "$hp_old" >"$hp_file" 2>/dev/null || true
    echo "note: no huge pages for fio (vm.nr_hugepages needs root): fio's buffers are in 4 KiB pages," \
        "so its 1 MiB requests may be split in two where rimg's are not" >&2
    trap 'rm -rf "$work"' EXIT
fi
img=$work/test.raw
# A fully allocated file: reads must hit blocks, not holes.
qemu-img create -q -f raw -o preallocation=full "$img" "$size"
bytes=$(stat -c %s "$img")
n1m=$((bytes >> 20 << 2))

# iops KEY: reads a JSON report on stdin and prints the IOPS (rimg: .iops; fio: jobs[0].read/write.iops).
iops() {
    python3 -c '
import json, sys
doc = sys.stdin.read()
d = json.loads(doc[doc.index("{"):])
if "jobs" in d:
    j = d["jobs"][0]
    print(j["read"]["iops"] + j["write"]["iops"])
else:
    print(d["iops"])
'
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

rows=()
engines=()
fail=0
# case_ NAME CACHE RIMG_ARGS... -- FIO_ARGS...: CACHE "warm" reads the file once before every run
# (the page-cache case); "direct" cases bypass the cache anyway.
case_() {
    local name=$1 warm=$2
    shift 2
    local rargs=() fargs=()
    while [ "$1" != "--" ]; do rargs+=("$1"); shift; done
    shift
    fargs=("$@")
    local r=() f=() i
    for i in $(seq "$runs"); do
        for tool in $([ $((i % 2)) = 1 ] && echo "rimg fio" || echo "fio rimg"); do
            sync
            if [ "$warm" = warm ]; then cat "$img" >/dev/null; fi
            if [ $tool = rimg ]; then
                r+=("$("$rimg" bench "${rargs[@]}" --output=json "$img" | iops)")
            else
                f+=("$(fio --output-format=json --filename="$img" "${fargs[@]}" | iops)")
            fi
        done
    done
    local rm fm diff
    rm=$(printf '%s\n' "${r[@]}" | median)
    fm=$(printf '%s\n' "${f[@]}" | median)
    diff=$(python3 -c "print(f'{($rm - $fm) / $fm * 100:+.1f}')")
    local ok=yes
    python3 -c "import sys; sys.exit(0 if abs($rm - $fm) / $fm <= 0.10 else 1)" || { ok=NO; fail=1; }
    rows+=("$(printf '%-26s %12.0f %12.0f %8s%%  %s' "$name" "$rm" "$fm" "$diff" "$ok")")
    engines+=("$name: $("$rimg" bench "${rargs[@]}" --output=json "$img" |
        python3 -c 'import json,sys; print("; ".join(json.load(sys.stdin).get("engine", [])))' |
        sed "s|$work/||g")")
}

common=(--name=agreement --ioengine=io_uring --numjobs=1 --group_reporting=1 ${fio_mem[@]+"${fio_mem[@]}"})
echo "file $img ($((bytes >> 20)) MiB), $runs run(s) per tool, alternating; $(fio --version) ${fio_mem[*]:-(malloc buffers)}, $("$rimg" --version | head -1)"

case_ randread-4k-qd32-direct direct \
    -f raw -t none -i io_uring -d 32 -s 4096 -c "$n4k" --random --seed 1 -- \
    "${common[@]}" --rw=randread --bs=4k --iodepth=32 --direct=1 --norandommap --randrepeat=1 \
    --io_size=$((n4k * 4096))
case_ write-1m-qd4-direct direct \
    -w -f raw -t none -i io_uring -d 4 -s 1048576 -c "$n1m" -- \
    "${common[@]}" --rw=write --bs=1M --iodepth=4 --direct=1 --io_size=$((n1m << 20))
case_ read-4k-qd1-cached warm \
    -f raw -t writeback -i io_uring -d 1 -s 4096 -c $((bytes / 4096 * 4)) -- \
    "${common[@]}" --rw=read --bs=4k --iodepth=1 --direct=0 --invalidate=0 --io_size=$((bytes * 4))

echo
printf '%-26s %12s %12s %9s  %s\n' case "rimg IOPS" "fio IOPS" "rimg/fio" "within 10%"
printf '%s\n' "${rows[@]}"
echo "(median IOPS over $runs run(s); rimg/fio = (rimg - fio) / fio)"
echo "rimg engine paths:"
printf '  %s\n' "${engines[@]}"
load=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load average at the end: $load"
exit $fail
