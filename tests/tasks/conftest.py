"""Shared fixtures of the task tests: a tiny synthetic dataset written to disk and a trained tiny ViT.

Everything is small on purpose (3 bands, 16 px tiles, a one-block ViT with 4 px patches) so the whole
``tests/tasks`` folder runs in well under a minute on two CPU cores. Session-scoped fixtures are
shared read-only; tests that damage files work on copies.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from tasks_support import FAST_TRAIN, make_samples, new_model

from domains import SampleSet


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


@pytest.fixture
def offline(monkeypatch):
    """No socket can be opened: loading weights must never reach a hub."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    """A private weights folder and an empty hub cache (a real cache on this machine cannot satisfy a
    lookup); no licence accepted through the environment."""
    from tasks.backbone_catalog import ACCEPT_LICENCES_ENV, WEIGHTS_DIR_ENV

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(ACCEPT_LICENCES_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return tmp_path
