#!/usr/bin/env bash
# Splits the sequential allocating row of scripts/bench.sh into its parts (BENCHMARKS.md,
# session 17): the same 4 KiB sequential writes and final flush, timed by `oxcow bench` on
#   alloc    a new qcow2 image (the harness row: one cluster allocation every 16 writes)
#   inplace  a new image made with -o preallocation=metadata (every cluster mapped, the
#            file sparse: writes go in place, into pages the kernel allocates, like raw's)
#   grown    alloc, with the file grown by the image size first (writes fill holes
#            instead of extending the file)
#   raw      a new sparse raw file
# in rounds, the modes alternating every round, each run on a new file. Prints the median
# and the quartile of each mode and raw's median over it. Timings only; no pass/fail.
#
# usage: scripts/bench-alloc-split.sh [--dir DIR] [--rounds N] [--depth D] [--size MiB]
#                                     [--modes "alloc inplace raw"]
# Environment: OXCOW_BIN (default target/release/oxcow).
set -euo pipefail

DIR=/dev/shm
ROUNDS=15
DEPTH=1
SIZE_MB=256
MODES="alloc inplace grown raw"
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --depth) DEPTH=$2; shift 2 ;;
        --size) SIZE_MB=$2; shift 2 ;;
        --modes) MODES=$2; shift 2 ;;
        *) echo "usage: $0 [--dir DIR] [--rounds N] [--depth D] [--size MiB] [--modes LIST]" >&2; exit 2 ;;
    esac
done
OX=${OXCOW_BIN:-target/release/oxcow}
[ -x "$OX" ] || { echo "$0: $OX not built (cargo build --release)" >&2; exit 1; }
COUNT=$((SIZE_MB * 256)) # 4 KiB writes covering the image once
for mode in $MODES; do
    case "$mode" in
        alloc | inplace | grown | raw) ;;
        *) echo "$0: unknown mode $mode (alloc, inplace, grown, raw)" >&2; exit 2 ;;
    esac
done

W=$(mktemp -d "$DIR/oxcow-split.XXXXXX")
trap 'rm -rf "$W"' EXIT

# Makes the file of a mode and prints "format path".
make_file() {
    local f
    case "$1" in
        alloc | inplace | grown)
            f=$W/split.qcow2
            rm -f "$f"
            case "$1" in
                inplace) qemu-img create -q -f qcow2 -o preallocation=metadata "$f" "${SIZE_MB}M" ;;
                *) qemu-img create -q -f qcow2 "$f" "${SIZE_MB}M" ;;
            esac
            [ "$1" = grown ] && truncate -s "+${SIZE_MB}M" "$f"
            echo "qcow2 $f" ;;
        raw)
            f=$W/split.raw
            rm -f "$f"
            truncate -s "${SIZE_MB}M" "$f"
            echo "raw $f" ;;
    esac
}

echo "$($OX --version 2>/dev/null || echo "$OX"): $COUNT writes of 4 KiB, d=$DEPTH, $ROUNDS rounds in $DIR"
for r in $(seq "$ROUNDS"); do
    for mode in $MODES; do
        read -r fmt f < <(make_file "$mode")
        sync
        out=$("$OX" bench -f "$fmt" -t writeback -d "$DEPTH" -w -c "$COUNT" -s 4k \
            --flush-interval "$COUNT" --output json "$f")
        echo "$mode $(sed -n 's/.*"seconds": \([0-9.]*\).*/\1/p' <<<"$out")"
    done
done | python3 -c '
import sys, collections, statistics
runs = collections.defaultdict(list)
for line in sys.stdin:
    mode, secs = line.split()
    runs[mode].append(float(secs) * 1e3)
raw = statistics.median(runs["raw"]) if "raw" in runs else None
for mode, v in runs.items():
    v.sort()
    med = statistics.median(v)
    ratio = f"  raw/{mode} {raw / med:.3f}" if raw else ""
    print(f"{mode:8s} median {med:8.1f} ms  q25 {v[len(v) // 4]:8.1f} ms  min {v[0]:8.1f} ms{ratio}")
'
