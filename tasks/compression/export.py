"""Export a torch model to ONNX and check that the export predicts what the torch model predicts."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.atomic_files import atomic_path
from tasks.onnx_runtime import ATTENTION_NAME, INPUT_NAME, OUTPUT_NAME, open_session, session_predictor, write_metadata
from tasks.evaluation import predict_in_batches
from tasks.training import predict_logits

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """An exported model disagrees with its torch source beyond tolerance."""


@dataclass(frozen=True)
class ParityReport:
    """How closely an ONNX file reproduces a reference model on the same inputs."""

    max_abs_diff: float
    mean_abs_diff: float
    agreement: float
    samples: int
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def export_onnx(model: nn.Module, example: np.ndarray, path: Path, metadata: dict) -> Path:
    """Export ``model`` (eval mode) with a dynamic batch axis and embed Vitrail metadata.

    The file appears at ``path`` complete or not at all (written under a temporary name, then renamed).
    """
    model = model.eval()
    # Trace with a batch of 2: torch.export specialises a traced size of 1, which then conflicts with the
    # dynamic batch range in models that upsample (segmentation heads): "Invalid ranges [2:1]".
    sample = torch.from_numpy(np.ascontiguousarray(np.repeat(example[:1], 2, axis=0) if len(example) < 2
                                                   else example[:2], dtype=np.float32))
    batch = torch.export.Dim("batch", min=1, max=4096)
    dims, outputs = {0: batch}, [OUTPUT_NAME]
    if _is_slide_model(model):
        # Bags (B, T, C, H, W) of any number of tiles; the attention weights are a second output, so a
        # prediction can show which tiles decided the slide.
        from tasks.models import BagOutputs

        model, outputs = BagOutputs(model).eval(), [OUTPUT_NAME, ATTENTION_NAME]
        dims[1] = torch.export.Dim("tiles", min=1, max=65536)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(model, (sample,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=outputs, dynamic_shapes=(dims,), verbose=False)
    with atomic_path(path) as partial:
        program.save(str(partial), external_data=False)
        write_metadata(partial, metadata)
    return path


def _is_slide_model(model: nn.Module) -> bool:
    from tasks.models import AttentionMIL

    return any(isinstance(m, AttentionMIL) for m in model.modules())


def compare_logits(reference: np.ndarray, candidate: np.ndarray, tolerance: float) -> ParityReport:
    """Parity statistics between two logit arrays of the same inputs."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    return ParityReport(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                        agreement=float((reference.argmax(1) == candidate.argmax(1)).mean()),
                        samples=len(reference), tolerance=tolerance)


def check_parity(model: nn.Module, onnx_path: Path, images: np.ndarray, tolerance: float,
                 threads: int = 2) -> ParityReport:
    """Run the torch model and the ONNX file on ``images`` and compare logits."""
    reference = predict_logits(model, images)
    candidate = predict_in_batches(session_predictor(open_session(onnx_path, threads)), images)
    report = compare_logits(reference, candidate, tolerance)
    log.info("parity %s: max |diff| %.2e (tolerance %.1e), agreement %.4f", onnx_path.name,
             report.max_abs_diff, tolerance, report.agreement)
    return report


def require_parity(report: ParityReport, path: Path) -> ParityReport:
    """Raise :class:`ParityError` when ``report`` is outside its tolerance."""
    if not report.passed:
        raise ParityError(f"{path}: ONNX export differs from the torch model by {report.max_abs_diff:.3g} "
                          f"> tolerance {report.tolerance:g}")
    return report


class ExportOnnx:
    """The export technique: torch variant -> fp32 ONNX file, failing the step beyond the parity tolerance.

    With ``fuse`` (the default) the export is then optimised for CPU inference (each attention block
    becomes one ``Attention`` op, residual+LayerNorm and bias+GELU become fused ops; see
    :mod:`tasks.compression.fuse`), and the parity check runs on the fused file, so every later step
    (quantization included) starts from a graph that is both fast and checked against torch.
    """

    stage = "export"

    def __init__(self, fuse: bool = True):
        self.fuse = fuse

    def apply(self, variant, context):
        from tasks.compression.technique import REFERENCE_ROOT, onnx_file_name

        name = "onnx-fp32" if variant.name == REFERENCE_ROOT else variant.name
        path = context.out_dir / onnx_file_name(name)
        record: dict = {}
        # Export, fusion and the parity check all work on the temporary file: only a checked export is
        # ever visible under the variant's name (a rerun after a crash never picks up a half-made file).
        with atomic_path(path) as partial:
            export_onnx(variant.model, context.parity_images, partial, context.metadata)
            if self.fuse:
                from tasks.compression.fuse import optimize_for_cpu

                record["fusion"] = optimize_for_cpu(partial, partial, context.parity_images,
                                                    tolerance=context.parity_tolerance / 10, threads=context.threads)
                write_metadata(partial, context.metadata)
            report = require_parity(check_parity(variant.model, partial, context.parity_images,
                                                 context.parity_tolerance, context.threads), path)
        return variant.then("export", name, {"parity": report.as_dict(), **record}, onnx=path)
