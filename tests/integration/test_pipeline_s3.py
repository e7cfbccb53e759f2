"""A whole pipeline with its dataset, work folder and MLflow artifacts on a loopback S3 server.

Three real services, each started and stopped here: moto's S3 server on 127.0.0.1 (an HTTP S3 API, in
memory), ``mlflow server`` with a SQLite backend in a temporary folder that proxies artifacts to
``s3://<bucket>/mlartifacts``, and Prefect's test server. The pipeline flow runs in this process with
``dataset=s3://<bucket>/ds`` and ``workdir=s3://<bucket>/work``, from an empty current folder that must
stay empty: nothing the pipeline makes may land on the local disk of the worker that ran it, except in
temporary folders it removes.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from integration_support import VENV_BIN, find_free_port, stop_process_group, running_s3_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "vitrail-pipeline"
# The tiny settings of the flow tests (tests/flows/test_pipeline.py): a one-block ViT on 8 px tiles.
TINY = dict(
    tiling={"tile_size": 8, "stride": 8, "block_size": 16},
    split={"val_fraction": 0.2, "test_fraction": 0.25, "seed": 0},
    backbone={"name": "vit_tiny_patch16_224", "patch_size": 4, "depth": 1},
    lora={"rank": 4, "alpha": 8},
    train={"epochs": 2, "batch_size": 16},
    compression={"latency_repeats": 5, "throughput_batch": 4, "quantization": {"calibration_samples": 8}},
    gate={"min_metric": 0.0, "max_drop_vs_fp32": 1.0, "latency_budget_ms": 10000},
)
MLFLOW_START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with the bucket, this process's AWS settings pointed at it."""
    with running_s3_server(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def mlflow_server(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a free loopback port: SQLite runs and registry, artifacts proxied to the S3 bucket."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = find_free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (home / "server.log").open("w")
    process = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"],
        cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
        while not _answers(f"{url}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(process, grace_s=10)
        log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_pipeline_keeps_its_dataset_checkpoints_reports_predictions_and_models_on_s3(
        s3_endpoint: str, mlflow_server: str, prefect_harness: None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import rasterio
    import s3fs
    from mlflow import MlflowClient

    from domains import get_domain
    from flows.finetune import FinetuneParams, finetune_backbone
    from flows.pipeline import PipelineParams, pipeline
    from tasks.prediction import load_model
    from tasks.tracking import load_reference_model
    from tasks.training import read_checkpoint

    example = get_domain("satellite").write_example(tmp_path / "example")
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    dataset, workdir = f"s3://{BUCKET}/ds", f"s3://{BUCKET}/work"

    receipt = pipeline(PipelineParams(source=str(example["scene_dir"]), labels=str(example["labels"]),
                                      workdir=workdir, dataset=dataset, **TINY))

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    # The dataset: metadata, manifest and chunk objects under its prefix.
    assert receipt.ingest.dataset == dataset
    stored = set(fs.find(f"{BUCKET}/ds"))
    assert {f"{BUCKET}/ds/{name}" for name in ("dataset.json", "manifest.parquet", "zarr.json")} <= stored
    assert any(key.startswith(f"{BUCKET}/ds/images/c/") for key in stored)
    # Checkpoints, one per epoch, written by the training process to the work folder.
    checkpoints = sorted(fs.glob(f"{BUCKET}/work/checkpoints/*/epoch-*.pt"))
    assert [key.rsplit("/", 1)[1] for key in checkpoints] == ["epoch-001.pt", "epoch-002.pt"]
    assert read_checkpoint(f"s3://{checkpoints[-1]}")["epoch"] == 2  # read back with weights_only, from S3
    # The compress report and the ONNX files the compress stage made.
    assert receipt.compress.report == f"{workdir}/compress_report.json"
    report = json.loads(fs.cat_file(f"{BUCKET}/work/compress_report.json"))
    assert {"torch-fp32", "onnx-fp32", "onnx-int8"} <= {v["name"] for v in report["variants"]}
    assert fs.glob(f"{BUCKET}/work/compress/{receipt.compress.run_id}/*.onnx")
    # The prediction map, georeferenced like the scene.
    [output] = receipt.predict.outputs
    assert output.startswith(f"{workdir}/predictions/") and output.endswith(".tif")
    reference_band = next(example["scene_dir"].glob("*B02*.tif"))
    with rasterio.MemoryFile(fs.cat_file(output.removeprefix("s3://"))) as memory, memory.open() as pred, \
            rasterio.open(reference_band) as band:
        assert (pred.crs, pred.transform, pred.shape) == (band.crs, band.transform, band.shape)
        assert set(np.unique(pred.read(1))) <= {0, 1, 2, 255}

    # MLflow kept runs and the registry in its own database and every model file in the bucket.
    artifacts = fs.find(f"{BUCKET}/mlartifacts")
    assert any(key.endswith("/MLmodel") for key in artifacts)
    assert any(key.endswith("model.safetensors") for key in artifacts)
    assert any(key.endswith(".onnx") for key in artifacts)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert client.get_run(receipt.finetune.run_id).data.tags["vitrail.dataset_digest"] == receipt.ingest.digest

    # The pipeline's champion loads back (edge and reference), its files fetched from the bucket.
    assert receipt.promote.passed and receipt.promote.alias == "champion"
    edge = load_model("models:/satellite-tile-classification-edge@champion", threads=1)
    tile = edge.tile_size
    probabilities = edge.probabilities(np.zeros((2, len(edge.channels), tile, tile), dtype=np.float32))
    assert probabilities.shape == (2, len(edge.class_names))
    reference = load_reference_model("models:/satellite-tile-classification@champion")
    assert sum(p.numel() for p in reference.parameters()) > 0

    # A longer fine-tune resumes from the checkpoints on S3: only epoch 3 is trained (and logged).
    longer = finetune_backbone(FinetuneParams(dataset=dataset, workdir=workdir, backbone=TINY["backbone"],
                                              lora=TINY["lora"], train={**TINY["train"], "epochs": 3}))
    assert [m.step for m in client.get_metric_history(longer.run_id, "val_accuracy")] == [3]
    fs.invalidate_cache()
    assert sorted(fs.glob(f"{BUCKET}/work/checkpoints/*/epoch-*.pt"))[-1].endswith("epoch-003.pt")

    # Nothing landed in the folder the pipeline ran from.
    assert sorted(p.name for p in here.iterdir()) == []


def _separable_samples():
    """48 two-band 8 px samples whose class is which band is bright, in 12 leakage groups."""
    from domains import Channel, SampleSet

    rng = np.random.default_rng(0)
    n = 48
    labels = np.arange(n) % 2
    images = rng.integers(0, 500, (n, 2, 8, 8), dtype=np.uint16)
    images[np.arange(n), labels] += 3000
    return SampleSet(images=images, labels=labels, groups=np.array([f"g{i // 4}" for i in range(n)]),
                     locations=np.stack([np.arange(n), np.zeros(n, int)], axis=1), source="scene",
                     channels=(Channel("B04"), Channel("B08")), class_names=("a", "b"), scaling=((1e-4, 0.0),) * 2)


def test_two_training_processes_read_from_s3_and_only_rank_zero_checkpoints_there(s3_endpoint: str) -> None:
    """DDP over gloo: both spawned processes read the dataset from S3; rank 0 alone uploads checkpoints."""
    import s3fs
    import torch

    from tasks.dataset import SplitParams, load_dataset, write_dataset
    from tasks.training import TrainParams, fit

    data, checkpoints = f"s3://{BUCKET}/ddp/dataset", f"s3://{BUCKET}/ddp/checkpoints"
    write_dataset(_separable_samples(), "satellite", "classification", data, SplitParams(seed=0))
    dataset = load_dataset(data)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 8 * 8, 2))
    result = fit(model, dataset, TrainParams(epochs=2, batch_size=8, warmup_epochs=0.0, processes=2), checkpoints,
                 "linear")
    assert len(result.rank_digests) == 2 and result.rank_digests[0] == result.rank_digests[1]
    assert result.checkpoints == [f"{checkpoints}/epoch-001.pt", f"{checkpoints}/epoch-002.pt"]
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert sorted(key.rsplit("/", 1)[1] for key in fs.find(checkpoints)) == ["epoch-001.pt", "epoch-002.pt"]
