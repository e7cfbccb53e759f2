"""End-to-end on CT windows: the pipeline ingests HU, registers a model that windows HU itself, exports it and
predicts from HU (issue 12: preprocessing is part of the model)."""

import json

import numpy as np
import pytest

from test_pipeline import TINY


@pytest.mark.slow
def test_ct_window_pipeline_registers_an_hu_in_model_and_predicts_from_hu(tmp_path, local_mlflow):
    from domains.radiology.examples import write_ct_cohort
    from flows.pipeline import PipelineParams, pipeline
    from tasks.dataset import load_dataset
    from tasks.prediction import load_model
    from tasks.tracking import configure_tracking

    cohort = write_ct_cohort(tmp_path / "cohort", patients=12)
    params = PipelineParams(domain="radiology", source=str(cohort["source"]), labels=str(cohort["labels"]),
                            workdir=str(tmp_path / "work"), bands=["lung", "mediastinum", "bone"], **TINY)
    receipt = pipeline(params)
    info = load_dataset(receipt.ingest.dataset).info
    assert info.stored_dtype == "int16" and [c.name for c in info.channels] == ["hu"]
    assert [w.name for w in info.windows] == ["lung", "mediastinum", "bone"]
    assert any(key.startswith("onnx-fp32.") for key in receipt.validation.metrics)  # the export scored on HU
    assert receipt.predict.outputs and not receipt.predict.failed
    report = json.loads(open(receipt.predict.outputs[0]).read())
    assert report["channels"] == ["hu"] and report["images_scored"] > 0
    configure_tracking(tmp_path / "work")
    model = load_model(receipt.finetune.model_uri, threads=1)
    assert model.input_scaling == ((1.0, 0.0),)
    hu = np.full((1, 1, info.tile_size, info.tile_size), -1024.0, dtype=np.float32)
    hu[..., 2:6, 2:6] = 3071.0
    assert np.isfinite(model.predict_logits(hu)).all()
