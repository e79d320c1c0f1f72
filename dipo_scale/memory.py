"""This process's memory, measured without importing torch (the benchmarks call it too)."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: Linux's VmHWM (the high-water mark of this
    program's own memory; getrusage's ru_maxrss also counts the RSS of the process it was forked
    from, carried over exec), else getrusage (macOS: bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Fix glibc malloc's thresholds for this process (a CPU forward loop's activations): buffers
    under `mmap_threshold` bytes come from the heap, and up to `trim_threshold` bytes of freed
    heap stay mapped. By default glibc moves both thresholds as it goes and hands freed memory
    back to the OS between forwards, so every batch page-faults its activations in again: a bare
    forward of the demo model's decoder trunk ran at 92-129 k tokens/s with the defaults and
    146-156 k after this call (2 threads, 2014 blocks of 256; the forward to the logits, whose
    8 MB output moves the thresholds up itself, ran at 125-143 k either way). Costs at most
    `trim_threshold` bytes of freed memory kept. True where applied; False off glibc (nothing changed)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
