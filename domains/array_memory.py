"""Memory that large, short-lived arrays are made from: reused arrays, and free memory handed back to the system.

Streaming readers and writers make arrays of a few MiB per strip or batch. Fresh, each one costs the
kernel a zeroed page per touch (huge pages included), which showed up as a tenth of an ingest's CPU
time; freed, glibc keeps them fragmented in per-thread arenas. :class:`ReusableArrays` hands out arrays
again once nobody else references them; :func:`release_free_memory` trims the C heap.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np


def release_free_memory() -> None:
    """Hand memory that the C allocator holds free back to the system (glibc only; elsewhere nothing).

    A strip's arrays of a few MiB are allocated and freed on several threads; glibc keeps what they
    freed in per-thread arenas, fragmented, so a process's resident memory creeps up with the number of
    strips (over 100 MiB for a full Sentinel-2 tile) although what is in use stays flat. Trimming once
    per strip keeps resident memory at what is in use, for about a millisecond.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        try:
            import ctypes
            import ctypes.util

            name = ctypes.util.find_library("c")
            if name:
                _MALLOC_TRIM = getattr(ctypes.CDLL(name), "malloc_trim", False)
        except OSError:
            pass
    return _MALLOC_TRIM or None


_MALLOC_TRIM: Any = None


class ReusableArrays:
    """Multi-MiB arrays handed out again once nothing but this pool references them.

    A fresh array of a few MiB is not free: the kernel zeroes each of its (huge) pages on first touch,
    which took about a fifth of an ingest's CPU time when every strip, band window and batch of tiles
    was a new array. An array is reused only when its reference count says that nobody else (a caller
    still holding a strip, a dataset writer storing a batch) can see it, so a caller that keeps an
    array simply gets a new one next time. :meth:`take` of another shape returns a view of a pooled
    buffer large enough; of the pool's own shape, the buffer itself (an array owning its memory).
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, keep: int):
        self.shape, self.dtype, self.keep = tuple(int(s) for s in shape), np.dtype(dtype), keep
        self._arrays: list[np.ndarray] = [np.empty(0, dtype=self.dtype)]
        # What "held by the pool only" reads as on this interpreter: the list's reference and the argument's.
        self._alone = sys.getrefcount(self._arrays[0])
        self._arrays.clear()

    def take(self, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A writeable array of ``shape`` (the pool's by default) that nobody else references; contents arbitrary."""
        shape = self.shape if shape is None else tuple(int(s) for s in shape)
        size = math.prod(shape)
        for index in range(len(self._arrays)):
            if self._arrays[index].size >= size and sys.getrefcount(self._arrays[index]) <= self._alone:
                array = self._arrays[index]
                break
        else:
            array = np.empty(shape if shape == self.shape else max(size, math.prod(self.shape)), dtype=self.dtype)
            if len(self._arrays) < self.keep:
                self._arrays.append(array)
        array.flags.writeable = True  # an array handed over read-only before, now referenced by nobody else
        if array.shape == shape:
            return array
        return array.reshape(-1)[:size].reshape(shape)
