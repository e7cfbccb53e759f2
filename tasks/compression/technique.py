"""The one interface every compression technique implements, and the fixed order they are applied in.

A technique takes a :class:`Variant` (a torch model, and its ONNX file once exported) plus the shared
:class:`CompressionContext`, and returns a new variant whose ``records`` say what it did. Techniques
never modify their input. :func:`run_recipe` applies them in :data:`ORDER` (distill, prune, token
reduction, export, quantize) and exports every torch hop to ONNX with a parity check, so a technique
that breaks exportability or changes predictions fails at its own step, not at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from torch import nn

from tasks.dataset import Dataset

log = logging.getLogger(__name__)

ORDER = ("distill", "prune", "tokens", "export", "quantize")
TORCH_STAGES = ("distill", "prune", "tokens")
# Names the three original variants' files keep, so validation written against them keeps working;
# every other variant's file is ``<variant name>.onnx``.
LEGACY_FILES = {"onnx-fp32": "model-fp32.onnx", "onnx-int8": "model-int8.onnx",
                "onnx-int8-dynamic": "model-int8-dynamic.onnx"}
REFERENCE_ROOT = "onnx"


def onnx_file_name(variant: str) -> str:
    """File name of a variant's ONNX file under the run's ``onnx/`` artifact folder."""
    return LEGACY_FILES.get(variant, f"{variant}.onnx")


def derived_name(base: str, suffix: str) -> str:
    """Name of a variant derived from ``base``: ``pruned30`` + ``int8`` -> ``pruned30-int8``.

    The reference model's own hops keep their historical names (``onnx-fp32``, ``onnx-int8``...).
    """
    if base in (REFERENCE_ROOT, "onnx-fp32"):
        return f"onnx-{suffix}"
    return f"{base}-{suffix}"


# Exports are checked for parity (and fused graphs for equivalence) on this many test samples, read
# once into memory: enough to catch a broken export, bounded whatever the size of the split.
PARITY_SAMPLES = 256


@dataclass
class CompressionContext:
    """What every technique may read: data, the reference (teacher) model, where to write, tolerances.

    ``seed`` and ``threads`` are the reproducibility settings every training step inside the recipe
    (distillation, pruning recovery) runs with.
    """

    dataset: Dataset
    metadata: dict
    out_dir: Path
    parity_images: np.ndarray
    """Samples every export is checked on: the first ``PARITY_SAMPLES`` tiles of the test split (whole bags
    for a slide model), read once."""
    parity_tolerance: float = 1e-3
    threads: int = 2
    teacher: nn.Module | None = None
    flips: bool = True
    seed: int = 0
    _teacher_logits: np.ndarray | None = field(default=None, repr=False)

    def teacher_logits(self) -> np.ndarray:
        """The teacher's logits on every augmented view of the training split, computed once and shared."""
        from tasks.training import cache_teacher_logits

        if self.teacher is None:
            raise ValueError("this technique needs the reference model as a teacher; none was given")
        if self._teacher_logits is None:
            self._teacher_logits = cache_teacher_logits(self.teacher, self.dataset.splits["train"].images,
                                                        flips=self.flips)
        return self._teacher_logits


@dataclass(frozen=True)
class Variant:
    """One model variant: its torch source, its ONNX file once exported, and how it was made."""

    name: str
    model: nn.Module
    onnx: Path | None = None
    precision: str = "fp32"
    runtime: str = "onnxruntime"
    """What runs ``onnx`` (the variant's model file): ``onnxruntime`` (a .onnx file) or ``openvino`` (an IR .xml)."""
    steps: tuple[str, ...] = ()
    records: tuple[dict, ...] = ()

    def then(self, stage: str, name: str, record: dict, **changes) -> "Variant":
        """The variant after one more technique."""
        return replace(self, name=name, steps=(*self.steps, stage),
                       records=(*self.records, {"stage": stage, "variant": name, **record}), **changes)


class Technique(Protocol):
    """A compression step: ``apply(variant, context) -> variant``; ``stage`` is its place in :data:`ORDER`."""

    stage: str

    def apply(self, variant: Variant, context: CompressionContext) -> Variant: ...


def run_recipe(start: Variant, techniques: Sequence[Technique], context: CompressionContext) -> list[Variant]:
    """Apply ``techniques`` in :data:`ORDER`; return every ONNX variant produced along the way.

    Torch techniques chain (distill -> prune -> tokens); each of their results is exported and
    parity-checked before the next one runs. Quantizers branch: each quantizes the last export.
    """
    from tasks.compression.export import ExportOnnx

    unknown = [t.stage for t in techniques if t.stage not in ORDER]
    if unknown:
        raise ValueError(f"unknown compression stage(s) {unknown}; known, in order: {', '.join(ORDER)}")
    ordered = sorted(techniques, key=lambda t: ORDER.index(t.stage))
    exporter = next((t for t in ordered if t.stage == "export"), ExportOnnx())
    produced: list[Variant] = []
    current = start
    for technique in ordered:
        if technique.stage in TORCH_STAGES:
            current = exporter.apply(technique.apply(current, context), context)
            produced.append(current)
            log.info("built %s (%s)", current.name, current.runtime)
    if current.onnx is None:
        current = exporter.apply(current, context)
        produced.append(current)
        log.info("built %s (%s)", current.name, current.runtime)
    for technique in ordered:
        if technique.stage == "quantize":
            produced.append(technique.apply(current, context))
            log.info("built %s (%s)", produced[-1].name, produced[-1].runtime)
    return produced
