#!/usr/bin/env bash
# Builds the Rust library (debug), then configures, builds and runs the C harness with ctest
# (ASan + UBSan, Debug). Called by scripts/test.sh; usable on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
build="$root/target/ctests-build"

cargo build --lib
cmake -S "$root/ctests" -B "$build" -DCMAKE_BUILD_TYPE=Debug \
  -DOXCOW_LIB_DIR="$root/target/debug" -DOXCOW_INCLUDE_DIR="$root/include" >/dev/null
cmake --build "$build" -j "$(nproc)"
cd "$build"
ctest --output-on-failure -j "$(nproc)" "$@"
