"""Compression of models whose adapter does not merge (visual prompts, AdaptFormer, DVPT).

Every compression technique either works on such a model (its export keeps the adapter's operations and
passes the parity check) or refuses with a reason; distillation ships a plain ViT student; the compress
report says which of the two happened.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_support import tiny_backbone

from tasks.adapters import METHODS, AdapterParams, attach_adapter, merge_adapter
from tasks.models import NormalizedClassifier, build_backbone

NON_MERGEABLE = sorted(name for name, method in METHODS.items() if not method.mergeable)
PROMPTED = ("vpt-shallow", "vpt-deep", "dvpt")


def _net(info) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(tiny_backbone(depth=2), info.channels, info.num_classes, info.tile_size, task=info.task)


def _model(method: str, info) -> torch.nn.Module:
    """The dataset's normalising model with ``method`` attached and its adapter weights moved off their start
    (AdaptFormer's up-projection starts at zero: an untouched one would make the adapter invisible)."""
    adapted = attach_adapter(_net(info), AdapterParams(method=method, prompt_tokens=3, bottleneck=8))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in adapted.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return NormalizedClassifier(merge_adapter(adapted), info.channel_mean, info.channel_std).eval()


def _plain(info) -> torch.nn.Module:
    return NormalizedClassifier(_net(info), info.channel_mean, info.channel_std).eval()


def _ops(path: Path) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _context(dataset, metadata: dict, method: str, out_dir: Path, teacher: torch.nn.Module):
    from tasks.compression.technique import CompressionContext

    return CompressionContext(dataset=dataset, metadata={**metadata, "adapter": method, "adapter_mergeable": False},
                              out_dir=out_dir, parity_images=dataset.splits["test"].images[:16],
                              parity_tolerance=1e-4, threads=1, teacher=teacher, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", NON_MERGEABLE)
def test_every_compression_technique_works_on_a_non_mergeable_adapter_or_refuses_with_a_reason(
        method: str, dataset, model_metadata: dict, tmp_path: Path) -> None:
    from tasks import openvino_runtime
    from tasks.compression.distill import DistillParams, DistillStudent
    from tasks.compression.export import ExportOnnx
    from tasks.compression.openvino import ConvertOpenVino
    from tasks.compression.prune import PruneParams, PruneStructured
    from tasks.compression.quantize import QuantizationParams, QuantizeOnnx
    from tasks.compression.recipe import ReduceTokens
    from tasks.compression.technique import REFERENCE_ROOT, Variant
    from tasks.compression.tokens import TokenReductionParams

    info = dataset.info
    model = _model(method, info)
    context = _context(dataset, model_metadata, method, tmp_path, model)
    start = Variant(REFERENCE_ROOT, model)
    x = torch.from_numpy(np.asarray(dataset.splits["test"].images[:8]))

    # Export (parity 1e-4 checked inside the step, which raises otherwise) keeps the adapter's operations.
    exported = ExportOnnx(fuse=False).apply(start, context)
    plain = ExportOnnx(fuse=False).apply(Variant("plain", _plain(info)), context)
    assert sum(_ops(exported.onnx).values()) > sum(_ops(plain.onnx).values())
    fused = ExportOnnx(fuse=True).apply(Variant("fused", model), context)
    assert fused.records[-1]["parity"]["max_abs_diff"] <= 1e-4

    quantizers = [QuantizeOnnx("int8", QuantizationParams(calibration_samples=16)), QuantizeOnnx("int8-dynamic"),
                  QuantizeOnnx("fp16")]
    if openvino_runtime.available():
        quantizers += [ConvertOpenVino("fp32"), ConvertOpenVino("int8", 16)]
    for quantizer in quantizers:
        variant = quantizer.apply(exported, context)
        assert variant.onnx.is_file() and variant.records[-1]["stage"] == "quantize", variant.records[-1]

    # Pruning keeps the adapter: the pruned model still differs from the same net pruned without it.
    from tasks.compression.prune import prune_vit

    pruned = ExportOnnx(fuse=False).apply(
        PruneStructured(PruneParams(enabled=True, ratio=0.5, recovery_epochs=0)).apply(start, context), context)
    with torch.inference_mode():
        assert not torch.allclose(pruned.model(x), prune_vit(_plain(info), 0.5)(x), atol=1e-4)

    for tokens in (TokenReductionParams(method="tome", merge_r=2, min_tokens=4),
                   TokenReductionParams(method="evit", keep_ratio=0.7)):
        if method in PROMPTED:
            with pytest.raises(ValueError, match="would drop the visual prompts"):
                ReduceTokens(tokens).apply(start, context)
        else:
            reduced = ExportOnnx(fuse=False).apply(ReduceTokens(tokens).apply(start, context), context)
            plain_reduced = ReduceTokens(tokens).apply(Variant(REFERENCE_ROOT, _plain(info)), context)
            with torch.inference_mode():
                assert not torch.allclose(reduced.model(x), plain_reduced.model(x), atol=1e-4)

    # Distillation ships a plain ViT: no prompt or adapter tensor, the plain graph's operations.
    student = ExportOnnx(fuse=False).apply(
        DistillStudent(DistillParams(enabled=True, student_depth=2, epochs=1)).apply(start, context), context)
    assert set(student.model.state_dict()) == set(_plain(info).state_dict())
    assert _ops(student.onnx) == _ops(plain.onnx)


@pytest.mark.slow
def test_the_written_compress_report_says_the_adapter_was_kept_and_the_student_is_plain(
        dataset_dir: Path, dataset, model_metadata: dict, tmp_path: Path) -> None:
    from tasks.compression.distill import DistillParams
    from tasks.compression.quantize import QuantizationParams
    from tasks.compression.recipe import CompressParams, compress_model

    params = CompressParams(latency_repeats=5, throughput_batch=4, threads=1, profile="cpu-2core",
                            quantization=QuantizationParams(calibration_samples=16),
                            distillation=DistillParams(enabled=True, student_depth=1, epochs=1))
    metadata = {**model_metadata, "adapter": "vpt-deep", "adapter_mergeable": False}
    report = compress_model(_model("vpt-deep", dataset.info), dataset_dir, metadata, params, tmp_path)
    written = json.loads(report.write(tmp_path / "compress_report.json").read_text())
    assert written["adapter"]["method"] == "vpt-deep" and written["adapter"]["mergeable"] is False
    assert "keep the adapter's operations" in written["adapter"]["export"]
    assert "distilled student is a plain ViT" in written["adapter"]["export"]
    assert "student-d1" in [v["name"] for v in written["variants"]]
