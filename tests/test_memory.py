"""dipo_scale.memory: the steady allocator keeps freed activations mapped (a real glibc process)."""

import ctypes
import platform
import subprocess
import sys

import pytest

from dipo_scale import memory

FREED_RSS = """
import ctypes, sys
from dipo_scale.memory import steady_allocator
if sys.argv[1] == "steady":
    assert steady_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) * 1024
size = 32 << 20  # an activation's size: over glibc's initial mmap threshold (128 KiB)
buf = libc.malloc(size)
ctypes.memset(buf, 1, size)
touched = rss()
libc.free(buf)
print(touched - rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_steady_allocator_keeps_freed_buffers_mapped():
    def returned(mode):  # bytes handed back to the OS when the 32 MiB buffer is freed
        out = subprocess.run([sys.executable, "-c", FREED_RSS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    assert returned("default") > 24 << 20  # glibc's default: mmapped, unmapped at free
    assert returned("steady") < 4 << 20  # from the heap, kept for the next batch


def test_steady_allocator_without_glibc_changes_nothing(monkeypatch):
    def no_libc(*args, **kwargs):
        raise OSError("no libc here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert memory.steady_allocator() is False
