"""What decides a run's numbers, pinned before the work starts and recorded with the run.

The contract (README, "Reproducibility"): on CPU, the same dataset digest, seed, thread count and
library versions give bitwise-identical weights, metrics and ONNX files. :func:`pin_determinism`
makes it true for the process that calls it (seeds every generator, turns on deterministic kernels,
fixes the intra-op thread count, which sets how float sums are split and so their rounding), and
:func:`environment_record` says what the run depended on, for MLflow.

Not covered: GPUs (cuBLAS/cuDNN pick kernels by device; deterministic mode makes a run repeatable
on the same GPU and driver only), another CPU model (SIMD width changes float rounding), another
thread count, or other library versions.
"""

from __future__ import annotations

import os
import platform
import random
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata

# The thread count training and compression use unless told otherwise: a fixed number, not "all
# cores of whatever machine runs it", so a laptop, a CI runner and a Prefect worker compute the same
# sums in the same order. Two matches the cpu-2core target profile.
DEFAULT_THREADS = 2

# Libraries whose versions change the numbers (kernels, initialisers, exporters, quantizers).
RECORDED_LIBRARIES = ("torch", "timm", "peft", "numpy", "onnx", "onnxruntime", "onnxscript", "torch-pruning")


@dataclass(frozen=True)
class ReproducibilityRecord:
    """The settings a result depends on; two runs with equal records and inputs give equal bytes on CPU."""

    seed: int | None
    threads: int
    deterministic: bool
    device: str
    cpu: str
    python: str
    versions: dict[str, str] = field(default_factory=dict)

    def as_tags(self) -> dict[str, str]:
        """Flat ``vitrail.repro.*`` tags (MLflow tag values are strings)."""
        tags = {f"vitrail.repro.{key}": "not pinned" if value is None else str(value)
                for key, value in asdict(self).items() if key != "versions"}
        tags.update({f"vitrail.repro.version.{name}": version for name, version in self.versions.items()})
        return tags


_pinned: dict[str, object] = {}


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`RECORDED_LIBRARIES` ('absent' where not installed)."""
    versions = {}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    if versions["torch"] != "absent":
        import torch

        versions["torch"] = torch.__version__  # keeps the build tag (+cpu, +cu130): the kernels differ
    return versions


def cpu_model() -> str:
    """The CPU's model name (float rounding of SIMD kernels depends on it), or the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pin_determinism(seed: int, threads: int = DEFAULT_THREADS) -> ReproducibilityRecord:
    """Seed python, numpy and torch, force deterministic kernels and fix torch's thread count.

    Call it at the start of a unit of work (before any model is built: weight initialisation draws
    from torch's global generator), in the thread that does the work.
    """
    import numpy as np
    import torch

    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    # cuBLAS is only deterministic with a fixed workspace; it must be set before the first CUDA call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    # warn_only: an op without a deterministic kernel (some CUDA backward passes) warns instead of
    # failing the run; on CPU the ops Vitrail uses all have one.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.set_num_threads(threads)
    _pinned.update(seed=seed, threads=threads)
    return environment_record()


def environment_record() -> ReproducibilityRecord:
    """What this process's results depend on now: the pinned seed and threads, versions, device, CPU."""
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{torch.cuda.get_device_name(0)}"
    return ReproducibilityRecord(
        seed=_pinned.get("seed"),  # type: ignore[arg-type]
        threads=int(_pinned.get("threads") or torch.get_num_threads()),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        device=device,
        cpu=cpu_model(),
        python=sys.version.split()[0],
        versions=library_versions(),
    )
