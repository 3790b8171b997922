#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (qemu-utils for
# the differential tests against the real qemu-img, util-linux's prlimit), then runs every
# test of the workspace: unit tests, the engine property test, and the integration binary.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-nbd >/dev/null 2>&1 || need+=(qemu-utils)
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
qemu-img --version | head -1

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast 2>&1
