"""Freed memory kept in the process, for ttr's own commands (glibc).

A step of training or timing frees its activations and allocates them again the next step. glibc's malloc hands
large blocks back to the system (mmap'd blocks at once, the heap's top past a threshold), so the next step
faults every page in afresh: about 0.8 us per 4 KiB page on a VM, 10-20 % of the gated delta rule's
forward+backward at T = 8192, D = 128 on this project's CPU (about 30 000 faults a step; none with this).
`ttr`'s own commands ask glibc to keep what is freed, as a GPU caching allocator keeps its blocks; the process
then holds its peak memory until it exits. A library must not change its host's allocator, so importing ttr
changes nothing. Skipped where MALLOC_* settings are already in the environment, off glibc, and with
TTR_RELEASE_MEMORY=1.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_kept = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every block from the heap (no mmap) and never trim it. Returns whether it did."""
    global _kept
    if (not sys.platform.startswith("linux") or os.environ.get("TTR_RELEASE_MEMORY") == "1"
            or any(name.startswith("MALLOC_") for name in os.environ)):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library; musl has no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _kept


def freed_memory_kept() -> bool:
    """Whether this process keeps freed memory (keep_freed_memory succeeded)."""
    return _kept
