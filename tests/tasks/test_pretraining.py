"""MAE pretraining: masking, the reconstruction objective in the one loop, resume, export and fine-tune loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_support import tiny_backbone

from tasks.pretraining import (MaeParams, MaskedAutoencoder, default_mask_ratio, finetune_backbone_params,
                               pretrain_encoder, pretraining_view, random_masking)
from tasks.training import TrainParams

MAE = MaeParams(decoder_dim=32, decoder_depth=1, decoder_heads=2, preview_samples=2)
PRETRAIN = dict(batch_size=16, learning_rate=3e-3, warmup_epochs=0.0, threads=1)


def _tiny_mae(dataset, ratio: float = 0.75) -> MaskedAutoencoder:
    from tasks.models import build_backbone

    torch.manual_seed(0)
    info = dataset.info
    encoder = build_backbone(tiny_backbone(), info.channels, 0, info.tile_size)
    return MaskedAutoencoder(encoder, info.channel_mean, info.channel_std, ratio, decoder_dim=32, decoder_depth=1,
                             decoder_heads=2)


@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_masking_keeps_exactly_the_unmasked_share_and_differs_per_sample(ratio):
    generator = torch.Generator().manual_seed(0)
    keep, mask, restore = random_masking(8, 100, ratio, generator=generator)
    kept = round(100 * (1 - ratio))
    assert keep.shape == (8, kept)
    assert (mask.sum(dim=1) == 100 - kept).all()
    # The kept indices are exactly the unmasked positions, and no two samples share a mask.
    for row in range(8):
        assert set(keep[row].tolist()) == set(torch.nonzero(mask[row] == 0).flatten().tolist())
    assert len({tuple(m.tolist()) for m in mask}) == 8
    assert (restore.sort(dim=1).values == torch.arange(100)).all()  # each row a permutation


def test_radiographs_mask_more_than_overhead_imagery():
    assert default_mask_ratio("radiology") == 0.9
    assert default_mask_ratio("satellite") == 0.75


def test_patchify_round_trips_and_the_loss_counts_only_masked_patches(dataset):
    mae = _tiny_mae(dataset)
    images = torch.from_numpy(np.asarray(dataset.splits["train"].images[:4]))
    assert torch.equal(mae.unpatchify(mae.patchify(images)), images)
    original, masked, reconstruction = mae.reconstruct(images, torch.Generator().manual_seed(1))
    hidden = (masked == 0).float().mean().item()
    assert hidden == pytest.approx(0.75, abs=0.01)
    # Visible patches are pasted from the original: only hidden ones differ.
    visible = masked != 0
    assert torch.allclose(reconstruction[visible], original[visible])


def test_pretraining_view_leaves_out_test_and_val_groups(dataset):
    view, excluded = pretraining_view(dataset)
    splits = dataset.splits
    assert len(view.splits["train"]) == len(splits["train"])
    assert set(view.splits["train"].groups).isdisjoint(splits["test"].groups)
    assert set(excluded) == {"test", "val"}
    assert excluded["test"]["samples"] == len(splits["test"]) and len(excluded["test"]["groups_digest"]) == 64
    np.testing.assert_array_equal(view.splits["train"].images[:3], splits["train"].images[:3])


def test_reconstruction_loss_decreases_over_a_few_steps(dataset):
    from tasks.reproducibility import pin_determinism

    pin_determinism(0, 1)
    mae = _tiny_mae(dataset)
    images = torch.from_numpy(np.asarray(dataset.splits["train"].images[:16]))
    optimizer = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = mae(images)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, dataset_dir):
    out = tmp_path_factory.mktemp("pretrain")
    outcome = pretrain_encoder(dataset_dir, tiny_backbone(), MAE, TrainParams(epochs=2, **PRETRAIN),
                               out / "checkpoints", out / "encoder")
    return outcome


def test_pretraining_exports_an_encoder_with_its_description(pretrained, dataset):
    description = json.loads(pretrained.description_file.read_text())
    assert description["architecture"]["num_classes"] == 0
    assert description["mask_ratio"] == 0.75 and description["dataset_digest"] == dataset.info.digest
    assert description["preprocessing"]["mean"] == list(dataset.info.channel_mean)
    assert [b["name"] for b in description["bands"]] == [c.name for c in dataset.info.channels]
    assert description["samples_seen"] == 2 * len(dataset.splits["train"])
    assert description["excluded_splits"]["test"]["samples"] == len(dataset.splits["test"])
    assert [len(h) for h in pretrained.fit.history] and {"train_loss", "val_loss"} <= set(pretrained.fit.history[0])
    assert [p.name for p in pretrained.reconstruction_images] == ["reconstruction-epoch-001.png",
                                                                   "reconstruction-epoch-002.png"]
    import matplotlib.image

    grid = matplotlib.image.imread(pretrained.reconstruction_images[0])
    assert grid.shape[1] > grid.shape[0] > 0  # 2 rows of 3 panels


def test_exported_encoder_loads_into_a_finetune_backbone(pretrained, dataset):
    from safetensors.torch import load_file

    from tasks.models import build_backbone

    backbone = finetune_backbone_params(pretrained.description_file)
    assert backbone.weights == "file" and backbone.patch_size == 4 and backbone.depth == 1
    info = dataset.info
    model = build_backbone(backbone, info.channels, info.num_classes, info.tile_size)
    exported = load_file(str(pretrained.encoder_file))
    state = model.state_dict()
    assert exported and not any(k.startswith("head.") for k in exported)
    for key, tensor in exported.items():
        assert torch.equal(state[key], tensor), key
    assert state["head.weight"].shape[0] == info.num_classes


def test_pretraining_killed_after_an_epoch_resumes_to_the_uninterrupted_encoder(tmp_path: Path, dataset_dir,
                                                                                pretrained):
    from safetensors.torch import load_file

    class Crash(Exception):
        pass

    def crash_after_epoch_1(epoch: int, total: int, metrics: dict) -> None:
        if epoch == 1:
            raise Crash

    settings = TrainParams(epochs=2, **PRETRAIN)
    folder = tmp_path / "checkpoints"
    with pytest.raises(Crash):
        pretrain_encoder(dataset_dir, tiny_backbone(), MAE, settings, folder, tmp_path / "crashed",
                         on_epoch=crash_after_epoch_1)
    resumed = pretrain_encoder(dataset_dir, tiny_backbone(), MAE, settings, folder, tmp_path / "resumed")
    assert resumed.fit.resumed_from_epoch == 1
    assert [h["val_loss"] for h in resumed.fit.history] == [h["val_loss"] for h in pretrained.fit.history]
    straight = load_file(str(pretrained.encoder_file))
    again = load_file(str(resumed.encoder_file))
    assert straight.keys() == again.keys()
    for key, tensor in straight.items():
        assert torch.equal(again[key], tensor), key


def test_encoders_with_register_tokens_and_separate_class_position_mask_the_same_way():
    """Catalog entries such as UNI2-h and Virchow2 have register tokens and position embeddings for patches only."""
    import timm

    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=1,
                                num_classes=0, reg_tokens=2, no_embed_class=True)
    mae = MaskedAutoencoder(encoder, [0.0] * 3, [1.0] * 3, 0.75, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    images = torch.randn(2, 3, 16, 16)
    tokens, mask, _ = mae.encode(images)
    assert tokens.shape[1] == 3 + 4  # class + 2 register tokens, then the 4 visible of 16 patches
    loss = mae(images)
    loss.backward()
    assert torch.isfinite(loss) and encoder.reg_token.grad is not None


def test_max_tiles_draws_the_same_subset_every_time(dataset):
    first, _ = pretraining_view(dataset, max_tiles=20, seed=3)
    again, _ = pretraining_view(dataset, max_tiles=20, seed=3)
    other, _ = pretraining_view(dataset, max_tiles=20, seed=4)
    train = first.splits["train"]
    assert len(train) == len(train.groups) == 20
    np.testing.assert_array_equal(train.images[:], again.splits["train"].images[:])
    assert not np.array_equal(train.images[:], other.splits["train"].images[:])
    assert set(train.groups) <= set(dataset.splits["train"].groups)
