"""Shared fixtures of the task tests: tiny synthetic sample sets, a written dataset, a trained tiny ViT.

Everything here is small on purpose (3 bands, 16 px tiles, a one-block ViT with 4 px patches) so the
whole ``tests/tasks`` folder runs in well under a minute on two CPU cores. Session-scoped fixtures
are shared read-only; tests that damage files work on copies.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from domains import Channel, SampleSet  # noqa: E402

TILE = 16
CLASS_NAMES = ("water", "vegetation", "bare")
# Red, green and blue as Sentinel-2 B04, B03, B02 see them.
CHANNELS = (Channel("B04", 664.6, 10.0), Channel("B03", 559.8, 10.0), Channel("B02", 492.7, 10.0))


def tiny_backbone(**overrides):
    """The smallest ViT worth training: vit_tiny width, one block, 4 px patches."""
    from tasks.models import BackboneParams

    return BackboneParams(**{"name": "vit_tiny_patch16_224", "patch_size": 4, "depth": 1, **overrides})


def make_samples(seed: int = 0, n_groups: int = 12, per_group: int = 8, size: int = TILE,
                 channels: tuple[Channel, ...] = CHANNELS, source: str = "synthetic-scene") -> SampleSet:
    """Separable samples: class k is bright in channel k (mod C), dark elsewhere, plus a little noise.

    Groups are ``blk-0`` .. ``blk-<n_groups - 1>``, each holding ``per_group`` samples of mixed classes.
    """
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    labels = np.arange(n) % len(CLASS_NAMES)
    rng.shuffle(labels)
    means = np.full((n, len(channels)), 0.1, dtype=np.float32)
    means[np.arange(n), labels % len(channels)] = 0.6
    images = means[:, :, None, None] + rng.normal(0.0, 0.03, size=(n, len(channels), size, size))
    groups = np.array([f"blk-{i // per_group}" for i in range(n)])
    locations = np.array([(size * (i // 10), size * (i % 10)) for i in range(n)], dtype=np.int64)
    return SampleSet(images=images.astype(np.float32), labels=labels.astype(np.int64), groups=groups,
                     locations=locations, source=source, channels=channels, class_names=CLASS_NAMES,
                     dropped={"nodata": 2}, provenance={"crs": "EPSG:32618"})


@pytest.fixture(scope="session")
def samples() -> SampleSet:
    return make_samples()


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory, samples: SampleSet) -> Path:
    """A written dataset shared by the session; tests must not modify it (copy it first)."""
    from tasks.dataset import SplitParams, write_dataset

    out = tmp_path_factory.mktemp("dataset")
    write_dataset(samples, "satellite", "classification", out, SplitParams(seed=0))
    return out


@pytest.fixture(scope="session")
def dataset(dataset_dir: Path):
    from tasks.dataset import load_dataset

    return load_dataset(dataset_dir)


def new_model(dataset, seed: int = 0) -> torch.nn.Module:
    """A fresh normalising tiny ViT for ``dataset`` (random weights drawn with ``seed``)."""
    from tasks.models import NormalizedClassifier, build_backbone

    torch.manual_seed(seed)
    info = dataset.info
    net = build_backbone(tiny_backbone(), info.channels, info.num_classes, info.tile_size)
    return NormalizedClassifier(net, info.channel_mean, info.channel_std)


FAST_TRAIN = dict(epochs=4, batch_size=16, learning_rate=3e-3, warmup_epochs=0.0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, dataset):
    """FitResult of a tiny ViT trained a few epochs on the shared dataset."""
    from tasks.training import TrainParams, fit

    model = new_model(dataset)
    return fit(model, dataset, TrainParams(**FAST_TRAIN), tmp_path_factory.mktemp("checkpoints"), "tiny-vit")


@pytest.fixture(scope="session")
def trained_model(trained) -> torch.nn.Module:
    return trained.model.eval()


@pytest.fixture(scope="session")
def model_metadata(dataset) -> dict:
    from dataclasses import asdict

    info = dataset.info
    return {"domain": info.domain, "task": info.task, "channels": [asdict(c) for c in info.channels],
            "class_names": list(info.class_names), "tile_size": info.tile_size, "backbone": "vit_tiny_patch16_224",
            "dataset_digest": info.digest}


@pytest.fixture(scope="session")
def onnx_fp32(tmp_path_factory: pytest.TempPathFactory, trained_model, dataset, model_metadata) -> Path:
    """The trained tiny model exported once to ONNX (read-only for tests)."""
    from tasks.compression.export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "model-fp32.onnx"
    return export_onnx(trained_model, dataset.splits["test"].images, path, model_metadata)
