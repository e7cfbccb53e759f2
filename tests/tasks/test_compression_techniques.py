"""Compression techniques on tiny ViTs: identity cases, exportability with parity, and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_support import new_model

from tasks.compression.export import ExportOnnx, ParityError
from tasks.compression.profiles import PROFILES, ProfileError, budget_violations, get_profile
from tasks.compression.prune import heads_to_remove, prune_vit
from tasks.compression.technique import REFERENCE_ROOT, CompressionContext, Variant, onnx_file_name, run_recipe
from tasks.compression.tokens import (
    TokenReductionParams,
    merge_bipartite,
    plan_token_reduction,
    reduce_tokens,
)


def tiny_vit(seed: int = 0, depth: int = 2) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=depth, embed_dim=32,
                             num_heads=2, num_classes=3).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(6, 3, 16, 16)).astype(np.float32)


def logits(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.from_numpy(images))


def context_for(dataset, out: Path, images: np.ndarray, tolerance: float = 1e-4) -> CompressionContext:
    return CompressionContext(dataset=dataset, metadata={"tile_size": 16}, out_dir=out, parity_images=images,
                              parity_tolerance=tolerance)


# --- token reduction ---------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [TokenReductionParams(method="tome", merge_r=0),
                                    TokenReductionParams(method="evit", keep_ratio=1.0),
                                    TokenReductionParams(method="none")])
def test_token_reduction_without_reduction_is_the_baseline_exactly(params, images) -> None:
    model = tiny_vit()
    reduced, plan = reduce_tokens(model, params)
    assert sum(plan.removed) == 0
    assert torch.equal(logits(reduced, images), logits(model, images))


@pytest.mark.parametrize("params", [TokenReductionParams(method="tome", merge_r=4, min_tokens=2),
                                    TokenReductionParams(method="evit", keep_ratio=0.5)])
def test_token_reduction_removes_tokens_and_changes_the_output_a_little(params, images) -> None:
    model = tiny_vit()
    reduced, plan = reduce_tokens(model, params)
    assert plan.tokens_after[-1] < plan.tokens_in
    out, ref = logits(reduced, images), logits(model, images)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    assert torch.isfinite(out).all()
    assert logits(model, images).equal(ref)  # the original model is untouched


def test_tome_schedule_caps_r_so_min_tokens_remain() -> None:
    # The demo model: 64 patch tokens, 12 blocks; r=16 cannot be merged in every block.
    plan = plan_token_reduction(TokenReductionParams(method="tome", merge_r=16, min_tokens=8), 64, 12)
    assert plan.removed[0] == 16 and plan.removed[-1] == 0
    assert min(plan.tokens_after) == 9 and plan.tokens_after[-1] == 9  # 8 patch tokens + the class token
    assert all(r <= 16 for r in plan.removed)
    assert plan.as_dict()["tokens_in"] == 65


def test_bipartite_merge_keeps_the_class_token_and_the_size_weighted_sum() -> None:
    torch.manual_seed(0)
    x, keys = torch.randn(2, 9, 4), torch.randn(2, 9, 5)
    size = torch.ones(2, 9, 1)
    merged, new_size = merge_bipartite(x, keys, size, r=3)
    assert merged.shape == (2, 6, 4) and new_size.shape == (2, 6, 1)
    assert torch.equal(merged[:, 0], x[:, 0]) and torch.equal(new_size[:, 0], size[:, 0])
    torch.testing.assert_close((merged * new_size).sum(1), x.sum(1))
    assert new_size.sum().item() == pytest.approx(18.0)


def test_token_reduction_needs_a_vision_transformer() -> None:
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        reduce_tokens(torch.nn.Linear(3, 3), TokenReductionParams(method="tome"))


# --- pruning -----------------------------------------------------------------------------------------


def test_zero_pruning_is_an_exact_copy(images) -> None:
    model = tiny_vit()
    pruned = prune_vit(model, 0.0)
    assert pruned is not model
    assert torch.equal(logits(pruned, images), logits(model, images))


def test_pruning_removes_heads_and_channels_consistently(images) -> None:
    model = tiny_vit()
    pruned = prune_vit(model, 0.5)
    for block in pruned.blocks:
        attn = block.attn
        assert attn.num_heads == 1 and attn.head_dim == 16 and attn.attn_dim == 16
        assert attn.qkv.out_features == 3 * attn.attn_dim and attn.proj.in_features == attn.attn_dim
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == 64  # 128 hidden channels halved
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert logits(pruned, images).shape == (6, 3)
    assert model.blocks[0].attn.num_heads == 2  # the original is untouched


@pytest.mark.parametrize(("heads", "ratio", "removed"), [(3, 0.3, 1), (3, 0.5, 1), (2, 0.5, 1), (3, 0.0, 0),
                                                         (2, 0.9, 1), (12, 0.5, 6)])
def test_heads_removed_round_to_nearest_and_keep_one(heads, ratio, removed) -> None:
    assert heads_to_remove(heads, ratio) == removed


def test_pruning_rejects_a_ratio_of_one() -> None:
    with pytest.raises(ValueError, match="ratio"):
        prune_vit(tiny_vit(), 1.0)


# --- export at every hop -----------------------------------------------------------------------------


def test_pruned_and_merged_models_export_with_parity(tmp_path: Path, dataset, images) -> None:
    from tasks.compression.prune import PruneParams, PruneStructured
    from tasks.compression.recipe import ReduceTokens

    context = context_for(dataset, tmp_path, images)
    steps = [ReduceTokens(TokenReductionParams(method="tome", merge_r=4, min_tokens=2)),
             PruneStructured(PruneParams(enabled=True, ratio=0.5, recovery_epochs=0))]
    produced = run_recipe(Variant(REFERENCE_ROOT, tiny_vit()), steps, context)
    # Applied in the fixed order (prune before tokens), each hop exported and parity-checked.
    assert [v.name for v in produced] == ["pruned50", "pruned50-tome-r4"]
    for variant in produced:
        assert variant.onnx.name == onnx_file_name(variant.name) == f"{variant.name}.onnx"
        assert variant.records[-1]["stage"] == "export" and variant.records[-1]["parity"]["passed"]
    assert produced[-1].steps == ("prune", "export", "tokens", "export")


def test_a_token_merged_export_quantizes_dynamically(tmp_path: Path, dataset, images) -> None:
    from tasks.compression.quantize import quantize_int8_dynamic
    from tasks.compression.recipe import ReduceTokens
    from tasks.onnx_runtime import open_session, session_predictor

    context = context_for(dataset, tmp_path, images)
    [merged] = run_recipe(Variant(REFERENCE_ROOT, tiny_vit(depth=4)),
                          [ReduceTokens(TokenReductionParams(method="tome", merge_r=4, min_tokens=2))], context)
    quantized = quantize_int8_dynamic(merged.onnx, tmp_path / "merged-int8-dynamic.onnx")
    outputs = session_predictor(open_session(quantized, 1))(images)
    assert outputs.shape == (len(images), 3) and np.isfinite(outputs).all()


def test_export_step_fails_when_the_onnx_file_disagrees(tmp_path: Path, dataset, onnx_fp32: Path,
                                                        monkeypatch) -> None:
    from tasks.compression import export as exporting

    monkeypatch.setattr(exporting, "export_onnx", lambda model, example, path, metadata:
                        Path(shutil.copyfile(onnx_fp32, path)))
    images = dataset.splits["test"].images
    with pytest.raises(ParityError, match="differs from the torch model"):
        ExportOnnx().apply(Variant(REFERENCE_ROOT, new_model(dataset, seed=7).eval()),
                           context_for(dataset, tmp_path, images))


def test_recipe_rejects_an_unknown_stage(tmp_path: Path, dataset, images) -> None:
    class Sharpen:
        stage = "sharpen"

    with pytest.raises(ValueError, match="unknown compression stage"):
        run_recipe(Variant(REFERENCE_ROOT, tiny_vit()), [Sharpen()], context_for(dataset, tmp_path, images))


# --- distillation ------------------------------------------------------------------------------------


def test_distilling_a_model_into_itself_costs_nothing(tmp_path: Path, dataset, trained_model) -> None:
    import copy

    from tasks.training import TrainParams, cache_teacher_logits, fit

    student = copy.deepcopy(trained_model)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    teacher_logits = cache_teacher_logits(trained_model, dataset.splits["train"].images, flips=True)
    # A vanishing learning rate: Adam rescales even float-noise gradients to full-size steps.
    params = TrainParams(epochs=1, objective="distillation", distill_weight=1.0, weight_decay=0.0,
                         learning_rate=1e-9, resume=False)
    result = fit(student, dataset, params, tmp_path, "self-distill", teacher_logits=teacher_logits)
    assert result.history[0]["train_loss"] == pytest.approx(0.0, abs=1e-6)


def test_student_starts_from_evenly_spaced_teacher_blocks(dataset) -> None:
    from tasks.compression.distill import DistillParams, build_student, teacher_block_choice
    from tasks.models import NormalizedClassifier

    assert teacher_block_choice(12, 6) == [1, 3, 5, 7, 9, 11]
    assert teacher_block_choice(4, 1) == [3]
    torch.manual_seed(0)
    import timm

    net = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=4, in_chans=3,
                            num_classes=dataset.info.num_classes)
    teacher = NormalizedClassifier(net, dataset.info.channel_mean, dataset.info.channel_std)
    student = build_student(teacher, DistillParams(enabled=True, student_depth=2), dataset)
    assert len(student.net.blocks) == 2
    assert torch.equal(student.net.blocks[0].attn.qkv.weight, net.blocks[1].attn.qkv.weight)
    assert torch.equal(student.net.blocks[1].mlp.fc2.weight, net.blocks[3].mlp.fc2.weight)
    assert torch.equal(student.net.head.weight, net.head.weight)
    assert torch.equal(student.mean, teacher.mean)


# --- profiles and selection --------------------------------------------------------------------------


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="unknown target profile 'tpu-pod'.*arm-a76-4core.*cpu-2core"):
        get_profile("tpu-pod")


def test_declared_profiles_are_not_measured_and_say_so() -> None:
    assert PROFILES["cpu-2core"].measured
    declared = [p for p in PROFILES.values() if not p.measured]
    assert declared and all("not measured" in p.as_dict()["note"] for p in declared)
    # A declared profile checks size and precision only: latency measured here says nothing about it.
    jetson = get_profile("jetson-orin-nano")
    assert budget_violations(jetson, "int8", latency_ms=1e6, memory_bytes=None, size_bytes=1000) == []
    assert budget_violations(jetson, "int8-dynamic", 1.0, None, 1000) == [
        "int8-dynamic not supported by TensorrtExecutionProvider"]
    cpu = get_profile("cpu-2core")
    assert budget_violations(cpu, "fp32", latency_ms=1e6, memory_bytes=None, size_bytes=1000) == [
        "p50 1000000.00 ms per tile > 50 ms"]


def test_selection_fails_clearly_when_no_variant_fits_the_budget() -> None:
    from dataclasses import replace

    from tasks.compression.measure import VariantMeasurement
    from tasks.compression.recipe import select_edge_variant

    labels = np.array([0, 1, 0, 1])
    right = np.eye(2, dtype=np.float32)[labels]
    row = VariantMeasurement(name="onnx-fp32", format="onnx", accuracy=1, macro_f1=1, latency_ms_p50=5.0,
                             latency_ms_p95=5.0, throughput=1, size_bytes=int(900e6), runtime="onnxruntime")
    measured = [row, replace(row, name="onnx-int8", precision="int8", size_bytes=int(600e6))]
    predictors = {"onnx-fp32": lambda x: right, "onnx-int8": lambda x: right}
    with pytest.raises(ProfileError, match="no variant meets the budget of profile arm-a76-4core") as caught:
        select_edge_variant(measured, predictors, lambda x: right, np.zeros((4, 1)), labels, ("a", "b"), 0.01,
                            get_profile("arm-a76-4core"))
    assert "onnx-int8: size 600.0 MB > 50 MB" in str(caught.value)
    small = [replace(r, size_bytes=1000) for r in measured]
    assert select_edge_variant(small, predictors, lambda x: right, np.zeros((4, 1)), labels, ("a", "b"), 0.01,
                               get_profile("arm-a76-4core")) == "onnx-fp32"


def test_pareto_front_keeps_only_undominated_points() -> None:
    from tasks.compression.measure import pareto_front

    points = [("fp32", 10.0, 0.90), ("int8", 4.0, 0.90), ("tome", 5.0, 0.85), ("tiny", 1.0, 0.5)]
    assert pareto_front(points) == ["int8", "tiny"]
