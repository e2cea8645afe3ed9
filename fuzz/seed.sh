#!/usr/bin/env bash
# Makes the seed images for the fuzz targets with qemu-img/qemu-io, one per variant oxcow
# supports: v2 (compat=0.10) and v3, cluster sizes 512 B/4 KiB/16 KiB/64 KiB, refcount_bits 1..64,
# extended L2, lazy refcounts (clean and dirty), deflate and zstd compressed clusters, zero
# clusters, raw and qcow2 backing files, internal snapshots, persistent bitmaps, metadata
# preallocation, external data files. Images are kept small (1-4 MiB virtual, a few clusters of
# data) so one execution stays fast.
#
# Usage: fuzz/seed.sh [OUTDIR]   (default fuzz/seeds; not committed: fuzz/corpus/ is the
# minimized corpus made from it, see fuzz/README.md)
#
# Backing files are recorded as "backing.raw" / "backing.qcow2" (relative): the targets create
# files of those names next to the image they open, so the backing paths are exercised too.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/seeds}"
work="$(mktemp -d /tmp/oxcow-seed.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out/image" "$out/header"
cd "$work"

MiB=$((1 << 20))
qi() { qemu-img "$@" >/dev/null; }
qio() { local img="$1"; shift; qemu-io -f qcow2 "$@" "$img" >/dev/null; }
# A few writes that leave data, zero and unallocated clusters behind.
data() {
  qio "$1" -c 'write -P 0xab 0 64k' -c 'write -P 0x5c 1000k 5k' -c 'write -z 256k 64k' \
    -c 'discard 32k 32k'
}
keep() { # keep NAME: copy the image into the seed set, and its first cluster as a header seed
  local f="$1.qcow2"
  cp "$f" "$out/image/$1.qcow2"
  local cs
  cs=$(qemu-img info -U --output=json "$f" | python3 -c 'import json,sys; print(json.load(sys.stdin)["cluster-size"])')
  head -c "$cs" "$f" >"$out/header/$1.hdr"
}

# The backing files the targets also create (fuzz/src/lib.rs: same names, same sizes).
head -c $((2 * MiB)) /dev/zero | tr '\0' '\141' >backing.raw
qi create -f qcow2 -o cluster_size=4096 backing.qcow2 2M
qio backing.qcow2 -c 'write -P 0x42 0 128k'

for compat in 0.10 1.1; do
  for cs in 512 4096 65536; do
    n="c${compat}-cs$cs"
    qi create -f qcow2 -o compat=$compat,cluster_size=$cs "$n.qcow2" 1M
    keep "$n"
    # 64 KiB clusters make big images: one with data (v3) is enough.
    [ "$cs" = 65536 ] && [ "$compat" = 0.10 ] && continue
    qi create -f qcow2 -o compat=$compat,cluster_size=$cs "$n-data.qcow2" 2M
    data "$n-data.qcow2"
    keep "$n-data"
  done
done
for rb in 1 2 4 8 16 32 64; do
  n="rb$rb"
  qi create -f qcow2 -o cluster_size=4096,refcount_bits=$rb "$n.qcow2" 2M
  data "$n.qcow2"
  keep "$n"
done
n=rb1-cs512; qi create -f qcow2 -o cluster_size=512,refcount_bits=1 "$n.qcow2" 1M; data "$n.qcow2"; keep "$n"
n=rb64-cs512; qi create -f qcow2 -o cluster_size=512,refcount_bits=64 "$n.qcow2" 1M; data "$n.qcow2"; keep "$n"
for cs in 16384; do
  n="extl2-cs$cs"
  qi create -f qcow2 -o cluster_size=$cs,extended_l2=on "$n.qcow2" 2M
  qio "$n.qcow2" -c 'write -P 0xab 0 4k' -c 'write -P 0x11 9k 2k' -c 'write -z 40k 8k' \
    -c 'write -P 0x22 1M 64k'
  keep "$n"
done
n=lazy; qi create -f qcow2 -o cluster_size=4096,lazy_refcounts=on "$n.qcow2" 2M; data "$n.qcow2"; keep "$n"
# Dirty: qemu-io kills itself after writing, so the lazy refcounts are never written back.
n=lazy-dirty
qi create -f qcow2 -o cluster_size=4096,lazy_refcounts=on "$n.qcow2" 2M
(qemu-io -f qcow2 -c 'write -P 0xab 0 64k' -c 'write -P 0xcd 1M 8k' -c 'sigraise 9' "$n.qcow2" \
  >/dev/null 2>&1 || true) 2>/dev/null
keep "$n"
# Compressed clusters, deflate and zstd, from a raw file with compressible data.
head -c $((1 * MiB)) /dev/zero | tr '\0' '\7' >plain.raw
head -c 4096 /dev/urandom >>plain.raw
for ct in zlib zstd; do
  for cs in 4096 16384; do
    n="comp-$ct-cs$cs"
    qi convert -c -f raw -O qcow2 -o cluster_size=$cs,compression_type=$ct plain.raw "$n.qcow2"
    keep "$n"
  done
done
n=zstd-mixed
qi create -f qcow2 -o cluster_size=4096,compression_type=zstd "$n.qcow2" 2M
qio "$n.qcow2" -c 'write -c -P 0x33 0 16k' -c 'write -P 0x44 64k 8k'
keep "$n"
n=v2-comp; qi convert -c -f raw -O qcow2 -o compat=0.10,cluster_size=4096 plain.raw "$n.qcow2"; keep "$n"
# Backing files: raw and qcow2, with and without a recorded format, v2 and v3.
for bf in raw qcow2; do
  n="backing-$bf"
  qi create -f qcow2 -o cluster_size=4096 -b "backing.$bf" -F $bf "$n.qcow2" 2M
  qio "$n.qcow2" -c 'write -P 0x77 4k 2k' -c 'write -z 64k 4k'
  keep "$n"
  n="backing-$bf-v2"
  qi create -f qcow2 -o compat=0.10,cluster_size=512 -b "backing.$bf" -F $bf "$n.qcow2" 2M
  qio "$n.qcow2" -c 'write -P 0x78 1k 1k' -c 'discard 8k 4k'
  keep "$n"
done
# Internal snapshots (shared clusters, refcount 2, COPIED flags), v3 and v2.
for compat in 0.10 1.1; do
  n="snap-$compat"
  qi create -f qcow2 -o compat=$compat,cluster_size=4096 "$n.qcow2" 2M
  qio "$n.qcow2" -c 'write -P 0x01 0 16k'
  qi snapshot -c s1 "$n.qcow2"
  qio "$n.qcow2" -c 'write -P 0x02 4k 4k' -c 'write -P 0x03 1M 4k'
  qi snapshot -c s2 "$n.qcow2"
  qio "$n.qcow2" -c 'discard 0 4k'
  keep "$n"
done
# Persistent bitmaps (v3 only): one enabled and written through, one disabled.
n=bitmaps
qi create -f qcow2 -o cluster_size=4096 "$n.qcow2" 2M
qi bitmap --add "$n.qcow2" b0
qi bitmap --add -g 65536 "$n.qcow2" b1
qio "$n.qcow2" -c 'write -P 0x09 0 8k' -c 'write -P 0x0a 1M 4k'
qi bitmap --disable "$n.qcow2" b1
keep "$n"
# External data files (v3 only): guest data in data.raw (the targets create a data.raw of their
# own, 2 MiB of 'd', before each input that names it), with and without data_file_raw.
for raw in off on; do
  n="datafile-raw$raw"
  rm -f data.raw
  qi create -f qcow2 -o cluster_size=4096,data_file=data.raw,data_file_raw=$raw "$n.qcow2" 2M
  qio "$n.qcow2" -c 'write -P 0x61 0 8k' -c 'write -z 64k 4k' -c 'write -P 0x62 1M 4k'
  keep "$n"
done
n=prealloc; qi create -f qcow2 -o cluster_size=4096,preallocation=metadata "$n.qcow2" 256K; keep "$n"
n=bigger-cs512; qi create -f qcow2 -o cluster_size=512 "$n.qcow2" 4M
qio "$n.qcow2" -c 'write -P 0x10 0 3k' -c 'write -P 0x20 3M 1k' -c 'write -P 0x30 2047k 2k'
keep "$n"

echo "seed images: $(ls "$out/image" | wc -l) in $out/image ($(du -sh "$out/image" | cut -f1)), headers in $out/header"
