"""Keep freed memory in the process while training on the CPU.

PyTorch's CPU allocator is glibc's ``malloc``. A block above glibc's mmap threshold (128 KiB, raised
dynamically up to 32 MiB) is mapped on allocation and unmapped when freed, and free memory at the top
of the heap beyond the trim threshold goes back to the system. A training step allocates the same
large buffers every time (the experts' ``(E, F, D)`` weight gradients: 14 MiB each at SmolLM2
widths), so each step faults every page of them in again: at an editing-sized call (110 tokens) the
grouped experts' weight-gradient GEMMs took 2-3x their time in isolation, and the layer swung between
parity and 0.74x of a per-expert loop from run to run (benchmarks/RESULTS.md). Raising both
thresholds makes freed blocks stay in the heap for the next step to reuse.

This is a process-wide setting, so the library applies it only where it trains (the editors, once per
process, on the CPU) and says so in the fast editor's plan. ``MEMOE_FAST_KEEP_FREED=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap (glibc's maximum without mallopt is 32 MiB)
TRIM_THRESHOLD = 512 << 20  # free heap kept before any is returned to the system

_state: tuple[bool, str] | None = None


def keep_freed_cpu_memory() -> tuple[bool, str]:
    """Raise glibc's mmap and trim thresholds for this process (once; later calls return the first
    outcome). Returns ``(applied, reason)``; nothing is changed off glibc or with
    ``MEMOE_FAST_KEEP_FREED=0``."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def _apply() -> tuple[bool, str]:
    if os.environ.get("MEMOE_FAST_KEEP_FREED", "1") == "0":
        return False, "MEMOE_FAST_KEEP_FREED=0"
    if not sys.platform.startswith("linux"):
        return False, f"not glibc ({sys.platform})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False, "no mallopt in the C library (not glibc)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return False, "mallopt refused the thresholds"
    return True, (f"glibc keeps freed blocks under {MMAP_THRESHOLD >> 20} MiB in the heap, "
                  f"up to {TRIM_THRESHOLD >> 20} MiB free, for the next step to reuse")


__all__ = ["keep_freed_cpu_memory"]
