#!/bin/sh
# rimg against qemu-img, side by side, with a history. Builds rimg and the harness (release) first.
#   perf-scripts/side-by-side.sh --quick                 # every workload on small images, ~1 minute
#   perf-scripts/side-by-side.sh                         # every workload, 2 GiB images, 5 runs each
#   perf-scripts/side-by-side.sh --workloads 'bench-*,convert-dense' --runs 7
#   perf-scripts/side-by-side.sh compare [--last N | A B] # newest run against earlier ones
#   perf-scripts/side-by-side.sh plot [--out FILE.svg]    # ratio per workload over the commits
# Options of the run: perf-scripts/side-by-side.sh --help; of compare/plot: ... compare --help.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
case "${1:-}" in
compare | plot)
    cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p rimg-bench --bin perf-history
    exec "$target/release/perf-history" "$@"
    ;;
esac
cargo build --release --manifest-path "$root/Cargo.toml" -p rimg-cli -p rimg-bench --bin rimg --bin side-by-side
exec "$target/release/side-by-side" "$@"
