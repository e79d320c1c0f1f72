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
