#!/usr/bin/env bash
# Cost of the metadata-overlap guard (issue 5): 4 KiB allocating random writes, including the
# final flush, on an image whose index is large: 16384 populated L2 tables (4 KiB clusters,
# 32 GiB virtual) plus an internal snapshot sharing them, with the guard off (none) and in its
# default mode (all). Runs alternate between the two modes on the same image file (each run
# allocates fresh clusters at other random offsets), and the medians are compared.
# Benchmarks never gate CI: scripts/test.sh does not run this.
#
# Usage: scripts/bench-guard.sh [--reps N] [--count N] [--dir DIR]
#   OXCOW_BIN=path benchmarks that binary instead of building target/release/oxcow.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=7
COUNT=20000
DIR="${TMPDIR:-/var/tmp}"
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS="$2"; shift ;;
        --count) COUNT="$2"; shift ;;
        --dir) DIR="$2"; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-guard.sh: unknown argument '$1' (try --help)" >&2; exit 1 ;;
    esac
    shift
done
if [ -z "${OXCOW_BIN:-}" ]; then
    cargo build --release --quiet --bin oxcow
    OXCOW_BIN=target/release/oxcow
fi
work=$(mktemp -d "$DIR/oxcow-bench-guard.XXXXXX")
trap 'rm -rf "$work"' EXIT
img="$work/big.qcow2"
l2_tables=16384
cs=4096
l2_cover=$((cs / 8 * cs)) # guest bytes one L2 table maps
qemu-img create -q -f qcow2 -o cluster_size=$cs "$img" $((l2_tables * l2_cover))
# One write per L2 range populates every L2 table.
for ((i = 0; i < l2_tables; i++)); do echo "write -P 0x5a $((i * l2_cover)) 512"; done |
    qemu-io -f qcow2 "$img" >/dev/null
qemu-img snapshot -c base "$img"
echo "image: $(qemu-img info "$img" | grep -m1 'virtual size')"
echo "       $l2_tables L2 tables, 1 snapshot; $COUNT x 4 KiB random allocating writes per run"

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
# Warm-up (page cache, allocator cursor), not counted.
"$OXCOW_BIN" bench -w -q --random --seed 1 -S 4k -s 4k -c "$COUNT" --flush-interval "$COUNT" "$img" >/dev/null
none=()
all=()
for ((r = 1; r <= REPS; r++)); do
    for mode in none all; do
        # Distinct seeds: every run allocates new clusters; the two modes alternate.
        [ "$mode" = all ] && seed=$((r * 2 + 1)) || seed=$((r * 2))
        out=$("$OXCOW_BIN" bench -w -q --random --seed "$seed" -S 4k -s 4k -c "$COUNT" \
            --flush-interval "$COUNT" --overlap-check "$mode" --output json "$img")
        mib=$(echo "$out" | sed -E 's/.*"mib_per_s": ([0-9.]+).*/\1/')
        if [ "$mode" = none ]; then none+=("$mib"); else all+=("$mib"); fi
    done
done
m_none=$(printf '%s\n' "${none[@]}" | median)
m_all=$(printf '%s\n' "${all[@]}" | median)
echo "runs (MiB/s)  none: ${none[*]}"
echo "              all:  ${all[*]}"
awk -v n="$m_none" -v a="$m_all" 'BEGIN {
    printf "median MiB/s  none %.1f  all %.1f  all/none %.3f  guard cost %.1f%%\n", n, a, a / n, (1 - a / n) * 100 }'
qemu-img check -q "$img" && echo "qemu-img check: clean"
