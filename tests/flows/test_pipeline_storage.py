"""The pipeline's work folder on object storage: what is refused before any work starts."""

import pytest


def test_an_s3_workdir_without_a_tracking_server_is_refused_before_any_work(tmp_path, local_mlflow, monkeypatch):
    from flows.pipeline import PipelineParams, pipeline
    from tasks.request_errors import RequestError

    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    # Neither the source nor the bucket exists: the refusal must come first, before ingest reads or writes.
    params = PipelineParams(source=str(tmp_path / "no-scene"), labels=str(tmp_path / "no-labels.tif"),
                            workdir="s3://vitrail-nowhere/work")
    with pytest.raises(RequestError, match=r"^s3://vitrail-nowhere/work: a work folder on object storage needs an "
                                           r"MLflow tracking server: set MLFLOW_TRACKING_URI"):
        pipeline(params)
    assert list(here.iterdir()) == []


def test_the_dataset_goes_to_its_own_location_or_under_the_workdir(tmp_path):
    from flows.pipeline import PipelineParams

    common = dict(source="scene", labels="labels.tif")
    assert PipelineParams(**common, workdir="s3://bucket/work").dataset_location() == "s3://bucket/work/dataset"
    assert PipelineParams(**common, workdir="s3://bucket/work", dataset="s3://bucket/ds").dataset_location() \
        == "s3://bucket/ds"
    assert PipelineParams(**common, workdir=str(tmp_path)).dataset_location() == str((tmp_path / "dataset").resolve())
