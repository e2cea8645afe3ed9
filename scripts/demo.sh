#!/usr/bin/env bash
# Builds the Rust library and CLI and runs the main job on a sample image:
# QEMU writes an image, oxcow reads it back byte-for-byte, oxcow writes plain and compressed
# copies, oxcow and QEMU check them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --lib --bins
bin=target/release/oxcow
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== sample image made by qemu-img/qemu-io"
qemu-img create -q -f qcow2 "$work/sample.qcow2" 256M
qemu-io -f qcow2 -c 'write -P 0xab 0 3M' -c 'write -P 0x5c 100M 64k' -c 'write -z 200M 1M' \
  "$work/sample.qcow2" >/dev/null

echo "== oxcow info"
$bin info "$work/sample.qcow2"
echo "== oxcow map"
$bin map "$work/sample.qcow2"

echo "== oxcow reads it: compare with qemu-img convert -O raw"
$bin convert -O raw "$work/sample.qcow2" "$work/oxcow.raw"
qemu-img convert -O raw "$work/sample.qcow2" "$work/qemu.raw"
cmp "$work/oxcow.raw" "$work/qemu.raw" && echo "identical"

echo "== oxcow writes a copy: qemu-img check and compare"
$bin convert -O qcow2 "$work/sample.qcow2" "$work/copy.qcow2"
qemu-img check "$work/copy.qcow2"
qemu-img compare "$work/sample.qcow2" "$work/copy.qcow2"

echo "== oxcow writes a compressed copy; oxcow check agrees with qemu-img check"
$bin convert -c -O qcow2 "$work/sample.qcow2" "$work/small.qcow2"
$bin check "$work/small.qcow2"
qemu-img check -q "$work/small.qcow2" && echo "qemu-img check: clean"
qemu-img compare -q "$work/sample.qcow2" "$work/small.qcow2" && echo "compressed copy identical"
ls -l "$work/copy.qcow2" "$work/small.qcow2" | awk '{print $5, $NF}'
