#!/usr/bin/env bash
# NBD server throughput (issue 16): the same client, `qemu-img bench -f raw nbd+unix://...`,
# against `oxcow nbd`, `qemu-nbd` and `qemu-storage-daemon` serving the same qcow2 image, in
# interleaved rounds; prints the median ops/s of each server per case and the ratios.
#
# Cases: 4 KiB reads, overwrites and allocating writes (on a fresh image) at depth 1 and 16,
# 4 KiB steps of 1 MiB + 4 KiB ("random-ish": every request in another cluster), and 1 MiB
# sequential reads and writes at depth 16. Target: oxcow >= 1.5x qemu-nbd at 4 KiB, depth 16.
#
# Besides ops/s it prints each server's CPU time per request (utime+stime of the whole server
# process over the run, from /proc/PID/stat): a figure the load of other processes hardly
# moves, and what predicts the ratios on a quiet machine.
#
# Usage: scripts/bench-nbd.sh [--reps N] [--count N] [--size MIB] [--cases LIST] [--servers LIST]
#   --reps N    interleaved rounds (default 3; medians are reported)
#   --count N   requests per 4 KiB run (default 20000; 1 MiB runs do count/40)
#   --size MIB  image size (default 512)
#   --cases LIST    space-separated cases (default: all of them)
#   --servers LIST  space-separated servers among oxcow, oxcow2, qemu-nbd, qsd
#                   (default "oxcow qemu-nbd qsd", or "oxcow oxcow2 qemu-nbd" with OXCOW_BIN2)
#   OXCOW_BIN=path benchmarks that binary instead of building one
#   OXCOW_BIN2=path a second oxcow binary (server "oxcow2"), for old-vs-new runs
#   VERBOSE=1 also prints every run (case, server, op/s, CPU us/request) in run order
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=3
COUNT=20000
SIZE_MB=512
CASES="read4k-d1 read4k-d16 over4k-d1 over4k-d16 alloc4k-d1 alloc4k-d16 read1m-d16 write1m-d16"
SERVERS="oxcow qemu-nbd qsd"
[ -n "${OXCOW_BIN2:-}" ] && SERVERS="oxcow oxcow2 qemu-nbd"
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS="$2"; shift ;;
        --count) COUNT="$2"; shift ;;
        --size) SIZE_MB="$2"; shift ;;
        --cases) CASES="$2"; shift ;;
        --servers) SERVERS="$2"; shift ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-nbd.sh: unknown argument '$1' (try --help)" >&2; exit 1 ;;
    esac
    shift
done
for t in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
    command -v $t >/dev/null || { echo "bench-nbd.sh: $t is required" >&2; exit 1; }
done
if [ -n "${OXCOW_BIN:-}" ]; then
    OX=$(realpath "$OXCOW_BIN")
else
    cargo build --release --quiet --bin oxcow
    OX="$PWD/target/release/oxcow"
fi
OX2=""
[ -n "${OXCOW_BIN2:-}" ] && OX2=$(realpath "$OXCOW_BIN2")
DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/oxcow-bench-nbd.XXXXXX")
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT
SOCK="$DIR/nbd.sock"
FULL="$DIR/full.qcow2"
qemu-img create -q -f qcow2 "$DIR/written.qcow2" "${SIZE_MB}M"
qemu-io -f qcow2 -c "write -P 0x5a 0 ${SIZE_MB}M" "$DIR/written.qcow2" >/dev/null
# A plain copy: on ext4, overwriting the blocks of the file qemu-io just wrote runs ~20x slower
# in the kernel (ext4_block_write_begin) than overwriting a copy, for every server and for raw
# pwrite alike; the copy measures the servers rather than that file-system state.
cp "$DIR/written.qcow2" "$FULL"
rm "$DIR/written.qcow2"

# start_server NAME IMAGE: serves IMAGE on $SOCK with server NAME, waits for the socket.
start_server() {
    rm -f "$SOCK"
    case "$1" in
        oxcow) "$OX" nbd -k "$SOCK" -t -f qcow2 "$2" & ;;
        oxcow2) "$OX2" nbd -k "$SOCK" -t -f qcow2 "$2" & ;;
        qemu-nbd) qemu-nbd -k "$SOCK" -t -f qcow2 --cache=writeback --aio=threads "$2" & ;;
        qsd) qemu-storage-daemon \
                --blockdev "driver=file,filename=$2,node-name=file,cache.direct=off,aio=threads" \
                --blockdev driver=qcow2,file=file,node-name=disk \
                --nbd-server "addr.type=unix,addr.path=$SOCK" \
                --export type=nbd,id=e0,node-name=disk,name=,writable=on & ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 200); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
    echo "bench-nbd.sh: $1 did not start" >&2; exit 1
}

stop_server() {
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
}

# cpu_ticks: utime+stime of the server process (all its threads), in clock ticks.
cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$SERVER_PID/stat"
}

# run_case SERVER CASE: prints ops/s and server CPU microseconds per request of one run.
run_case() {
    local img="$FULL" args
    case "$2" in
        read4k-d1) args="-d 1 -s 4k -S 1052672 -c $COUNT" ;;
        read4k-d16) args="-d 16 -s 4k -S 1052672 -c $COUNT" ;;
        over4k-d1) args="-w -d 1 -s 4k -S 1052672 -c $COUNT" ;;
        over4k-d16) args="-w -d 16 -s 4k -S 1052672 -c $COUNT" ;;
        alloc4k-d1|alloc4k-d16)
            img="$DIR/fresh.qcow2"; rm -f "$img"
            qemu-img create -q -f qcow2 "$img" "${SIZE_MB}M"
            args="-w -d ${2#alloc4k-d} -s 4k -S 69632 -c $COUNT" ;;
        read1m-d16) args="-d 16 -s 1M -c $((COUNT / 40))" ;;
        write1m-d16) args="-w -d 16 -s 1M -c $((COUNT / 40))" ;;
    esac
    start_server "$1" "$img"
    local out secs n=$COUNT t0 t1
    t0=$(cpu_ticks)
    # shellcheck disable=SC2086
    out=$(qemu-img bench -f raw $args "nbd+unix:///?socket=$SOCK")
    t1=$(cpu_ticks)
    stop_server
    # qemu-img bench times the requests only (not its start-up or the connection).
    secs=$(echo "$out" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
    case "$2" in *1m*) n=$((COUNT / 40)) ;; esac
    python3 -c "print(f'{$n / $secs:.0f} {($t1 - $t0) * 1e6 / $(getconf CLK_TCK) / $n:.1f}')"
}

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cpus"
# rotated N: $SERVERS rotated left by N. The first server of a case pays for what the run
# before it left behind (dirty page cache after the allocating writes costs the next 1 MiB
# reads ~30 %), so each round starts with another server.
rotated() {
    local a=($SERVERS) i
    for i in $(seq 0 $((${#a[@]} - 1))); do echo -n "${a[$(((i + $1) % ${#a[@]}))]} "; done
}
for r in $(seq "$REPS"); do
    for c in $CASES; do
        for s in $(rotated "$r"); do
            echo "$c $s $(run_case "$s" "$c")" >> "$DIR/results"
        done
    done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
[ -n "${VERBOSE:-}" ] && cat "$DIR/results"
python3 - "$DIR/results" "$CASES" "$SERVERS" <<'PY'
import sys, statistics
ops, cpu = {}, {}
for line in open(sys.argv[1]):
    c, s, v, u = line.split()
    ops.setdefault((c, s), []).append(float(v))
    cpu.setdefault((c, s), []).append(float(u))
servers = sys.argv[3].split()
others = [s for s in servers if s != servers[0]]
print("median op/s (server CPU us/request), and the first server's op/s ratio to each other")
print(f"{'case':<13}" + "".join(f"{s:>20}" for s in servers)
      + "".join(f"{servers[0][:6] + '/' + s[:8]:>16}" for s in others))
for c in sys.argv[2].split():
    m = {s: statistics.median(ops[(c, s)]) for s in servers}
    u = {s: statistics.median(cpu[(c, s)]) for s in servers}
    print(f"{c:<13}" + "".join(f"{m[s]:>12.0f} ({u[s]:>5.1f})" for s in servers)
          + "".join(f"{m[servers[0]] / m[s]:>15.2f}x" for s in others))
PY
