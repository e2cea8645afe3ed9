#!/usr/bin/env python3
"""RSS of N open oxcow handles (issue 18): opens IMAGE read-only N times through liboxcow's C
ABI (ctypes), prints the RSS growth after the opens and after reading 4 KiB every STEP bytes
(default 64 MiB) through every handle, so each handle's L2 cache holds what those reads need.

Usage: scripts/bench-rss.py LIBOXCOW.so IMAGE N [STEP_MIB]
Example: qemu-img create -f qcow2 -o preallocation=metadata /var/tmp/big.qcow2 100G
         scripts/bench-rss.py target/release/liboxcow.so /var/tmp/big.qcow2 100
"""
import ctypes
import os
import sys


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def main():
    lib = ctypes.CDLL(sys.argv[1])
    path = sys.argv[2].encode()
    n = int(sys.argv[3])
    step = (int(sys.argv[4]) if len(sys.argv) > 4 else 64) << 20
    base = rss_kib()
    handles = []
    for _ in range(n):
        h = ctypes.c_void_p()
        rc = lib.oxcow_open(path, 0, None, ctypes.byref(h), None)
        if rc != 0:
            sys.exit(f"oxcow_open: {rc}")
        handles.append(h)
    opened = rss_kib()
    buf = ctypes.create_string_buffer(4096)
    for h in handles:
        off = 0
        while True:
            rc = lib.oxcow_pread(h, buf, ctypes.c_size_t(4096), ctypes.c_uint64(off))
            if rc != 0:
                break  # past the virtual size (-EINVAL)
            off += step
    touched = rss_kib()
    name = os.path.basename(sys.argv[2])
    print(f"{n} handles of {name}: after open +{opened - base} KiB "
          f"({(opened - base) / n:.0f} KiB/handle), after reads +{touched - base} KiB "
          f"({(touched - base) / n:.0f} KiB/handle)")
    for h in handles:
        lib.oxcow_close(h)


if __name__ == "__main__":
    main()
