#!/bin/sh
# Build rimg and the side-by-side harness (release), then time rimg against qemu-img on raw convert and
# compare workloads. All arguments go to the harness; see `perf-scripts/side-by-side.sh --help`.
#   perf-scripts/side-by-side.sh --runs 5
#   perf-scripts/side-by-side.sh --size 4G --workloads convert-dense,compare-identical --json results.jsonl
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --manifest-path "$root/Cargo.toml" -p rimg-cli -p rimg-bench
target=${CARGO_TARGET_DIR:-$root/target}
exec "$target/release/side-by-side" "$@"
