"""The pathology backbone catalog: every entry builds with its published size, and weights load offline
from synthetic checkpoints written in each format's real key layout, every tensor accounted for."""

from __future__ import annotations

import pytest
import torch

from domains import Channel
from tasks.backbone_catalog import (CATALOG, WEIGHTS_DIR_ENV, BandMismatchError, CatalogError, CheckpointMismatchError,
                                    WeightsNotFoundError, create_catalog_model, from_timm_layout, get_entry,
                                    pool_tokens, to_timm_layout)
from tasks.models import BackboneParams, build_backbone

RGB = (Channel("red", 640.0), Channel("green", 550.0), Channel("blue", 465.0))


def _meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return create_catalog_model(get_entry(name), **kwargs)


@pytest.mark.parametrize("name", [name for name, entry in CATALOG.items() if entry.builder == "timm"])
def test_every_entry_builds_with_its_published_size(name):
    entry = CATALOG[name]
    model = _meta_model(name)
    params = sum(p.numel() for p in model.parameters())
    # Within 3% of the authors' count: a missed kwarg (SwiGLU, registers, mlp ratio) is off by far more.
    assert abs(params / 1e6 - entry.published_params_m) / entry.published_params_m < 0.03, params
    assert model.num_features == entry.embed_dim
    assert model.patch_embed.patch_size == (entry.patch_size, entry.patch_size)
    assert model.pretrained_cfg["architecture"] == name and model.pretrained_cfg["mean"] == entry.mean
    tokens = torch.empty(2, model.pos_embed.shape[1] + (model.num_prefix_tokens if model.no_embed_class else 0),
                         entry.embed_dim, device="meta")
    assert pool_tokens(entry, tokens, model.num_prefix_tokens).shape == (2, entry.embedding_dim)
    # The file's layout maps onto exactly the model's tensors and back.
    state = model.state_dict()
    mapped = to_timm_layout(from_timm_layout(state, entry.layout), entry.layout)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in state.items()}


def test_virchow2_embedding_is_class_token_and_mean_of_patch_tokens_only():
    entry = get_entry("virchow2")
    tokens = torch.zeros(1, 5 + 4, 3)
    tokens[0, 0] = 1.0  # class token
    tokens[0, 1:5] = 100.0  # register tokens: not patches
    tokens[0, 5:] = torch.arange(4.0).unsqueeze(1)  # patch tokens 0, 1, 2, 3
    assert pool_tokens(entry, tokens, num_prefix_tokens=5).tolist() == [[1.0, 1.0, 1.0, 1.5, 1.5, 1.5]]


def _phikon_checkpoint(weights_dir, depth: int | None = None):
    """A Phikon checkpoint as transformers writes it (ViTModel names, separate q/k/v, a pooler)."""
    torch.manual_seed(0)
    source = create_catalog_model(get_entry("phikon"), depth=depth)
    state = from_timm_layout(source.state_dict(), "hf-vit")
    state["pooler.dense.weight"] = torch.randn(768, 768)
    state["pooler.dense.bias"] = torch.randn(768)
    path = weights_dir / "phikon" / "pytorch_model.bin"
    path.parent.mkdir()
    torch.save(state, path)
    return state, path


def test_phikon_loads_from_the_weights_folder_in_transformers_layout(weights_dir, offline):
    state, _ = _phikon_checkpoint(weights_dir)
    assert "encoder.layer.3.attention.attention.key.weight" in state and "blocks.3.attn.qkv.weight" not in state
    model = build_backbone(BackboneParams(name="phikon", weights="file", accept_licence=True), RGB, num_classes=2,
                           img_size=224)
    loaded = model.state_dict()
    qkv = torch.cat([state[f"encoder.layer.3.attention.attention.{p}.weight"] for p in ("query", "key", "value")])
    assert torch.equal(loaded["blocks.3.attn.qkv.weight"], qkv)
    assert torch.equal(loaded["blocks.11.mlp.fc1.weight"], state["encoder.layer.11.intermediate.dense.weight"])
    assert torch.equal(loaded["blocks.0.norm2.bias"], state["encoder.layer.0.layernorm_after.bias"])
    assert torch.equal(loaded["pos_embed"], state["embeddings.position_embeddings"])
    assert torch.equal(loaded["norm.weight"], state["layernorm.weight"])
    assert model.head.out_features == 2 and model(torch.rand(1, 3, 224, 224)).shape == (1, 2)


def test_phikon_checkpoint_with_an_extra_or_reshaped_tensor_is_refused(weights_dir, offline):
    state, path = _phikon_checkpoint(weights_dir, depth=1)  # one block: the layout is what matters here
    params = BackboneParams(name="phikon", weights="file", depth=1, accept_licence=True)
    torch.save({**state, "encoder.layer.0.attention.attention.rotary.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointMismatchError, match="unexpected tensors 1 .*layer.0.attention.attention.rotary"):
        build_backbone(params, RGB, num_classes=2, img_size=224)
    torch.save({**state, "embeddings.position_embeddings": torch.zeros(1, 197, 512)}, path)
    with pytest.raises(CheckpointMismatchError, match=r"pos_embed \(1, 197, 512\) instead of \(1, 197, 768\)"):
        build_backbone(params, RGB, num_classes=2, img_size=224)
    del state["encoder.layer.0.attention.attention.value.bias"]  # q and k alone cannot be fused
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match="missing tensors 1 .*blocks.0.attn.qkv.bias") as error:
        build_backbone(params, RGB, num_classes=2, img_size=224)
    assert "encoder.layer.0.attention.attention.query.bias" in error.value.unexpected


def _uni_checkpoint(depth: int) -> dict[str, torch.Tensor]:
    """UNI's timm layout (LayerScale gammas included), the first ``depth`` blocks only to stay small."""
    torch.manual_seed(1)
    return create_catalog_model(get_entry("uni"), depth=depth).state_dict()


def test_uni_loads_an_explicit_safetensors_file_and_resamples_position_embeddings(tmp_path, offline):
    from safetensors.torch import save_file

    state = _uni_checkpoint(depth=2)
    path = tmp_path / "uni.safetensors"
    save_file(state, str(path))
    params = BackboneParams(name="UNI", weights="file", weights_file=str(path), depth=2, accept_licence=True)
    model = build_backbone(params, RGB, num_classes=3, img_size=224)
    assert torch.equal(model.state_dict()["blocks.1.ls2.gamma"], state["blocks.1.ls2.gamma"])
    # 256 px tiles: a 16x16 grid, the 14x14 grid of the checkpoint resampled, other tensors as stored.
    bigger = build_backbone(params, RGB, num_classes=3, img_size=256)
    assert bigger.pos_embed.shape == (1, 257, 1024)
    assert torch.equal(bigger.pos_embed[:, 0], state["pos_embed"][:, 0])
    assert torch.equal(bigger.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


def test_uni_checkpoint_without_layerscale_is_refused(tmp_path, offline):
    """A plain ViT-L (built without init_values) is not UNI: the gammas are missing, and the error says so."""
    state = {k: v for k, v in _uni_checkpoint(depth=1).items() if ".ls" not in k}
    path = tmp_path / "vit-l.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError, match=r"vit-l.pth: not a uni checkpoint: missing tensors 2 "
                                                      r"\(blocks.0.ls1.gamma, blocks.0.ls2.gamma\)"):
        build_backbone(BackboneParams(name="uni", weights="file", weights_file=str(path), depth=1, accept_licence=True),
                       RGB, 2, 224)


def test_missing_weights_say_what_file_to_put_where(weights_dir, offline):
    with pytest.raises(WeightsNotFoundError) as error:
        build_backbone(BackboneParams(name="virchow2", weights="hub", depth=1, accept_licence=True), RGB,
                       num_classes=2, img_size=224)
    message = str(error.value)
    assert str(weights_dir / "virchow2" / "model.safetensors") in message
    assert "paige-ai/Virchow2" in message and "does not download" in message and "CC-BY-NC-ND-4.0" in message
    with pytest.raises(WeightsNotFoundError, match="nowhere.bin: weights file for uni not found"):
        build_backbone(BackboneParams(name="uni", weights="file", weights_file="nowhere.bin", depth=1,
                                      accept_licence=True), RGB, 2, 224)


def test_rgb_checkpoints_refuse_other_bands_and_fixed_size_entries_keep_their_size(weights_dir):
    four = RGB + (Channel("infrared", 850.0),)
    with pytest.raises(BandMismatchError, match=r"phikon was trained on the bands red, green, blue in this order; the "
                                                r"data has red, green, blue, infrared \(has bands the checkpoint never "
                                                r"saw: infrared\).*adapt_bands=true"):
        build_backbone(BackboneParams(name="phikon", weights="hub", accept_licence=True), four, 2, 224)
    # Random weights: the entry is an architecture only, nothing pretrained to adapt; it takes the data's bands.
    assert build_backbone(BackboneParams(name="phikon", depth=1), four, 2, 224).patch_embed.proj.in_channels == 4
    with torch.device("meta"), pytest.raises(CatalogError, match="h-optimus-0 takes 224 px tiles only"):
        build_backbone(BackboneParams(name="h-optimus-0"), RGB, num_classes=2, img_size=256)


def test_a_catalog_reference_model_rebuilds_from_its_description():
    from tasks.models import NormalizedClassifier, build_reference_model, reference_architecture

    net = build_backbone(BackboneParams(name="phikon", depth=1), RGB, num_classes=2, img_size=64)
    model = NormalizedClassifier(net, get_entry("phikon").mean, get_entry("phikon").std)
    architecture = reference_architecture(model, RGB, "classification")
    assert architecture.backbone == "phikon" and architecture.patch_size == 16
    rebuilt = build_reference_model(architecture)
    assert rebuilt.net.norm.eps == 1e-12


def test_backbones_verb_prints_the_catalog(capsys):
    from flows.cli import main

    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CATALOG) and "bioptimus/H-optimus-0" in out
    assert main(["backbones", "uni"]) == 0
    assert '"weights_path": "$VITRAIL_WEIGHTS_DIR/uni/pytorch_model.bin"' in capsys.readouterr().out
    assert main(["backbones", "nope"]) == 2
