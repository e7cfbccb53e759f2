"""Helpers shared by the task tests (imported by conftest.py and the test modules).

Named ``tasks_support`` rather than ``conftest`` or ``helpers`` so it cannot clash with other test
folders' modules (the suite uses pytest's default rootdir-relative imports, without ``__init__.py``).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from domains import Channel, SampleSet  # noqa: E402

TILE = 16
CLASS_NAMES = ("water", "vegetation", "bare")
# Red, green and blue as Sentinel-2 B04, B03, B02 see them.
CHANNELS = (Channel("B04", 664.6, 10.0), Channel("B03", 559.8, 10.0), Channel("B02", 492.7, 10.0))
FAST_TRAIN = dict(epochs=3, batch_size=16, learning_rate=3e-3, warmup_epochs=0.0)


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


FINDINGS = ("nodule", "effusion")


def make_multilabel_samples(seed: int = 0, n_groups: int = 12, per_group: int = 8, size: int = TILE) -> SampleSet:
    """Two independent findings: finding k brightens channel k; a sample may have none, one or both."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    labels = (rng.random((n, len(FINDINGS))) < 0.4).astype(np.int8)
    means = np.full((n, len(CHANNELS)), 0.1, dtype=np.float32)
    means[:, :len(FINDINGS)] += 0.5 * labels
    images = means[:, :, None, None] + rng.normal(0.0, 0.03, size=(n, len(CHANNELS), size, size))
    groups = np.array([f"patient-{i // per_group}" for i in range(n)])
    return SampleSet(images=images.astype(np.float32), labels=labels, groups=groups,
                     locations=np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.int64), source="synthetic-studies",
                     channels=CHANNELS, class_names=FINDINGS, task="multilabel",
                     sample_ids=np.array([f"study-{i // 2}/slice-{i % 2}" for i in range(n)]))


def make_segmentation_samples(seed: int = 0, n_groups: int = 12, per_group: int = 8, size: int = TILE) -> SampleSet:
    """Class 1 is a bright square in channel 0 at a random place; everything else is class 0."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    labels = np.zeros((n, size, size), dtype=np.int16)
    images = rng.normal(0.1, 0.03, size=(n, len(CHANNELS), size, size)).astype(np.float32)
    for i in range(n):
        if i % 4 == 3:
            continue  # a quarter of the samples have nothing to find
        side = int(rng.integers(4, size // 2 + 1))
        row, col = rng.integers(0, size - side + 1, size=2)
        labels[i, row:row + side, col:col + side] = 1
        images[i, 0, row:row + side, col:col + side] += 0.6
    labels[:, 0, 0] = -1  # one ignored pixel per sample
    groups = np.array([f"blk-{i // per_group}" for i in range(n)])
    locations = np.array([(size * (i // 10), size * (i % 10)) for i in range(n)], dtype=np.int64)
    return SampleSet(images=images, labels=labels, groups=groups, locations=locations, source="synthetic-capture",
                     channels=CHANNELS, class_names=("background", "plume"), task="segmentation")


def new_model(dataset, seed: int = 0) -> torch.nn.Module:
    """A fresh normalising tiny ViT for ``dataset`` (random weights drawn with ``seed``)."""
    from tasks.models import NormalizedClassifier, build_backbone

    torch.manual_seed(seed)
    info = dataset.info
    net = build_backbone(tiny_backbone(), info.channels, info.num_classes, info.tile_size, task=info.task)
    return NormalizedClassifier(net, info.channel_mean, info.channel_std)
