"""Attention and transformer-op fusion of ONNX exports: parity kept, mismatching graphs left alone with a reason."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tasks.compression.export import check_parity, export_onnx
from tasks.compression.fuse import fuse_attention, optimize_for_cpu
from tasks.compression.quantize import QuantizationParams, quantize_int8_dynamic, quantize_int8_static
from tasks.compression.tokens import TokenReductionParams, reduce_tokens
from tasks.onnx_runtime import read_metadata

METADATA = {"tile_size": 16, "channels": ["r", "g", "b"]}


def tiny_vit(depth: int = 2, embed: int = 64, heads: int = 4) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=depth, embed_dim=embed,
                             num_heads=heads, num_classes=3).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images) -> tuple[torch.nn.Module, Path]:
    model = tiny_vit()
    return model, export_onnx(model, images, tmp_path_factory.mktemp("fuse") / "vit.onnx", METADATA)


def op_counts(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_attention_fusion_keeps_parity_with_torch(exported, images, tmp_path) -> None:
    model, source = exported
    report = fuse_attention(source, tmp_path / "fused.onnx", images)
    assert report.applied and report.fused == 2 and report.max_abs_diff < 1e-4
    ops = op_counts(tmp_path / "fused.onnx")
    assert ops["Attention"] == 2 and ops["Softmax"] == 0
    assert sum(ops.values()) < sum(op_counts(source).values()) / 2
    assert check_parity(model, tmp_path / "fused.onnx", images, 1e-4).passed


def test_full_cpu_optimisation_keeps_parity_and_fuses_layernorm_and_gelu(exported, images, tmp_path) -> None:
    model, source = exported
    record = optimize_for_cpu(source, tmp_path / "opt.onnx", images)
    ops = op_counts(tmp_path / "opt.onnx")
    assert record["attention"]["fused_attention"] == 2 and "ops_skipped" not in record
    assert ops["Attention"] == 2 and ops["SkipLayerNormalization"] >= 2 and ops["BiasGelu"] == 2
    assert check_parity(model, tmp_path / "opt.onnx", images, 1e-4).passed
    assert read_metadata(tmp_path / "opt.onnx") == METADATA


def test_fused_graph_quantizes_dynamic_to_qattention_and_static(exported, images, tmp_path) -> None:
    _, source = exported
    optimize_for_cpu(source, tmp_path / "opt.onnx", images)
    dynamic = quantize_int8_dynamic(tmp_path / "opt.onnx", tmp_path / "dyn.onnx")
    assert op_counts(dynamic)["QAttention"] == 2
    static = quantize_int8_static(tmp_path / "opt.onnx", images, tmp_path / "static.onnx",
                                  QuantizationParams(calibration_samples=8))
    assert op_counts(static)["QuantizeLinear"] > 0


def test_token_merging_attention_is_not_fused_and_says_why(images, tmp_path, caplog) -> None:
    model, _ = reduce_tokens(tiny_vit(), TokenReductionParams(method="tome", merge_r=4, min_tokens=2))
    source = export_onnx(model, images, tmp_path / "tome.onnx", METADATA)
    with caplog.at_level(logging.INFO, logger="tasks.compression.fuse"):
        report = fuse_attention(source, tmp_path / "out.onnx", images)
    # ToMe adds log(size) to the attention scores and reads the keys: those blocks must stay as they are.
    assert report.skipped and all("attention" in reason for reason in report.skipped)
    assert report.fused < 2
    assert check_parity(model, tmp_path / "out.onnx", images, 1e-4).passed


def test_graph_without_attention_is_copied_with_a_logged_reason(images, tmp_path, caplog) -> None:
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3)).eval()
    source = export_onnx(mlp, images, tmp_path / "mlp.onnx", METADATA)
    with caplog.at_level(logging.WARNING, logger="tasks.compression.fuse"):
        report = fuse_attention(source, tmp_path / "out.onnx", images)
    assert not report.applied and report.fused == 0 and "no attention block matched" in report.reason
    assert "attention fusion skipped" in caplog.text
    assert (tmp_path / "out.onnx").read_bytes() == source.read_bytes()


@pytest.mark.parametrize("fuse", [True, False])
def test_export_step_fuses_only_when_asked_and_checks_parity_on_the_final_file(fuse, images, tmp_path) -> None:
    from types import SimpleNamespace

    from tasks.compression.export import ExportOnnx
    from tasks.compression.recipe import CompressParams
    from tasks.compression.technique import REFERENCE_ROOT, Variant

    context = SimpleNamespace(out_dir=tmp_path, parity_images=images, metadata=METADATA, parity_tolerance=1e-4,
                              threads=2)
    exported = ExportOnnx(fuse=fuse).apply(Variant(REFERENCE_ROOT, tiny_vit()), context)
    record = exported.records[-1]
    assert record["parity"]["passed"]
    assert ("fusion" in record) is fuse
    assert (op_counts(exported.onnx)["Attention"] == 2) is fuse
    assert read_metadata(exported.onnx) == METADATA
    params = CompressParams(fuse_graph=fuse, pruning={"enabled": True, "ratio": 0.3})
    assert [t.fuse for t in params.recipe_techniques() if t.stage == "export"] == [fuse]
