"""The server keeps large heap blocks mapped (glibc), so that per-token
buffers do not pile up in fragmented per-thread arenas over a long run."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc allocator setting")

CHILD = r"""
import ctypes, sys

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "bounded":
    from slot_cpp.server.app import bound_heap_growth
    assert bound_heap_growth()
size = 1 << 20   # a 262k-token vocabulary of float32 logits
libc.free(libc.malloc(size))   # mapped; glibc's dynamic rule then raises its threshold past it
block = libc.malloc(size)
print(libc.mallinfo2().hblkhd >= size)   # is the second block mapped, outside the arenas?
"""


def mapped(mode: str) -> bool:
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


def test_large_blocks_stay_mapped_once_the_server_sets_the_threshold():
    assert mapped("bounded")
    # Without the setting glibc moves the second block into the heap: the check can fail.
    assert not mapped("default")
