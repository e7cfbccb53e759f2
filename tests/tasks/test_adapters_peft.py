"""The peft adapter methods (and the full / linear-probe references) on a tiny ViT: exact parameter counts, what
one optimisation step may touch, merging to a plain ViT with ONNX parity, target checks, and fit_adapter on every
task type."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_support import CHANNELS, FAST_TRAIN, TILE, make_multilabel_samples, make_segmentation_samples, tiny_backbone

from tasks.adapters import METHODS, TARGETED_METHODS, AdapterParams, attach_adapter, check_targets, count_trainable, \
    merge_adapter
from tasks.models import NormalizedClassifier, build_backbone
from tasks.request_errors import RequestError

PEFT_METHODS = ("lora", "dora", "ia3", "loha", "lokr", "oft", "boft", "vera", "fourierft", "layernorm")
OWN_METHODS = PEFT_METHODS + ("full", "linear-probe")
MEAN, STD = (0.3, 0.3, 0.3), (0.2, 0.2, 0.2)
# qkv (192 -> 576) and fc2 (768 -> 192): two shapes, and fc2 is IA3's feed-forward case (input scaled).
PARAMS = dict(targets=["qkv", "fc2"], rank=4, alpha=8.0, frequencies=300)


def _params(method: str) -> AdapterParams:
    """The shared settings; targets only for the methods that take them (the others refuse a list)."""
    return AdapterParams(method=method, **{k: v for k, v in PARAMS.items()
                                           if k != "targets" or method in TARGETED_METHODS})


def test_a_targets_list_is_refused_by_a_method_that_takes_none() -> None:
    with pytest.raises(ValueError, match="does not take targets"):
        AdapterParams(method="bitfit", targets=["qkv", "fc2"])


def tiny_net(task: str = "classification") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(tiny_backbone(), CHANNELS, 3, TILE, task=task)


def test_every_method_of_this_module_is_registered_and_every_registered_name_is_a_choice() -> None:
    assert set(OWN_METHODS) <= set(METHODS)
    choices = set(AdapterParams.model_json_schema()["properties"]["method"]["enum"])
    assert set(METHODS) == choices


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("method", OWN_METHODS)
def test_trainable_count_is_the_formula_and_one_step_changes_only_trainable_tensors(method: str, task: str) -> None:
    params = _params(method)
    net = tiny_net(task)
    expected = METHODS[method].expected_trainable(net, params)
    adapted = attach_adapter(net, params)
    assert count_trainable(adapted) == expected
    if method not in ("full",):
        assert expected < sum(p.numel() for p in adapted.parameters()) / 4

    before = {k: v.detach().clone() for k, v in adapted.state_dict().items()}
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    optimiser = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    out = adapted(x)
    target = torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.long)
    torch.nn.functional.cross_entropy(out, target).backward()
    optimiser.step()
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= trainable, sorted(changed - trainable)
    assert any(".head." not in f".{k}" for k in changed) or method == "linear-probe"  # more than the head moved


def _perturb(model: torch.nn.Module) -> None:
    """Move every trained tensor off its initial value (LoRA B starts at zero: merging must matter)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def _op_types(path: Path) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def plain_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.compression.export import export_onnx

    example = np.zeros((2, 3, TILE, TILE), np.float32)
    return export_onnx(NormalizedClassifier(tiny_net(), MEAN, STD), example,
                       tmp_path_factory.mktemp("plain") / "plain.onnx", {})


@pytest.mark.parametrize("method", OWN_METHODS)  # full and linear-probe too: their merge is the identity
def test_merged_model_is_a_plain_vit_with_onnx_parity_to_the_unmerged_one(method: str, tmp_path: Path,
                                                                           plain_onnx: Path) -> None:
    from tasks.compression.export import check_parity, export_onnx

    plain_keys = set(tiny_net().state_dict())
    adapted = attach_adapter(tiny_net(), _params(method))
    _perturb(adapted)
    unmerged = NormalizedClassifier(copy.deepcopy(adapted), MEAN, STD).eval()
    assert METHODS[method].mergeable
    merged = NormalizedClassifier(merge_adapter(adapted), MEAN, STD).eval()
    assert set(merged.net.state_dict()) == plain_keys
    images = np.random.default_rng(3).normal(0.3, 0.2, (6, 3, TILE, TILE)).astype(np.float32)
    path = export_onnx(merged, images, tmp_path / f"{method}.onnx", {})
    report = check_parity(unmerged, path, images, tolerance=1e-4)
    assert report.max_abs_diff <= 1e-4, report
    assert _op_types(path) == _op_types(plain_onnx)  # no adapter operation left in the graph


@pytest.mark.parametrize("method", PEFT_METHODS[:-1])
def test_a_misspelt_target_is_refused_by_name_before_peft_sees_it(method: str) -> None:
    with pytest.raises(RequestError, match="'qvk' matches no linear layer"):
        attach_adapter(tiny_net(), AdapterParams(method=method, targets=["qvk", "fc2"], frequencies=300))


def test_a_target_that_also_names_the_patch_embedding_is_refused() -> None:
    with pytest.raises(RequestError, match="'proj' also matches patch_embed.proj"):
        check_targets(tiny_net(), ["proj"])
    assert set(check_targets(tiny_net(), ["attn.proj", "mlp.fc1"])) == {"blocks.0.attn.proj", "blocks.0.mlp.fc1"}


def test_block_sizes_that_do_not_tile_the_layer_are_refused_not_adjusted() -> None:
    with pytest.raises(RequestError, match="block_size 5 does not divide the input width 192"):
        attach_adapter(tiny_net(), AdapterParams(method="oft", block_size=5))


def test_legacy_lora_settings_map_to_the_adapter_block() -> None:
    from flows.cli import build_parser, pipeline_payload
    from flows.finetune import FinetuneParams
    from flows.pipeline import PipelineParams
    from tasks.models import LoraParams

    old = FinetuneParams(dataset="d", lora={"rank": 4, "target_modules": ["qkv", "fc1"]})
    assert old.adapter == AdapterParams(method="lora", rank=4, targets=["qkv", "fc1"])
    assert FinetuneParams(dataset="d", lora=LoraParams(rank=2)).adapter.rank == 2
    args = build_parser().parse_args(["pipeline", "--source", "s", "--labels", "l", "--preset", "vit-s16-224",
                                      "--set", "adapter.method=dora", "--set", "adapter.targets=[\"qkv\",\"fc2\"]"])
    params = PipelineParams(**pipeline_payload(args))
    assert params.adapter.method == "dora" and params.adapter.targets == ["qkv", "fc2"]
    args = build_parser().parse_args(["pipeline", "--source", "s", "--labels", "l", "--preset", "vit-s16-224",
                                      "--set", "lora.rank=4"])  # an old override over a preset's adapter block
    assert PipelineParams(**pipeline_payload(args)).adapter.rank == 4
    with pytest.raises(ValueError, match="adapter.method is 'dora'"):
        FinetuneParams(dataset="d", lora={"rank": 4}, adapter={"method": "dora"})


# --- through fit_adapter, the one training loop, on every task type ------------------------------------

@pytest.fixture(scope="module")
def task_datasets(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> dict[str, Path]:
    from tasks.dataset import SplitParams, write_dataset

    multilabel, segmentation = tmp_path_factory.mktemp("multilabel"), tmp_path_factory.mktemp("segmentation")
    write_dataset(make_multilabel_samples(), "radiology", "multilabel", multilabel, SplitParams())
    write_dataset(make_segmentation_samples(), "hyperspectral", "segmentation", segmentation, SplitParams())
    return {"classification": dataset_dir, "multilabel": multilabel, "segmentation": segmentation}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("task", ["classification", "multilabel", "segmentation"])
def test_fit_adapter_trains_and_merges_on_every_task_type(method: str, task: str, task_datasets, tmp_path: Path) -> None:
    """Every registered method (the peft families and Vitrail's own) through the one loop, on every task type."""
    from tasks.finetune import fit_adapter
    from tasks.models import load_reference_files, reference_architecture, save_reference_model
    from tasks.training import TrainParams

    targets = {"targets": ["qkv", "attn.proj"]} if method in TARGETED_METHODS else {}
    params = AdapterParams(method=method, rank=4, frequencies=300, **targets)
    train = TrainParams(**{**FAST_TRAIN, "epochs": 1})
    outcome = fit_adapter(task_datasets[task], tiny_backbone(), params, train, tmp_path / "ckpt")
    info = outcome.metadata
    assert info["task"] == task
    net = build_backbone(tiny_backbone(), CHANNELS, len(info["class_names"]), TILE, task=task)
    assert outcome.trainable_parameters == METHODS[method].expected_trainable(net, params)
    assert outcome.metadata["adapter"] == method
    architecture = reference_architecture(outcome.model, CHANNELS, task)
    if METHODS[method].mergeable:
        assert set(outcome.model.net.state_dict()) == set(net.state_dict())  # merged: plain weights
        assert architecture.adapter is None
    else:
        assert architecture.adapter.method == method  # rebuilt with its operations when loaded
    loaded = load_reference_files(*save_reference_model(outcome.model, architecture, tmp_path / "ref"))
    x = torch.rand(2, 3, TILE, TILE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), outcome.model(x))


def test_fit_adapter_refuses_a_misspelt_target_before_training(dataset_dir: Path, tmp_path: Path) -> None:
    from tasks.finetune import fit_adapter
    from tasks.training import TrainParams

    with pytest.raises(RequestError, match="'qvk'"):
        fit_adapter(dataset_dir, tiny_backbone(), AdapterParams(targets=["qkv", "qvk"]), TrainParams(**FAST_TRAIN),
                    tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


@pytest.mark.parametrize("method", sorted(name for name, m in METHODS.items() if not m.mergeable))
def test_a_non_mergeable_model_saves_its_adapter_settings_and_loads_back(method: str, tmp_path: Path) -> None:
    from tasks.models import load_reference_files, reference_architecture, save_reference_model

    adapted = attach_adapter(tiny_net(), AdapterParams(method=method, prompt_tokens=3, bottleneck=8))
    _perturb(adapted)
    model = NormalizedClassifier(merge_adapter(adapted), MEAN, STD).eval()
    architecture = reference_architecture(model, CHANNELS, "classification")
    assert architecture.adapter is not None and architecture.adapter.method == method
    loaded = load_reference_files(*save_reference_model(model, architecture, tmp_path))
    x = torch.rand(2, 3, TILE, TILE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
