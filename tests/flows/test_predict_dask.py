"""The predict flow over a drop folder: one task per scene on a Dask cluster writes the bytes of the local run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.predict import PredictParams, predict
from tests.flows.registry_support import write_tiny_onnx


@pytest.fixture(scope="module")
def drop_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small multi-band scenes of different pixels side by side, as a nightly drop delivers them."""
    from domains.satellite.examples import write_example

    root = tmp_path_factory.mktemp("drop")
    drop = root / "drop"
    drop.mkdir()
    for seed in range(3):
        scene = write_example(root / f"scene{seed}", seed=seed, size=24)
        shutil.copy(scene["multiband"], drop / f"scene{seed}.tif")
    return drop


@pytest.fixture()
def model_uri(tmp_path: Path, local_mlflow) -> str:
    """A real logged ONNX model (3 bands, 8 px tiles) in the test's own MLflow store."""
    from tasks import tracking

    tracking.configure_tracking(tmp_path)
    with tracking.stage_run("satellite", "finetune", tmp_path):
        return tracking.log_edge_model(write_tiny_onnx(tmp_path / "tiny.onnx", 3.0), {"variant": "onnx-fp32"},
                                       np.zeros((1, 3, 8, 8), dtype=np.float32))


def _run(drop: Path, out: Path, model_uri: str, workdir: Path, runner: dict | None):
    return predict(PredictParams(domain="satellite", input=str(drop), output=str(out), model_uri=model_uri,
                                 workdir=str(workdir), runner=runner))


def _stac_without_write_time(raster: Path) -> dict:
    item = json.loads(raster.with_suffix(".json").read_text())
    assert item["properties"].pop("datetime")
    return item


def test_dask_runner_writes_the_bytes_of_the_local_runner(tmp_path: Path, drop_folder: Path, model_uri: str) -> None:
    from distributed import LocalCluster

    one_task = _run(drop_folder, tmp_path / "one-task", model_uri, tmp_path, None)
    local = _run(drop_folder, tmp_path / "local", model_uri, tmp_path, {"kind": "local", "workers": 2})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        on_dask = _run(drop_folder, tmp_path / "dask", model_uri, tmp_path,
                       {"kind": "dask", "address": cluster.scheduler_address})
        ran_on_dask = set(cluster.scheduler.task_prefixes)  # what the Dask scheduler was given to run
    assert "predict_scene" in ran_on_dask
    names = ["scene0.tif", "scene1.tif", "scene2.tif"]
    for receipt, folder in ((one_task, "one-task"), (local, "local"), (on_dask, "dask")):
        assert not receipt.failed
        assert sorted(Path(p).name for p in receipt.outputs) == names
    for name in names:
        expected = (tmp_path / "one-task" / name).read_bytes()
        assert (tmp_path / "local" / name).read_bytes() == expected, name
        assert (tmp_path / "dask" / name).read_bytes() == expected, name
        sidecar = _stac_without_write_time(tmp_path / "one-task" / name)  # STAC item: all but its write time
        assert _stac_without_write_time(tmp_path / "local" / name) == sidecar
        assert _stac_without_write_time(tmp_path / "dask" / name) == sidecar
    # The scenes differ, so equal bytes are not one output written three times.
    assert len({(tmp_path / "dask" / name).read_bytes() for name in names}) == 3


def test_a_failing_scene_is_reported_and_the_others_are_written(tmp_path: Path, drop_folder: Path,
                                                                  model_uri: str) -> None:
    drop = tmp_path / "drop"
    shutil.copytree(drop_folder, drop)
    (drop / "broken.tif").write_bytes(b"not a GeoTIFF")
    receipt = _run(drop, tmp_path / "out", model_uri, tmp_path, {"kind": "local", "workers": 2})
    assert sorted(Path(p).name for p in receipt.outputs) == ["scene0.tif", "scene1.tif", "scene2.tif"]
    assert list(receipt.failed) == [str(drop / "broken.tif")]
