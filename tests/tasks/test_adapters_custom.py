"""The project's own adapter methods (tasks/adapters/custom.py) on the three nets Vitrail trains.

Every method: its trainable count equals its formula (and a closed form written out here for the tile
classifier), one optimisation step moves only trainable tensors, and it runs on a tile classifier, a
segmentation ViT and a slide model. Mergeable methods fold into a plain ViT with the same logits and an
ONNX graph without adapter operations; the others export with their extra operations, and a saved model's
weights load into the structure ``rebuild`` makes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tasks_support import CHANNELS, TILE, tiny_backbone

from tasks.adapters import custom  # noqa: F401  (registers the methods)
from tasks.adapters.registry import METHODS

NAMES = ("bitfit", "ssf", "vpt-shallow", "vpt-deep", "adaptformer", "dvpt")
MERGEABLE = ("bitfit", "ssf")
NETS = ("classification", "segmentation", "slide")
# Small knobs, so every formula term is non-trivial and distinct (m != b != D).
PARAMS = SimpleNamespace(prompt_tokens=3, bottleneck=5, adapter_scale=0.1, train_patch_embed=False)


def _net(kind: str, depth: int = 1) -> torch.nn.Module:
    from tasks.bags import BagParams
    from tasks.models import build_backbone

    torch.manual_seed(0)
    backbone = tiny_backbone(depth=depth)
    if kind == "slide":
        return build_backbone(backbone, CHANNELS, 2, TILE, bags=BagParams(enabled=True, attention_dim=16))
    return build_backbone(backbone, CHANNELS, 3 if kind == "classification" else 2, TILE,
                          task="segmentation" if kind == "segmentation" else "classification")


def _inputs(kind: str, n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(1)
    shape = (n, 4, 3, TILE, TILE) if kind == "slide" else (n, 3, TILE, TILE)
    return rng.random(shape, dtype=np.float32)


def _adapted(name: str, kind: str, depth: int = 1) -> torch.nn.Module:
    """The net with the method attached and every trainable tensor moved off its initial value (AdaptFormer's
    up-projection starts at zero, which would make any comparison trivially pass)."""
    net = METHODS[name].attach(_net(kind, depth), PARAMS)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return net.eval()


def _trainable(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def _closed_form(name: str, depth: int) -> int:
    """The methods' counts for a plain vit_tiny (D=192, MLP 768, 3 bands, 4 px patches) with a 3-class head,
    written out by hand from the papers, independently of the code's module walk."""
    d, h, m, b, classes = 192, 768, PARAMS.prompt_tokens, PARAMS.bottleneck, 3
    head = d * classes + classes
    per_block = {
        # biases: qkv 3D, proj D, fc1 H, fc2 D, norm1 D, norm2 D
        "bitfit": 3 * d + d + h + d + d + d,
        # scale + shift after qkv, proj, fc1, fc2, norm1, norm2
        "ssf": 2 * (3 * d + d + h + d + d + d),
        "vpt-deep": m * d,
        "adaptformer": 2 * d * b + b + d,
        "dvpt": 2 * d * b + b + m * b + d,
    }
    once = {"bitfit": d + d,  # patch-embedding bias, final norm bias
            "ssf": 2 * d + 2 * d,  # after the patch embedding and the final norm
            "vpt-shallow": m * d}
    return depth * per_block.get(name, 0) + once.get(name, 0) + head


@pytest.mark.parametrize("name", NAMES)
def test_trainable_count_matches_the_formula_and_the_closed_form(name: str) -> None:
    method = METHODS[name]
    assert method.family == "project" and method.mergeable == (name in MERGEABLE)
    assert (method.rebuild is None) == method.mergeable
    net = _net("classification", depth=2)
    expected = method.expected_trainable(net, PARAMS)  # from the frozen net's shapes, before attaching
    adapted = method.attach(net, PARAMS)
    assert _trainable(adapted) == expected == _closed_form(name, depth=2)


@pytest.mark.parametrize("kind", ("segmentation", "slide"))
@pytest.mark.parametrize("name", NAMES)
def test_trainable_count_matches_the_formula_on_segmentation_and_slide_models(name: str, kind: str) -> None:
    method = METHODS[name]
    net = _net(kind)
    expected = method.expected_trainable(net, PARAMS)
    adapted = method.attach(net, PARAMS)
    assert _trainable(adapted) == expected
    always = sum(p.numel() for p in adapted.head.parameters())
    if kind == "slide":
        always += sum(p.numel() for p in adapted.pool.parameters())
    assert all(p.requires_grad for p in adapted.head.parameters())
    assert expected > always  # the method adds trainable tensors beyond the head


def test_training_the_patch_embedding_is_counted_once() -> None:
    params = SimpleNamespace(**{**vars(PARAMS), "train_patch_embed": True})
    for name in ("bitfit", "ssf", "dvpt"):
        net = _net("classification")
        expected = METHODS[name].expected_trainable(net, params)
        adapted = METHODS[name].attach(net, params)
        assert adapted.patch_embed.proj.weight.requires_grad
        assert _trainable(adapted) == expected


@pytest.mark.parametrize("kind", NETS)
@pytest.mark.parametrize("name", NAMES)
def test_one_step_moves_only_trainable_tensors(name: str, kind: str) -> None:
    net = METHODS[name].attach(_net(kind), PARAMS).train()
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    trainable = {k for k, v in net.named_parameters() if v.requires_grad}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    logits = net(torch.from_numpy(_inputs(kind)))
    expected_shape = {"classification": (3, 3), "segmentation": (3, 2, TILE, TILE), "slide": (3, 2)}[kind]
    assert logits.shape == expected_shape  # prompts never reach the head or the per-pixel decoder
    logits.square().mean().backward()
    optimizer.step()
    changed = {k for k, v in net.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert changed <= trainable
    added = {k for k in trainable if not k.startswith(("head.", "pool."))}
    assert changed & added, f"{name}: no adapter tensor moved"


@pytest.mark.parametrize("name", MERGEABLE)
def test_mergeable_methods_fold_into_a_plain_vit_with_onnx_parity(name: str, tmp_path: Path) -> None:
    from tasks.compression.export import check_parity, export_onnx
    from tasks.models import NormalizedClassifier

    adapted = _adapted(name, "classification")
    images = _inputs("classification")
    unmerged = NormalizedClassifier(copy.deepcopy(adapted), (0.5,) * 3, (0.2,) * 3).eval()
    merged_net = METHODS[name].merge(adapted)
    plain = _net("classification")  # the plain structure: same tensor names and shapes, no hooks
    assert {k: v.shape for k, v in merged_net.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert not any(m._forward_hooks for m in merged_net.modules())
    plain.load_state_dict(merged_net.state_dict())
    merged = NormalizedClassifier(plain, (0.5,) * 3, (0.2,) * 3).eval()
    with torch.inference_mode():
        x = torch.from_numpy(images)
        assert torch.allclose(merged(x), unmerged(x), atol=1e-5)
    path = export_onnx(merged, images, tmp_path / f"{name}.onnx", {"adapter": name})
    report = check_parity(unmerged, path, images, tolerance=1e-4)
    assert report.passed, report


# Every method on tile classifiers; prompts on segmentation (dropped before the decoder) and on slide models.
@pytest.mark.parametrize(("name", "kind"), [(n, "classification") for n in NAMES if n not in MERGEABLE]
                         + [("vpt-deep", "segmentation"), ("dvpt", "slide")])
def test_non_mergeable_methods_export_with_their_operations(name: str, kind: str, tmp_path: Path) -> None:
    from tasks.compression.export import check_parity, export_onnx
    from tasks.models import NormalizedClassifier

    net = METHODS[name].merge(_adapted(name, kind))
    model = NormalizedClassifier(net, (0.5,) * 3, (0.2,) * 3).eval()
    images = _inputs(kind)
    metadata = {"adapter": name, **({"bags": {"enabled": True}} if kind == "slide" else {})}
    path = export_onnx(model, images, tmp_path / f"{name}-{kind}.onnx", metadata)
    report = check_parity(model, path, images, tolerance=1e-4)
    assert report.passed, report
    # The adapter changes the function: the frozen net alone predicts something else.
    with torch.inference_mode():
        frozen = NormalizedClassifier(_net(kind), (0.5,) * 3, (0.2,) * 3).eval()
        x = torch.from_numpy(images)
        assert not torch.allclose(frozen(x), model(x), atol=1e-4)


@pytest.mark.parametrize("kind", NETS)
@pytest.mark.parametrize("name", [n for n in NAMES if n not in MERGEABLE])
def test_rebuild_loads_a_saved_adapted_model(name: str, kind: str) -> None:
    trained = _adapted(name, kind)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    rebuilt = METHODS[name].rebuild(_net(kind), PARAMS)
    rebuilt.load_state_dict(state, strict=True)
    x = torch.from_numpy(_inputs(kind))
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), trained(x))
    # The frozen tensors keep their timm names: a plain net's state dict is a subset of the adapted one.
    assert set(_net(kind).state_dict()) <= set(state)


def test_adaptformer_starts_as_the_frozen_net() -> None:
    x = torch.from_numpy(_inputs("classification"))
    net = METHODS["adaptformer"].attach(_net("classification"), PARAMS).eval()
    with torch.inference_mode():
        assert torch.equal(net(x), _net("classification").eval()(x))


def test_prompt_tokens_are_dropped_before_pooling_and_decoding() -> None:
    net = METHODS["vpt-deep"].attach(_net("classification", depth=2), PARAMS).eval()
    x = torch.from_numpy(_inputs("classification"))
    with torch.inference_mode():
        tokens = net.forward_features(x)
    assert tokens.shape == (3, 1 + (TILE // 4) ** 2, 192)  # class token and patches only
    assert len(net.blocks) == 2 and net.blocks.prompts.shape == (2, PARAMS.prompt_tokens, 192)


@pytest.mark.parametrize("name", ["vpt-shallow", "dvpt"])
def test_token_reduction_refuses_prompted_models(name: str) -> None:
    from tasks.compression.tokens import TokenReductionParams, reduce_tokens

    net = METHODS[name].attach(_net("classification"), PARAMS)
    with pytest.raises(ValueError, match="visual prompts"):
        reduce_tokens(net, TokenReductionParams(method="tome", merge_r=2, min_tokens=4))


@pytest.mark.parametrize("name", ["vpt-deep", "adaptformer", "dvpt"])
def test_pruning_keeps_the_adapter_working(name: str) -> None:
    from tasks.compression.prune import prune_vit

    net = _adapted(name, "classification", depth=2)
    pruned = prune_vit(net, 0.5)
    assert pruned.blocks[0].mlp.fc1.out_features == 384
    with torch.inference_mode():
        assert pruned(torch.from_numpy(_inputs("classification"))).shape == (3, 3)


def test_settings_out_of_range_and_a_second_prompt_method_are_refused() -> None:
    from tasks.request_errors import RequestError

    with pytest.raises(RequestError, match="prompt_tokens"):
        METHODS["vpt-deep"].attach(_net("classification"), SimpleNamespace(prompt_tokens=0))
    net = METHODS["vpt-shallow"].attach(_net("classification"), PARAMS)
    with pytest.raises(RequestError, match="already has visual prompts"):
        METHODS["dvpt"].attach(net, PARAMS)
    with pytest.raises(RequestError, match="VisionTransformer"):
        METHODS["bitfit"].attach(torch.nn.Linear(3, 3), PARAMS)


def test_the_compress_report_says_how_the_adapter_was_exported() -> None:
    from tasks.compression.recipe import CompressParams, _adapter_export

    merged = _adapter_export({"adapter": "ssf", "adapter_mergeable": True}, CompressParams())
    assert merged["mergeable"] and "no adapter operation" in merged["export"]
    kept = _adapter_export({"adapter": "vpt-deep", "adapter_mergeable": False}, CompressParams())
    assert not kept["mergeable"] and "enable compression.distillation" in kept["export"]
    distilled = _adapter_export({"adapter": "vpt-deep", "adapter_mergeable": False},
                                CompressParams.model_validate({"distillation": {"enabled": True}}))
    assert "distilled student is a plain ViT" in distilled["export"]
