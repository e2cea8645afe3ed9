#!/usr/bin/env bash
# The whole test suite: Rust unit + integration tests (with qemu-img/qemu-io as the oracle),
# header freshness, exported symbols, the C harness (CMake + ctest, ASan/UBSan) and the Go
# binding (go test -race). Builds once and reuses the artefacts.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

# cmake, Go, pkg-config, clippy: installed when missing (apt-get).
./scripts/deps.sh

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --all-targets -- -D warnings

echo "== build (release library, CLI and tests; ctests/run.sh builds the debug library)"
cargo build --release --lib --bins

echo "== header is fresh"
git diff --exit-code -- include/oxcow.h || { echo "include/oxcow.h is stale: commit the regenerated header"; exit 1; }

echo "== cargo test"
cargo test --release --no-fail-fast

echo "== sliced metadata caches: engine, crash and stress tests again with 512-byte and whole-table slices"
for slice in 512 cluster; do
  OXCOW_L2_SLICE_SIZE=$slice cargo test --release --lib engine::
  OXCOW_L2_SLICE_SIZE=$slice cargo test --release --test stress_threads --test interop_write_cow \
    --test lazy_refcounts --test snapshots_live --test resize_live
done

echo "== fuzz: replay each target's corpus, then explore for a bounded time (about a minute; fuzz/README.md)"
FUZZ_NEW_FINDINGS_FAIL=0 ./scripts/fuzz.sh

echo "== loom: every interleaving of the in-flight tracker (separate target dir: --cfg loom)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_

for stage in ctests/run.sh go/run.sh scripts/check-package.sh; do
  if [ -f "$stage" ]; then
    echo "== $stage"
    bash "$stage"
  fi
done
echo "== all test stages passed"
