"""The fine-tune stage's work: LoRA on a tiny backbone, merged into a plain normalising model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tasks_support import tiny_backbone

from tasks.finetune import fit_adapter, model_metadata, plot_training_curves
from tasks.models import LoraParams, NormalizedClassifier
from tasks.training import TrainParams, predict_logits


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path):
    train = TrainParams(epochs=3, batch_size=16, learning_rate=5e-3, warmup_epochs=0.0)
    return fit_adapter(dataset_dir, tiny_backbone(), LoraParams(rank=4), train, tmp_path_factory.mktemp("lora"))


def test_fit_adapter_returns_a_merged_normalising_model(outcome, dataset) -> None:
    assert isinstance(outcome.model, NormalizedClassifier) and not outcome.model.training
    names = [name for name, _ in outcome.model.named_parameters()]
    assert not any("lora" in n or "modules_to_save" in n for n in names)
    np.testing.assert_allclose(outcome.model.mean.flatten().numpy(), dataset.info.channel_mean, rtol=1e-6)
    val = dataset.splits["val"]
    accuracy = (predict_logits(outcome.model, val.images).argmax(1) == val.labels).mean()
    assert accuracy == pytest.approx(outcome.fit.best_metrics["val_accuracy"])
    assert accuracy >= 0.8


def test_fit_adapter_trains_a_small_share_of_the_parameters(outcome) -> None:
    assert 0 < outcome.trainable_parameters < outcome.total_parameters / 4
    assert len(outcome.fit.history) == 3


def test_model_metadata_carries_bands_classes_geometry_and_lineage(outcome, dataset) -> None:
    metadata = model_metadata(dataset.info, tiny_backbone())
    base = {key: outcome.metadata[key] for key in ("base_digest", "base_seed", "base_backbone")}
    assert outcome.metadata == {**metadata, **base, "adapter": "lora", "adapter_mergeable": True,
                                "backbone_adapted": False}  # random timm weights: no band adaptation
    assert len(base["base_digest"]) == 64 and base["base_backbone"]["name"] == tiny_backbone().name
    assert metadata["channels"][0] == {"name": "B04", "wavelength_nm": 664.6, "resolution_m": 10.0}
    assert metadata["class_names"] == list(dataset.info.class_names) and metadata["tile_size"] == 16
    assert metadata["dataset_digest"] == dataset.info.digest and metadata["domain"] == "satellite"


def test_plot_training_curves_writes_a_png(outcome, tmp_path: Path) -> None:
    path = plot_training_curves(outcome.fit.history, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
