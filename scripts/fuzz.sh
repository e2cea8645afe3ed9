#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer (fuzz/, see fuzz/README.md): builds the fuzz crate
# with sanitizer-coverage instrumentation on the stable toolchain, then runs each target from
# its committed corpus (fuzz/corpus/TARGET) for a bounded time. Fails on any finding (panic,
# hang, out-of-memory); reproducers land in $FUZZ_OUT/artifacts.
#
# Environment:
#   FUZZ_SECONDS_PER_TARGET  seconds per target (default: header 10, image_io 25,
#                            check_repair 25, about a minute in all); 3600 for a long run
#   FUZZ_TARGETS             targets to run (default: "header image_io check_repair manage")
#   FUZZ_TIMEOUT             seconds one input may run before it counts as a hang (default 10;
#                            a short one keeps long runs going when a known hang is frequent).
#                            The targets' own watchdog enforces it (OXCOW_FUZZ_WATCHDOG_SECS,
#                            see fuzz/src/lib.rs): libFuzzer's -timeout handler can deadlock
#                            in malloc, so -timeout is only a backstop 20 s later.
#   FUZZ_KEEP_GOING=1        fork mode: record every finding and go on instead of stopping at
#                            the first one (for long runs); still fails at the end
#   FUZZ_MERGE=1             afterwards merge what the run found into the committed corpus
#                            (minimizing: only units that add coverage are kept)
#   FUZZ_ASAN=1              also build with AddressSanitizer (RUSTC_BOOTSTRAP=1
#                            -Zsanitizer=address; slower, separate target dir)
#   FUZZ_OUT                 where new corpus units, artifacts and logs go (default: a fresh
#                            directory under /tmp, kept when something was found)
#   FUZZ_NEW_FINDINGS_FAIL=0 new findings of the exploration are reported (and kept) but do not
#                            fail the run; the replay of the committed corpus still does.
#                            scripts/test.sh sets it: a gate must be deterministic, and a
#                            minute of exploration finding a new bug is news, not a regression
#                            (fuzz/regressions/ replays every known reproducer in cargo test)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
export CARGO_TERM_COLOR=never

host="$(rustc -vV | sed -n 's/^host: //p')"
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags+=" -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
target_dir="$root/fuzz/target"
if [ "${FUZZ_ASAN:-0}" = 1 ]; then
  export RUSTC_BOOTSTRAP=1
  flags+=" -Zsanitizer=address"
  target_dir="$root/fuzz/target-asan"
fi

echo "== fuzz: building fuzz/ (libfuzzer-sys, sancov instrumentation, $host)"
# --target keeps the instrumentation flags off build scripts and proc macros.
(cd fuzz && RUSTFLAGS="$flags" CARGO_TARGET_DIR="$target_dir" \
  cargo build --release --target "$host" --bins)
bin="$target_dir/$host/release"

out="${FUZZ_OUT:-$(mktemp -d /tmp/oxcow-fuzz.XXXXXX)}"
mkdir -p "$out/artifacts"
# The targets write the image under test here (tmpfs when there is one).
scratch_base=/dev/shm
[ -d "$scratch_base" ] && [ -w "$scratch_base" ] || scratch_base=/tmp
scratch="$(mktemp -d "$scratch_base/oxcow-fuzz.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
export OXCOW_FUZZ_TMPDIR="$scratch"
hang="${FUZZ_TIMEOUT:-10}"
export OXCOW_FUZZ_WATCHDOG_SECS="$hang"

default_secs() {
  case "$1" in
    header) echo 10 ;;
    *) echo 25 ;;
  esac
}
corpus_of() {
  case "$1" in
    # Management operations run on the same images as image_io: its corpus seeds them (a
    # corpus of its own would add tens of MiB to the repository for little more coverage).
    manage) echo "$root/fuzz/corpus/image_io" ;;
    *) echo "$root/fuzz/corpus/$1" ;;
  esac
}
# Headers are parsed from cluster 0: 4 KiB of it is plenty. Images stay below 512 KiB.
max_len_of() {
  case "$1" in
    header) echo 4096 ;;
    *) echo 524288 ;;
  esac
}

failed=()
replay_failed=()
for t in ${FUZZ_TARGETS:-header image_io check_repair manage}; do
  secs="${FUZZ_SECONDS_PER_TARGET:-$(default_secs "$t")}"
  corpus="$(corpus_of "$t")"
  max_len="$(max_len_of "$t")"
  new="$out/corpus-$t"
  mkdir -p "$new" "$corpus"
  args=(-max_total_time="$secs" -timeout="$((hang + 20))" -rss_limit_mb=2048 -max_len="$max_len"
    -artifact_prefix="$out/artifacts/$t-" -print_final_stats=1)
  if [ "${FUZZ_KEEP_GOING:-0}" = 1 ]; then
    args+=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
  fi
  echo "== fuzz: $t: replay of the committed corpus ($(ls "$corpus" | wc -l) files)"
  if ! timeout -k 10 600 "$bin/$t" -runs=0 -timeout="$((hang + 20))" -rss_limit_mb=2048 \
    -max_len="$max_len" -artifact_prefix="$out/artifacts/replay-$t-" "$corpus" \
    >"$out/$t-replay.log" 2>&1; then
    echo "!! fuzz: replaying the corpus of $t fails (a regression):"
    grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written' "$out/$t-replay.log" | head -20 || true
    replay_failed+=("$t")
    continue
  fi
  echo "== fuzz: $t for ${secs}s"
  log="$out/$t.log"
  rc=0
  # Last resort against a wedged fuzzer (the targets also run a watchdog, see fuzz/src/lib.rs).
  timeout -k 10 $((secs + 300)) "$bin/$t" "${args[@]}" "$new" "$corpus" >"$log" 2>&1 || rc=$?
  # The last status line (execs, cov, ft, corpus) and the final stats.
  grep -E '^#[0-9]+|^stat::' "$log" | grep -Ev 'NEW|REDUCE|pulse' | tail -8 || true
  found=$(ls "$out/artifacts" | grep -c "^$t-" || true)
  if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
    echo "!! fuzz: $t found something (exit $rc, $found artifacts in $out/artifacts):"
    grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -20 || true
    failed+=("$t")
  fi
  if [ "${FUZZ_MERGE:-0}" = 1 ]; then
    echo "== fuzz: merging new units of $t into ${corpus#"$root"/}"
    timeout -k 10 3600 "$bin/$t" -merge=1 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$out/artifacts/merge-$t-" -max_len="$max_len" "$corpus" "$new" \
      >"$out/$t-merge.log" 2>&1 || echo "!! merge of $t failed (see $out/$t-merge.log)"
  fi
done

if [ ${#replay_failed[@]} -gt 0 ]; then
  echo "!! fuzz: the committed corpus of ${replay_failed[*]} no longer replays cleanly; logs in $out"
  exit 1
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "!! fuzz: new findings in: ${failed[*]}; reproducers and logs in $out"
  echo "   add each reproducer to fuzz/regressions/TARGET/ (see fuzz/README.md)"
  if [ "${FUZZ_NEW_FINDINGS_FAIL:-1}" = 1 ]; then
    exit 1
  fi
  echo "   (not failing: FUZZ_NEW_FINDINGS_FAIL=0)"
  exit 0
fi
[ -n "${FUZZ_OUT:-}" ] || rm -rf "$out"
echo "== fuzz: no findings"
