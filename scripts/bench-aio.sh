#!/usr/bin/env bash
# Direct I/O on the real disk, one submitting thread against threads: 4 KiB reads, in-place
# overwrites and allocating writes at queue depth 1, 4 and 16 through
#   oxcow-aio   oxcow bench --aio -t none      (the asynchronous API from one thread)
#   oxcow-thr   oxcow bench -t none            (-d threads on the synchronous API)
#   raw-uring   oxcow bench -f raw --aio -t none   (plain io_uring on a raw file: the limit)
#   qemu-img    qemu-img bench -t none -i io_uring  (QEMU's qcow2 driver, one thread)
# Runs are interleaved (every tool once per repetition); medians of IOPS and the ratios
# oxcow-aio/qemu-img and oxcow-aio/raw-uring are printed. Benchmarks never gate CI.
#
# Usage: scripts/bench-aio.sh [--reps N] [--dir DIR] [--depths "1 4 16"] [--only "read ..."]
#   --reps N    repetitions (default 5)
#   --dir DIR   where the files live (default target/bench-aio: the work disk, not tmpfs;
#               O_DIRECT needs a file system that supports it)
#   --only      workloads among: read overwrite alloc (default all)
#   OXCOW_BIN=path benchmarks that binary instead of building one
#
# read: sequential 4 KiB reads of a written 128 MiB region (-c 20000 at depth 1, 60000 deeper:
# every run lasts about a second, so a hiccup of the host moves it little; the region wraps).
# overwrite: the same region rewritten (-w). alloc: 4 KiB writes one cluster apart (-S 64k)
# into a fresh 2 GiB image, so every write allocates a cluster (-c 8192 at depth 1, 32768
# deeper); raw-uring writes the same offsets of a fresh sparse raw file. Two ratios are
# printed for each pair of tools: of the medians, and the median of the ratios within each
# repetition (the tools of one repetition run back to back, so the second cancels the
# disk's drift across repetitions). Load from other processes skews absolute figures: the
# load average is printed with the results.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=5
DIR="$PWD/target/bench-aio"
DEPTHS="1 4 16"
ONLY="read overwrite alloc"
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS="$2"; shift ;;
        --dir) DIR="$2"; shift ;;
        --depths) DEPTHS="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-aio.sh: unknown argument '$1' (try --help)" >&2; exit 1 ;;
    esac
    shift
done
command -v qemu-img >/dev/null || { echo "bench-aio.sh: qemu-img is required" >&2; exit 1; }
if [ -n "${OXCOW_BIN:-}" ]; then
    OX=$(realpath "$OXCOW_BIN")
else
    cargo build --release --quiet --bin oxcow
    OX="$PWD/target/release/oxcow"
fi
mkdir -p "$DIR"
RES="$DIR/results.txt"
: > "$RES"

# prep WORKLOAD: the files a run starts from (fresh ones for alloc).
prep() {
    case "$1" in
        read|overwrite)
            if [ ! -f "$DIR/w.qcow2" ]; then
                qemu-img create -q -f qcow2 "$DIR/w.qcow2" 128M
                qemu-io -f qcow2 -c "write -P 0x5a 0 128M" "$DIR/w.qcow2" >/dev/null
                rm -f "$DIR/w.raw"; truncate -s 128M "$DIR/w.raw"
                qemu-io -f raw -c "write -P 0x5a 0 128M" "$DIR/w.raw" >/dev/null
            fi ;;
        alloc)
            rm -f "$DIR/a.qcow2" "$DIR/a.raw"
            qemu-img create -q -f qcow2 "$DIR/a.qcow2" 2G
            truncate -s 2G "$DIR/a.raw" ;;
    esac
}

# one TOOL WORKLOAD DEPTH: prints IOPS.
one() {
    local tool=$1 wl=$2 d=$3 img raw args count
    case "$wl" in
        read) img=$DIR/w.qcow2; raw=$DIR/w.raw; args=""; count=20000 ;;
        overwrite) img=$DIR/w.qcow2; raw=$DIR/w.raw; args="-w"; count=20000 ;;
        alloc) img=$DIR/a.qcow2; raw=$DIR/a.raw; args="-w -S 64k"; count=8192 ;;
    esac
    [ "$d" = 1 ] || count=$((count * 3)) # deeper runs are faster: about a second each
    [ "$d" = 1 ] || [ "$wl" != alloc ] || count=32768
    local out
    case "$tool" in
        oxcow-aio) out=$("$OX" bench -f qcow2 --aio -t none -d "$d" -c $count $args "$img") ;;
        oxcow-thr) out=$("$OX" bench -f qcow2 -t none -d "$d" -c $count $args "$img") ;;
        raw-uring) out=$("$OX" bench -f raw --aio -t none -d "$d" -c $count $args "$raw") ;;
        qemu-img) out=$(qemu-img bench -f qcow2 -t none -i io_uring -d "$d" -c $count $args "$img") ;;
    esac
    local secs
    secs=$(echo "$out" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
    awk -v c=$count -v s="$secs" 'BEGIN { printf "%.0f\n", c / s }'
}

TOOLS="oxcow-aio oxcow-thr raw-uring qemu-img"
for rep in $(seq "$REPS"); do
    for wl in $ONLY; do
        for d in $DEPTHS; do
            for tool in $TOOLS; do
                prep "$wl"
                echo "$wl $d $tool $(one "$tool" "$wl" "$d") $rep" >> "$RES"
            done
        done
    done
done

# median [FORMAT]: the median of the numbers on stdin, printed with FORMAT (default %.0f).
median() {
    sort -g | awk -v f="${1:-%.0f}" '{ v[NR] = $1 }
        END { if (!NR) print "n/a"; else printf f "\n", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
echo "# direct I/O on $(df -T "$DIR" | awk 'NR==2 {print $2" ("$1")"}'), 4 KiB, medians of $REPS interleaved runs (IOPS)"
echo "# load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
# paired A B WL D: the median over repetitions of A's IOPS / B's IOPS in the same repetition.
paired() {
    awk -v a="$1" -v b="$2" -v w="$3" -v d="$4" '$1==w && $2==d && $3==a {x[$5]=$4}
        $1==w && $2==d && $3==b {y[$5]=$4}
        END { for (r in x) if (r in y && y[r] > 0) print x[r] / y[r] }' "$RES" | median "%.2fx"
}
printf "%-10s %3s %10s %10s %10s %10s %9s %9s %10s %10s\n" workload d oxcow-aio oxcow-thr raw-uring qemu-img \
    aio/qemu aio/raw "paired/q" "paired/raw"
for wl in $ONLY; do
    for d in $DEPTHS; do
        declare -A m
        for tool in $TOOLS; do
            m[$tool]=$(awk -v w=$wl -v d=$d -v t=$tool '$1==w && $2==d && $3==t {print $4}' "$RES" | median)
        done
        printf "%-10s %3s %10s %10s %10s %10s %9s %9s %10s %10s\n" "$wl" "$d" "${m[oxcow-aio]}" "${m[oxcow-thr]}" \
            "${m[raw-uring]}" "${m[qemu-img]}" \
            "$(awk -v a=${m[oxcow-aio]} -v b=${m[qemu-img]} 'BEGIN{printf "%.2fx", a/b}')" \
            "$(awk -v a=${m[oxcow-aio]} -v b=${m[raw-uring]} 'BEGIN{printf "%.2fx", a/b}')" \
            "$(paired oxcow-aio qemu-img "$wl" "$d")" "$(paired oxcow-aio raw-uring "$wl" "$d")"
    done
done
