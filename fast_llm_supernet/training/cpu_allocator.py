"""`fast_llm_supernet.training.cpu_allocator`: keep the memory a CPU training step frees for the next step.

glibc's malloc gives blocks above its mmap threshold (128 KiB at start, raised as such blocks are freed, at most
32 MiB) fresh pages from the kernel and hands them back on free, and trims freed memory at the top of its heap.
A training step allocates and frees the same activations every step (a layer-local step: [4, 256, 576] inputs,
[4, 9, 4, 64, 64] chunk scores, their gradients, for 90 mixers), so on glibc's defaults each of them costs page
faults that zero every page again. With the mmap threshold at its maximum and no trimming, freed blocks stay in
the process and are reused; the resident size stays at the step's peak. glibc only (elsewhere: no change).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_NEVER = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to its maximum and stop heap trimming, once per process.

    Returns whether it took effect (False off glibc, or where mallopt refuses)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except (OSError, TypeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc's own symbol: others lack these mallopt parameters
        return False
    done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_NEVER) == 1
    if not done:
        logger.warning("glibc mallopt refused the allocator settings; freed memory goes back to the kernel")
    return done
