"""Keep freed CPU tensor memory in the process: two glibc malloc settings, applied when nclib is imported.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (128 KiB at start, raised
as blocks are freed) with a fresh ``mmap`` and hands a free heap top above its trim threshold back to the kernel, so
a step that allocates the same (B, K, H, W) tensors on every call faults every page of them in again (the kernel
zeroes each 4 KiB page on first touch). For the NC loss at scale 0.5 and the softmax before it, that costs about as
much as the arithmetic. Fixing the mmap threshold at glibc's largest (32 MiB) and the trim threshold at 1 GiB keeps
such blocks in the heap for reuse; ``make bench`` measures the effect (``benchmarks/losses.md``). PyTorch's CPU
performance guide preloads jemalloc or tcmalloc for the same reason; this needs no extra library. The price: the
heap does not shrink after a peak (as with PyTorch's CUDA caching allocator). Blocks above 32 MiB are mmapped and
returned as before, so peaks of large inputs are unchanged.

``NCLIB_KEEP_CPU_MEMORY=0`` in the environment before ``import nclib`` leaves malloc as it is. Elsewhere than on
glibc (macOS, musl, Windows) nothing is changed.
"""
from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_memory", "kept"]

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

_kept = False


def keep_freed_memory() -> bool:
    """Set the two thresholds (idempotent). Returns True where they are set (glibc), False elsewhere."""
    global _kept
    if _kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _kept = ok
    return ok


def kept() -> bool:
    """Whether :func:`keep_freed_memory` has set the thresholds in this process."""
    return _kept


if os.environ.get("NCLIB_KEEP_CPU_MEMORY", "1").strip() not in ("0", "false", "no", "off"):
    keep_freed_memory()
