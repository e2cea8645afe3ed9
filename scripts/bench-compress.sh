#!/usr/bin/env bash
# The compression row of the benchmarks (issue 18): `oxcow convert -c` against
# `qemu-img convert -c` on the same raw inputs (text-like data, and mixed random/zero/text
# data), reporting wall time, file length and allocated bytes (medians), and the ratios
# against the targets (speed >= 1.5x qemu-img's, length <= qemu-img's). scripts/bench.sh runs
# it at the end; it also runs alone.
#
# Usage: scripts/bench-compress.sh [--reps N] [--size MIB]
#   --reps N    repetitions (default 3; medians are reported)
#   --size MIB  size of each input (default 256)
#   OXCOW_BIN=path benchmarks that binary instead of building one
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=3
SIZE_MB=256
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS="$2"; shift ;;
        --size) SIZE_MB="$2"; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-compress.sh: unknown argument '$1' (try --help)" >&2; exit 1 ;;
    esac
    shift
done
command -v qemu-img >/dev/null || { echo "bench-compress.sh: qemu-img is required" >&2; exit 1; }
if [ -n "${OXCOW_BIN:-}" ]; then
    OX=$(realpath "$OXCOW_BIN")
else
    cargo build --release --quiet --bin oxcow
    OX="$PWD/target/release/oxcow"
fi
# Length is what is shipped and copied (holes inside count); allocated is st_blocks.
DIR_TO_REMOVE=""
compression_rows() {
    local res
    dir=$(mktemp -d "${TMPDIR:-/var/tmp}/oxcow-bench-compress.XXXXXX")
    DIR_TO_REMOVE=$dir
    trap 'rm -rf "$DIR_TO_REMOVE"' EXIT
    res="$dir/results"
    # Text-like: words from a skewed vocabulary (a 16 MiB block repeated: clusters are
    # compressed one by one, so repeating the block does not help either tool).
    # Mixed: per 64 KiB, in turn random, zero, half random, text, 1000 random bytes.
    python3 - "$dir" "$SIZE_MB" <<'PY'
import random, sys, os
d, mb = sys.argv[1], int(sys.argv[2])
r = random.Random(1)
letters = "etaoinshrdlucmfwypvbgkjqxz"
vocab = ["".join(r.choice(letters[:6 + i % 20]) for _ in range(2 + int(r.expovariate(0.25)) % 12))
         for i in range(20000)]
w = [1.0 / (i + 1) for i in range(len(vocab))]
parts, n = [], 0
while n < 16 << 20:
    s = "".join(x + ("\n" if r.random() < 0.08 else " ") for x in r.choices(vocab, w, k=4096)).encode()
    parts.append(s); n += len(s)
block = b"".join(parts)[:16 << 20]
with open(os.path.join(d, "text.raw"), "wb") as f:
    for _ in range(max(1, mb // 16)):
        f.write(block)
out = bytearray(mb << 20)
for i in range(len(out) // 65536):
    o, k = i * 65536, i % 5
    if k == 0: out[o:o + 65536] = os.urandom(65536)
    elif k == 2: out[o:o + 32768] = os.urandom(32768)
    elif k == 3: out[o:o + 65536] = block[o % (8 << 20):o % (8 << 20) + 65536]
    elif k == 4: out[o:o + 1000] = os.urandom(1000)
open(os.path.join(d, "mixed.raw"), "wb").write(out)
PY
    echo "compression: $SIZE_MB MiB inputs in $dir, $REPS repetition(s)"
    for rep in $(seq 1 "$REPS"); do
        for input in text mixed; do
            for tool in qemu oxcow; do
                rm -f "$dir/out.qcow2"
                local t0 t1
                t0=$(date +%s.%N)
                if [ "$tool" = qemu ]; then
                    qemu-img convert -c -f raw -O qcow2 "$dir/$input.raw" "$dir/out.qcow2"
                else
                    "$OX" convert -c -f raw -O qcow2 "$dir/$input.raw" "$dir/out.qcow2"
                fi
                t1=$(date +%s.%N)
                echo "$input $tool $(awk "BEGIN { print $t1 - $t0 }") $(stat -c %s "$dir/out.qcow2") $(($(stat -c %b "$dir/out.qcow2") * 512))" >>"$res"
            done
        done
    done
    python3 - "$res" <<'PY'
import sys, collections, statistics
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    inp, tool, secs, length, alloc = line.split()
    runs[(inp, tool)].append((float(secs), int(length), int(alloc)))
print()
print("Compression: convert -c of the same raw input (median time; length and allocated in MiB).")
print(f"{'input':<8}{'tool':<8}{'seconds':>9}{'length':>10}{'allocated':>11}")
for inp in ("text", "mixed"):
    med = {}
    for tool in ("qemu", "oxcow"):
        v = runs[(inp, tool)]
        m = tuple(statistics.median(x[i] for x in v) for i in range(3))
        med[tool] = m
        print(f"{inp:<8}{tool:<8}{m[0]:9.2f}{m[1] / 2**20:10.2f}{m[2] / 2**20:11.2f}")
    q, o = med["qemu"], med["oxcow"]
    print(f"{inp:<8}speed oxcow/qemu-img {q[0] / o[0]:.2f}x (target >= 1.5), "
          f"length oxcow/qemu-img {o[1] / q[1]:.3f} (target <= 1)")
PY
}
compression_rows
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
