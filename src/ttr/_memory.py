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

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
_kept = False


def _glibc():
    """The process's C library where it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # musl has neither
        return None
    return libc


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every block from the heap (no mmap) and never trim it. Returns whether it did."""
    global _kept
    libc = _glibc()
    if libc is None or os.environ.get("TTR_RELEASE_MEMORY") == "1" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    _kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _kept


def release_freed_memory() -> None:
    """The opposite, for measuring memory by the resident set (ttr bench's peak): large blocks in mmap at a fixed
    64 KiB threshold (returned to the system on free; glibc's own threshold rises after big frees and keeps them),
    and every free page handed back now."""
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's default
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
    libc.malloc_trim(0)


def freed_memory_kept() -> bool:
    """Whether keep_freed_memory took effect in this process: what ttr bench's timings ran with (the memory it
    measures after them, by release_freed_memory, leaves this as it is)."""
    return _kept
