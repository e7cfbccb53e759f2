"""Backbones: band adaptation of RGB patch kernels, loading checkpoints, LoRA, merging, normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from tasks_support import tiny_backbone

from domains import Channel
from domains.satellite.sensors import SENTINEL2
from tasks.models import (
    LoraParams,
    NormalizedClassifier,
    ReferenceArchitecture,
    ReferenceModelError,
    adapt_patch_embedding,
    attach_lora,
    build_backbone,
    build_reference_model,
    count_parameters,
    load_reference_files,
    merge_adapter,
    reference_architecture,
    save_reference_model,
)

S2 = SENTINEL2.channels
S2_INDEX = {c.name: i for i, c in enumerate(S2)}


def rgb_kernels(seed: int = 0) -> torch.Tensor:
    return torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


# --- adapt_patch_embedding ---------------------------------------------------------------------------


def test_visible_bands_inherit_the_matching_rgb_kernel_scaled_by_3_over_c() -> None:
    rgb = rgb_kernels()
    adapted = adapt_patch_embedding(rgb, S2)
    scale = 3.0 / 13
    assert adapted.shape == (8, 13, 4, 4)
    for band, rgb_index in (("B04", 0), ("B03", 1), ("B02", 2)):  # 665, 560, 490 nm -> R, G, B
        torch.testing.assert_close(adapted[:, S2_INDEX[band]], rgb[:, rgb_index] * scale)


def test_bands_far_from_red_green_blue_get_the_mean_kernel() -> None:
    rgb = rgb_kernels()
    adapted = adapt_patch_embedding(rgb, S2)
    mean = rgb.mean(dim=1) * (3.0 / 13)
    for band in ("B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"):
        torch.testing.assert_close(adapted[:, S2_INDEX[band]], mean)


def test_the_40_nm_tolerance_and_channels_without_wavelength() -> None:
    rgb = rgb_kernels()
    channels = (Channel("near-red", 640.0 + 39.0), Channel("past-red", 640.0 + 41.0), Channel("no-wavelength"))
    adapted = adapt_patch_embedding(rgb, channels)  # C = 3, so no rescaling
    torch.testing.assert_close(adapted[:, 0], rgb[:, 0])
    torch.testing.assert_close(adapted[:, 1], rgb.mean(dim=1))
    torch.testing.assert_close(adapted[:, 2], rgb.mean(dim=1))


def test_adapt_patch_embedding_refuses_non_rgb_weights() -> None:
    with pytest.raises(ValueError, match="expected RGB"):
        adapt_patch_embedding(torch.zeros(8, 4, 4, 4), S2)


# --- build_backbone ----------------------------------------------------------------------------------


def rgb_vit(img_size: int = 16, patch_size: int = 4, num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(42)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=patch_size,
                             in_chans=3, depth=1, num_classes=num_classes)


def save_checkpoint(state: dict, path: Path, wrap: str | None = None) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({wrap: state} if wrap else state, path)
    return path


def test_random_backbone_has_the_requested_shape() -> None:
    model = build_backbone(tiny_backbone(), S2, num_classes=5, img_size=16)
    assert model.patch_embed.proj.weight.shape == (192, 13, 4, 4)
    assert len(model.blocks) == 1
    assert model(torch.zeros(2, 13, 16, 16)).shape == (2, 5)


@pytest.mark.parametrize("filename,wrap", [("rgb.pth", None), ("rgb-wrapped.pth", "state_dict"),
                                           ("rgb-model.pth", "model"), ("rgb.safetensors", None)])
def test_rgb_checkpoint_file_loads_into_a_13_band_model(tmp_path: Path, filename: str, wrap: str | None) -> None:
    source = rgb_vit().state_dict()
    path = save_checkpoint(source, tmp_path / filename, wrap)
    model = build_backbone(tiny_backbone(weights="file", weights_file=str(path)), S2, num_classes=3, img_size=16)
    state = model.state_dict()
    torch.testing.assert_close(state["patch_embed.proj.weight"],
                               adapt_patch_embedding(source["patch_embed.proj.weight"], S2))
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "pos_embed", "cls_token", "norm.weight"):
        torch.testing.assert_close(state[key], source[key])
    # The classification head is always new, even when its shape would fit.
    assert not torch.equal(state["head.weight"], source["head.weight"])


def test_checkpoint_with_the_right_band_count_loads_as_is(tmp_path: Path) -> None:
    source = build_backbone(tiny_backbone(), S2, num_classes=3, img_size=16).state_dict()
    path = save_checkpoint(source, tmp_path / "s2.pth")
    model = build_backbone(tiny_backbone(weights="file", weights_file=str(path)), S2, num_classes=3, img_size=16)
    torch.testing.assert_close(model.state_dict()["patch_embed.proj.weight"], source["patch_embed.proj.weight"])


def test_checkpoint_of_another_patch_and_image_size_is_resampled(tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    source = rgb_vit(img_size=32, patch_size=8).state_dict()  # 4 x 4 grid of 8 px patches
    path = save_checkpoint(source, tmp_path / "rgb-p8.pth")
    model = build_backbone(tiny_backbone(weights="file", weights_file=str(path)), S2, num_classes=3, img_size=24)
    state = model.state_dict()  # 6 x 6 grid of 4 px patches
    expected_kernel = adapt_patch_embedding(resample_patch_embed(source["patch_embed.proj.weight"], [4, 4]), S2)
    torch.testing.assert_close(state["patch_embed.proj.weight"], expected_kernel)
    torch.testing.assert_close(state["pos_embed"], resample_abs_pos_embed(source["pos_embed"], [6, 6],
                                                                          num_prefix_tokens=1))
    torch.testing.assert_close(state["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])


def test_file_weights_without_a_file_is_an_error() -> None:
    with pytest.raises(ValueError, match="weights_file"):
        build_backbone(tiny_backbone(weights="file"), S2, num_classes=3, img_size=16)


def test_missing_checkpoint_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone(tiny_backbone(weights="file", weights_file=str(missing)), S2, num_classes=3, img_size=16)


# --- LoRA --------------------------------------------------------------------------------------------


def tiny_net(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(tiny_backbone(), S2[:3], num_classes=num_classes, img_size=16)


def test_attach_lora_trains_only_adapters_head_and_patch_embedding() -> None:
    model = attach_lora(tiny_net(), LoraParams(rank=4))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("qkv.lora_A" in n for n in trainable) and any("qkv.lora_B" in n for n in trainable)
    assert any(n.endswith("model.head.weight") for n in trainable)  # head and patch embedding train in place
    assert any(n.endswith("patch_embed.proj.weight") for n in trainable)
    for name in trainable:
        assert "lora_" in name or ".head." in name or ".patch_embed.proj." in name, name
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert any(n.endswith("blocks.0.norm1.weight") for n in frozen)
    assert any(n.endswith("blocks.0.mlp.fc1.weight") for n in frozen)
    trainable_count, total = count_parameters(model)
    assert 0 < trainable_count < total / 4


def test_attach_lora_can_leave_the_patch_embedding_frozen() -> None:
    model = attach_lora(tiny_net(), LoraParams(train_patch_embed=False))
    assert not any("patch_embed" in n for n, p in model.named_parameters() if p.requires_grad)


def test_attach_lora_targets_several_module_names() -> None:
    model = attach_lora(tiny_net(), LoraParams(target_modules=["qkv", "fc1"]))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"qkv", "fc1"}


def test_attach_lora_accepts_dotted_module_names_from_its_documentation() -> None:
    model = attach_lora(tiny_net(), LoraParams(target_modules=["qkv", "attn.proj"]))
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert any(".attn.proj.lora_A" in n for n in names) and any(".attn.qkv.lora_A" in n for n in names)


def test_merge_adapter_gives_the_outputs_of_the_peft_model() -> None:
    peft_model = attach_lora(tiny_net(), LoraParams(rank=4, alpha=8.0, target_modules=["qkv", "fc2"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:  # LoRA B starts at zero: perturb every trained tensor so merging matters
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    x = torch.randn(4, 3, 16, 16, generator=generator)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(x)
        merged = merge_adapter(peft_model).eval()
        actual = merged(x)
    assert isinstance(merged, timm.models.vision_transformer.VisionTransformer)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(tiny_net()(x), actual, atol=1e-3)  # the adapters did change the model


def test_merge_adapter_returns_a_plain_model_unchanged() -> None:
    net = tiny_net()
    assert merge_adapter(net) is net


# --- NormalizedClassifier ----------------------------------------------------------------------------


def test_normalized_classifier_normalises_per_channel_before_the_network() -> None:
    model = NormalizedClassifier(torch.nn.Identity(), mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 0.5))
    x = torch.randn(2, 3, 5, 5)
    expected = torch.stack([(x[:, 0] - 1) / 2, (x[:, 1] - 2) / 4, (x[:, 2] - 3) / 0.5], dim=1)
    torch.testing.assert_close(model(x), expected)
    state = model.state_dict()  # statistics ship with the model (and with its ONNX export)
    assert state["mean"].flatten().tolist() == [1.0, 2.0, 3.0] and state["std"].shape == (1, 3, 1, 1)


# --- reference model files: safetensors weights plus architecture.json --------------------------------

MEAN, STD = (0.1, 0.2, 0.3), (0.05, 0.06, 0.07)


def reference_net(task: str = "classification", num_classes: int = 3, seed: int = 0) -> NormalizedClassifier:
    torch.manual_seed(seed)
    net = build_backbone(tiny_backbone(), S2[:3], num_classes=num_classes, img_size=16, task=task)
    return NormalizedClassifier(net, MEAN, STD).eval()


@pytest.mark.parametrize("task,num_classes", [("classification", 3), ("multilabel", 2), ("segmentation", 2)])
def test_reference_model_files_rebuild_the_same_model(tmp_path: Path, task: str, num_classes: int) -> None:
    model = reference_net(task, num_classes)
    architecture = reference_architecture(model, S2[:3], task)
    assert (architecture.backbone, architecture.task, architecture.img_size, architecture.patch_size,
            architecture.depth, architecture.num_classes) == ("vit_tiny_patch16_224", task, 16, 4, 1, num_classes)
    assert architecture.channels == S2[:3]
    assert architecture.mean == pytest.approx(MEAN) and architecture.std == pytest.approx(STD)
    weights, description = save_reference_model(model, architecture, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["architecture.json", "model.safetensors"]
    loaded = load_reference_files(weights, description)
    assert not loaded.training
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))  # the same tensors in the same modules: bitwise equal
    assert ReferenceArchitecture.model_validate_json(description.read_text()) == architecture


def test_build_reference_model_gives_fresh_weights_of_the_described_shape() -> None:
    architecture = reference_architecture(reference_net(), S2[:3], "classification")
    rebuilt = build_reference_model(architecture)
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference_net().state_dict().items()}
    assert not torch.equal(rebuilt.state_dict()["net.head.weight"], reference_net().state_dict()["net.head.weight"])


def test_a_model_with_unmerged_adapters_cannot_be_described() -> None:
    model = NormalizedClassifier(attach_lora(tiny_net(), LoraParams(rank=2)), MEAN, STD)
    with pytest.raises(ValueError, match="merge adapters first"):
        reference_architecture(model, S2[:3], "classification")


def test_a_description_that_does_not_rebuild_the_model_is_refused_when_logging() -> None:
    with pytest.raises(ValueError, match="does not rebuild this model"):
        reference_architecture(reference_net("segmentation", 2), S2[:3], "classification")


def written_reference(tmp_path: Path) -> tuple[Path, Path]:
    model = reference_net()
    return save_reference_model(model, reference_architecture(model, S2[:3], "classification"), tmp_path)


@pytest.mark.parametrize("change,problem", [
    ({"backbone": "../../etc/passwd"}, "backbone: String should match pattern"),
    ({"depth": 0}, "depth: Input should be greater than or equal to 1"),
    ({"std": [0.1, 0.0, 0.1]}, "std finite and positive"),
    ({"mean": [0.1]}, "one value per channel"),
    ({"code": "import os"}, "code: Extra inputs are not permitted"),
    ({"format_version": 2}, "format_version: Input should be 1"),
])
def test_a_bad_architecture_description_is_refused_naming_the_file(tmp_path: Path, change: dict, problem: str) -> None:
    import json

    weights, description = written_reference(tmp_path)
    description.write_text(json.dumps({**json.loads(description.read_text()), **change}))
    with pytest.raises(ReferenceModelError, match="architecture.json: not a valid architecture description") as error:
        load_reference_files(weights, description)
    assert problem in str(error.value)


def test_an_unknown_timm_name_is_refused(tmp_path: Path) -> None:
    import json

    weights, description = written_reference(tmp_path)
    description.write_text(json.dumps({**json.loads(description.read_text()), "backbone": "no_such_vit"}))
    with pytest.raises(ReferenceModelError, match="architecture.json: 'no_such_vit' is not a timm model name"):
        load_reference_files(weights, description)


def test_weights_with_a_missing_or_extra_tensor_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights, description = written_reference(tmp_path)
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if k != "net.norm.weight"}, str(weights))
    with pytest.raises(ReferenceModelError, match=r"model.safetensors: weights do not match architecture.json "
                                                  r"\(missing 1 tensors, e.g. net.norm.weight\)"):
        load_reference_files(weights, description)
    save_file({**state, "net.extra": torch.zeros(1)}, str(weights))
    with pytest.raises(ReferenceModelError, match=r"\(unexpected 1 tensors, e.g. net.extra\)"):
        load_reference_files(weights, description)


def test_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights, description = written_reference(tmp_path)
    state = load_file(str(weights))
    save_file({**state, "net.head.weight": torch.zeros(5, 192)}, str(weights))
    with pytest.raises(ReferenceModelError, match=r"weights do not match architecture.json \(another shape for 1 "
                                                  r"tensors, e.g. net.head.weight \(5, 192\) instead of \(3, 192\)\)"):
        load_reference_files(weights, description)


def test_a_description_larger_than_its_weights_is_refused_before_building(tmp_path: Path) -> None:
    import json

    weights, description = written_reference(tmp_path)
    # 8192 px tiles: a position embedding of 4.2M tokens (3.2 GB) if it were built
    description.write_text(json.dumps({**json.loads(description.read_text()), "img_size": 8192}))
    with pytest.raises(ReferenceModelError, match=r"\(another shape for 1 tensors, e.g. net.pos_embed \(1, 17, 192\) "
                                                  r"instead of \(1, 4194305, 192\)\)"):
        load_reference_files(weights, description)
