#!/bin/sh
# The qcow2 workloads of side-by-side.sh (raw->qcow2 dense and sparse, qcow2->raw, qcow2->qcow2 -c zlib
# and zstd on text-like data, compressed qcow2->raw, compare qcow2 vs raw, bench on qcow2), kept under
# their old command line:
#   perf-scripts/qcow2-side-by-side.sh [RUNS] [SIZE_MIB] [more side-by-side options]
set -eu
runs=${1:-3}
mib=${2:-1024}
shift $(($# < 2 ? $# : 2))
exec "$(dirname "$0")/side-by-side.sh" --runs "$runs" --size "${mib}M" \
    --workloads 'convert-raw-qcow2*,convert-qcow2*,convert-zlib-raw,convert-zstd-raw,compare-qcow2-raw,bench-qcow2-*' "$@"
