#!/usr/bin/env python3
"""RSS of N open oxcow handles (issue 18): opens IMAGE read-only N times through liboxcow's C
ABI (ctypes), prints the RSS growth after the opens and after reading 4 KiB every STEP bytes
(default 64 MiB) through every handle, so each handle's L2 cache holds what those reads need.

With CLEAN_SECS, the handles open with that cache_clean_interval; after the reads the script
waits for the interval to pass, then makes 256 more requests per handle (the per-thread
request count at which an idle clean is checked; they read offset 0 again), twice (a clean
drops what was unused since the previous clean), and prints the RSS after the idle cleaning, then again after glibc's malloc_trim(0) (what the allocator keeps
cached rather than giving back to the kernel).

Usage: scripts/bench-rss.py LIBOXCOW.so IMAGE N [STEP_MIB] [CLEAN_SECS]
Example: qemu-img create -f qcow2 -o preallocation=metadata /var/tmp/big.qcow2 100G
         scripts/bench-rss.py target/release/liboxcow.so /var/tmp/big.qcow2 100 64 2
"""
import ctypes
import os
import sys
import time

# Requests of one thread between two checks for an idle clean (engine/cache.rs TICK_REQUESTS).
TICK_REQUESTS = 256


class OpenOptions(ctypes.Structure):
    """oxcow_open_options (include/oxcow.h), version 4."""
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("overlap_check", ctypes.c_uint32),
        ("cache_size", ctypes.c_uint64),
        ("snapshot", ctypes.c_char_p),
        ("refcount_cache_size", ctypes.c_uint64),
        ("l2_slice_size", ctypes.c_uint64),
        ("cache_clean_interval", ctypes.c_uint64),
    ]


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def per(kib, n):
    return f"+{kib} KiB ({kib / n:.0f} KiB/handle)"


def main():
    lib = ctypes.CDLL(sys.argv[1])
    path = sys.argv[2].encode()
    n = int(sys.argv[3])
    step = (int(sys.argv[4]) if len(sys.argv) > 4 else 64) << 20
    clean = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    opts = None
    if clean:
        opts = OpenOptions()
        lib.oxcow_open_options_init(ctypes.byref(opts))
        opts.cache_clean_interval = clean
        opts = ctypes.byref(opts)
    base = rss_kib()
    handles = []
    for _ in range(n):
        h = ctypes.c_void_p()
        rc = lib.oxcow_open(path, 0, opts, ctypes.byref(h), None)
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
    line = (f"{n} handles of {name}: after open {per(opened - base, n)}, "
            f"after reads {per(touched - base, n)}")
    if clean:
        # An idle clean drops what nobody used since the previous one, so the entries the
        # reads loaded go at the second clean after them.
        for _ in range(2):
            time.sleep(clean + 1)
            for h in handles:
                for _ in range(TICK_REQUESTS):
                    lib.oxcow_pread(h, buf, ctypes.c_size_t(4096), ctypes.c_uint64(0))
        cleaned = rss_kib()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        trimmed = rss_kib()
        line += (f", after idle cleaning {per(cleaned - base, n)}, "
                 f"after malloc_trim {per(trimmed - base, n)}")
    print(line)
    for h in handles:
        lib.oxcow_close(h)


if __name__ == "__main__":
    main()
