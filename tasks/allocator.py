"""Let a process that streams large buffers reuse the memory it frees instead of faulting in fresh pages.

glibc serves every allocation above its mmap threshold (128 KiB at start, raised adaptively up to 32 MiB)
with a fresh mapping that it unmaps again on free, and trims its heaps beyond a threshold twice that. An
ingest allocates such buffers for every chunk it writes (Blosc's output bytes and work buffers, zstd's
context per block, numpy temporaries of a tile batch), so each is paid again as page faults and the
kernel zeroing fresh pages: about a tenth of an 11 520^2 px Sentinel-2 ingest's CPU in ``perf``.
Raising both thresholds makes freed buffers stay in the allocator's heaps and serve the next chunk.

Memory stays bounded: what is kept is what the busiest moment held (the next chunk reuses it), and heap
tops beyond ``trim_bytes`` are still given back. The setting is process-wide and permanent; it is made
once, by the first dataset writer in a process. Other C libraries (musl) or platforms: nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20
"""Allocations up to this size come from the heaps (32 MiB: glibc's largest; a 16 MiB chunk and its output fit)."""
TRIM_THRESHOLD_BYTES = 256 * 2**20
"""Free memory at a heap's top kept for reuse before it is given back to the kernel."""

_lock = threading.Lock()
_done: bool | None = None


def keep_freed_memory_for_reuse() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when glibc accepted both."""
    global _done
    with _lock:
        if _done is None:
            _done = _set_thresholds()
        return _done


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    accepted = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not accepted:
        log.debug("the C library declined the malloc thresholds; freed buffers go back to the kernel")
    return accepted
