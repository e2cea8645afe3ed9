#!/usr/bin/env bash
# Builds liboxcow (release), installs it into a staging prefix under target/ (never into the
# system), and runs go vet and go test -race for the Go binding against it.
#
# Usage: bash go/run.sh [extra go test flags, e.g. -run TestConcurrent -v]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

target=${CARGO_TARGET_DIR:-$root/target}
stage="$target/go-stage"

echo "go/run.sh: building liboxcow (release)"
cargo build --release --lib

rm -rf "$stage"
OXCOW_BUILD_DIR="$target/release" DESTDIR= LIBDIR=lib bash scripts/install.sh "$stage" >/dev/null

export PKG_CONFIG_PATH="$stage/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
export LD_LIBRARY_PATH="$stage/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Test binaries also carry an rpath to the staging prefix, so they run without LD_LIBRARY_PATH.
export CGO_LDFLAGS="-Wl,-rpath,$stage/lib${CGO_LDFLAGS:+ $CGO_LDFLAGS}"
export CGO_ENABLED=1
export GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-buildvcs=false GO111MODULE=on
# Keep Go's caches out of an unwritable HOME.
if [ -z "${GOCACHE:-}" ] && { [ -z "${HOME:-}" ] || [ ! -w "${HOME:-/nonexistent}" ]; }; then
  export GOCACHE="$target/go/cache"
fi
if [ -z "${GOPATH:-}" ] && { [ -z "${HOME:-}" ] || [ ! -w "${HOME:-/nonexistent}" ]; }; then
  export GOPATH="$target/go/path"
fi

pkg-config --exists oxcow || { echo "go/run.sh: pkg-config cannot find oxcow in $stage" >&2; exit 1; }
echo "go/run.sh: using liboxcow $(pkg-config --modversion oxcow) from $stage"

cd "$root/go"
unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then
  echo "go/run.sh: files need gofmt:" >&2
  echo "$unformatted" >&2
  exit 1
fi
echo "== go vet ./..."
go vet ./...
echo "== go test -race -count=1 ./..."
go test -race -count=1 "$@" ./...
