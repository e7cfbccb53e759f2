"""Freed chunk-sized buffers are reused instead of faulted in afresh (what the dataset writer relies on)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Allocates, fills and frees a 16 MiB buffer (one chunk's worth) 40 times; prints the minor page faults.
_PROBE = """
import json, resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from tasks.allocator import keep_freed_memory_for_reuse
    assert keep_freed_memory_for_reuse()
np.ones(16 * 2**20, dtype=np.uint8)  # the first buffer is fresh either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    np.ones(16 * 2**20, dtype=np.uint8)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_freed_chunk_buffers_are_reused_without_page_faults():
    from tasks.allocator import keep_freed_memory_for_reuse

    assert keep_freed_memory_for_reuse() is keep_freed_memory_for_reuse()  # once per process, same answer
    default, tuned = _faults("default"), _faults("tuned")
    # Untuned, every 16 MiB buffer is a fresh mapping: thousands of faults (4 KiB pages) or at least one per
    # 2 MiB huge page; tuned, the freed buffer is handed out again.
    assert default >= 40 * 8
    assert tuned < default / 10
