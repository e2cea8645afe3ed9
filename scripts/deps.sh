#!/usr/bin/env bash
# Installs what the test suite needs beyond the base image (Rust toolchain, gcc, python3,
# qemu-utils) when it is missing: cmake (C harness), Go (binding), pkg-config (packaging
# checks), clippy/rustfmt, and optionally libnbd-bin (NBD client tests). Uses apt-get, as root
# or through sudo; does nothing when all is there.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Optional: libnbd's nbdinfo/nbdcopy, clients of `oxcow nbd` in tests/nbd_clients.rs (the
# test skips cleanly when they cannot be installed).
if ! command -v nbdcopy >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine may have no package lists yet: update once when the first try fails.
  $sudo apt-get install -y -qq libnbd-bin >/dev/null 2>&1 ||
    { $sudo apt-get update -qq >/dev/null 2>&1 &&
      $sudo apt-get install -y -qq libnbd-bin >/dev/null 2>&1; } ||
    echo "== libnbd-bin not installed (nbdinfo/nbdcopy tests will be skipped)"
fi
if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
  rustup component add clippy rustfmt
fi
