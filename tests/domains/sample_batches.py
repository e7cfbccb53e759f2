"""Collecting a streaming domain reader's batches into one SampleSet, for tests that look at a whole source."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from domains.spec import SampleSet


def collect_batches(batches: SampleSet | Iterable[SampleSet]) -> SampleSet:
    """Concatenate a reader's batches as the streaming contract says they merge (images in physical units)."""
    parts = [batches] if isinstance(batches, SampleSet) else list(batches)
    first = parts[0]
    for part in parts[1:]:
        for name in ("source", "channels", "class_names", "task", "scaling", "windows"):
            assert getattr(part, name) == getattr(first, name), f"batches disagree on {name}"
    dropped: dict[str, int] = {}
    provenance: dict[str, str] = {}
    quarantine: list[dict[str, str]] = []
    for part in parts:
        for reason, count in part.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
        provenance.update(part.provenance)
        quarantine.extend(q for q in part.quarantine if q not in quarantine)
    ids = [p.sample_ids for p in parts]
    return SampleSet(
        images=np.concatenate([p.physical() for p in parts]), labels=np.concatenate([p.labels for p in parts]),
        groups=np.concatenate([p.groups for p in parts]), locations=np.concatenate([p.locations for p in parts]),
        source=first.source, channels=first.channels, class_names=first.class_names, dropped=dropped,
        provenance=provenance, task=first.task, quarantine=quarantine, windows=first.windows,
        sample_ids=None if any(i is None for i in ids) else np.concatenate(ids))
