"""Folders that may be URLs: local paths, and fsspec's in-memory file system standing in for an object store.

``memory://`` is a real fsspec implementation (the one object-store code paths go through: ``pipe_file``,
``put_file``, ``ls``), kept in this process; the S3 API itself is exercised by
``tests/integration/test_pipeline_s3.py`` against a loopback server.
"""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import pytest
from tasks_support import FAST_TRAIN, new_model

from tasks.atomic_files import is_partial
from tasks.storage import (
    StorageFolder,
    as_location,
    is_url,
    join_location,
    location_name,
    parent_location,
    staged_folder,
    staged_reference,
)


@pytest.fixture()
def memory_url() -> str:
    """A fresh prefix on fsspec's in-memory file system, removed afterwards."""
    import fsspec

    url = f"memory://vitrail-test-{uuid.uuid4().hex[:8]}/work"
    yield url
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://").split("/")[0]
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


def test_locations_join_and_split_for_paths_and_urls(tmp_path: Path) -> None:
    assert as_location(Path("s3://bucket/work")) == "s3://bucket/work"  # what Path does to a URL, repaired
    assert is_url("s3://bucket/work") and is_url(Path("s3://bucket/work")) and not is_url(tmp_path)
    assert join_location("s3://bucket/work/", "checkpoints", "abc") == "s3://bucket/work/checkpoints/abc"
    assert join_location(Path("s3://bucket/work"), "predictions") == "s3://bucket/work/predictions"
    assert join_location(tmp_path, "a", "b.json") == str((tmp_path / "a" / "b.json").resolve())
    assert location_name("s3://bucket/work/predictions/") == "predictions"
    assert parent_location("s3://bucket/work/predictions") == "s3://bucket/work"
    assert parent_location(tmp_path / "x") == str(tmp_path.resolve())
    with pytest.raises(ValueError, match="bucket has no parent"):
        parent_location("s3://bucket")


def test_a_local_folder_writes_whole_files_and_lists_only_finished_ones(tmp_path: Path) -> None:
    folder = StorageFolder(tmp_path / "work")
    assert folder.glob("*.json") == [] and folder.keys() == []
    assert folder.write_text("report.json", '{"a": 1}') == f"{tmp_path / 'work'}/report.json"
    folder.write_text("report.json", '{"a": 2}')  # replaced whole
    assert folder.read_text("report.json") == '{"a": 2}'
    (tmp_path / "work" / ".epoch-002.pt.partial-999999-0").write_bytes(b"half")  # a killed writer's leftover
    folder.write_bytes("epoch-001.pt", b"one")
    assert folder.glob("epoch-*.pt") == ["epoch-001.pt"]
    assert folder.reference("epoch-001.pt") == tmp_path / "work" / "epoch-001.pt"
    assert folder.remove_partials() == [str(tmp_path / "work" / ".epoch-002.pt.partial-999999-0")]
    assert folder.keys() == ["epoch-001.pt", "report.json"]
    folder.remove("report.json")
    assert not folder.exists("report.json")
    assert pickle.loads(pickle.dumps(folder)).read_bytes("epoch-001.pt") == b"one"


def test_writing_publishes_on_success_and_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    folder = StorageFolder(tmp_path)
    with folder.writing("model.onnx") as partial:
        partial.write_bytes(b"v1")
    with pytest.raises(RuntimeError, match="export failed"):
        with folder.writing("model.onnx") as partial:
            partial.write_bytes(b"v2-half")
            raise RuntimeError("export failed")
    assert folder.read_bytes("model.onnx") == b"v1"
    assert not [p for p in tmp_path.iterdir() if is_partial(p)]
    source = tmp_path / "elsewhere.bin"
    source.write_bytes(b"copied")
    folder.upload(source, "sub/copy.bin")
    assert folder.read_bytes("sub/copy.bin") == b"copied"


def test_an_fsspec_url_folder_uploads_whole_files_only_when_complete(memory_url: str) -> None:
    folder = StorageFolder(memory_url + "/checkpoints")
    assert folder.remote and folder.glob("epoch-*.pt") == []
    with folder.writing("epoch-001.pt") as local:
        assert local.name == "epoch-001.pt" and not local.is_relative_to(Path.cwd())  # suffix kept, never in cwd
        local.write_bytes(b"state-1")
    scratch = local.parent
    assert not scratch.exists()  # the local copy is gone once uploaded
    with pytest.raises(RuntimeError):
        with folder.writing("epoch-002.pt") as local:
            local.write_bytes(b"half")
            raise RuntimeError("killed")
    assert folder.glob("epoch-*.pt") == ["epoch-001.pt"] and not local.parent.exists()
    assert folder.reference("epoch-001.pt") == f"{memory_url}/checkpoints/epoch-001.pt"
    with folder.open("epoch-001.pt") as handle:
        assert handle.read() == b"state-1"
    clone = pickle.loads(pickle.dumps(folder))
    assert clone.read_bytes("epoch-001.pt") == b"state-1" and clone.remove_partials() == []


def test_staged_folder_is_the_folder_itself_locally_and_an_upload_for_a_url(tmp_path: Path, memory_url: str) -> None:
    with staged_folder(tmp_path / "compress") as local:
        assert local == tmp_path / "compress" and local.is_dir()

    target = f"{memory_url}/predictions"
    with staged_folder(target) as scratch:
        (scratch / "scene.tif").write_bytes(b"tif")
        (scratch / "nested").mkdir()
        (scratch / "nested" / "mask.nii.gz").write_bytes(b"nii")
        (scratch / ".x.partial-1-0").write_bytes(b"half")  # never uploaded
        where = staged_reference(scratch / "nested" / "mask.nii.gz", scratch, target)
    assert where == f"{target}/nested/mask.nii.gz"
    assert StorageFolder(target).keys() == ["nested/mask.nii.gz", "scene.tif"]
    assert not scratch.exists()

    with pytest.raises(RuntimeError):
        with staged_folder(f"{memory_url}/failed") as scratch:
            (scratch / "half.tif").write_bytes(b"x")
            raise RuntimeError("prediction failed")
    assert StorageFolder(f"{memory_url}/failed").keys() == [] and not scratch.exists()


def test_training_checkpoints_at_a_url_are_resumed(dataset, memory_url: str) -> None:
    from tasks.training import TrainParams, fit, read_checkpoint

    location = f"{memory_url}/checkpoints"
    settings = {**FAST_TRAIN, "epochs": 2}
    first = fit(new_model(dataset), dataset, TrainParams(**settings), location, "tiny-vit")
    assert first.checkpoints == [f"{location}/epoch-001.pt", f"{location}/epoch-002.pt"]
    assert read_checkpoint(first.checkpoints[-1])["epoch"] == 2
    again = fit(new_model(dataset, seed=5), dataset, TrainParams(**{**settings, "epochs": 3}), location, "tiny-vit")
    assert again.resumed_from_epoch == 2 and again.history[:2] == first.history
    assert again.checkpoints == [f"{location}/epoch-003.pt"]
    assert StorageFolder(location).glob("*") == ["epoch-001.pt", "epoch-002.pt", "epoch-003.pt"]


def test_an_object_store_workdir_without_a_tracking_server_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.request_errors import RequestError
    from tasks.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RequestError, match="s3://bucket/work: a work folder on object storage needs an MLflow "
                                           "tracking server: set MLFLOW_TRACKING_URI"):
        resolve_tracking_uri("s3://bucket/work")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri("s3://bucket/work") == "http://127.0.0.1:1"
