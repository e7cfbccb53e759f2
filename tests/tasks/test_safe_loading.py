"""Nothing Vitrail loads is unpickled: planted pickle payloads in checkpoints and registered models are refused.

Each payload is a real one: an object whose ``__reduce__`` makes unpickling write a marker file. A
test first shows the payload stays inert under Vitrail's loaders, then that a plain unpickle of the
same file does run it, so the refusal is what kept the marker away.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow_isolation import mlflow_sandbox
from tasks_support import FAST_TRAIN, make_multilabel_samples, make_segmentation_samples, new_model

from tasks import tracking
from tasks.models import ReferenceModelError
from tasks.training import TrainParams, fit, predict_logits, read_checkpoint

DOMAIN = "satellite"
PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt"}


class Payload:
    """Unpickling this writes ``marker``: what a malicious file would do with any code it likes."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",)


class PayloadModule(torch.nn.Module):
    """A torch module that pickles as :class:`Payload`: a model 'logged the old way' by an attacker."""

    def __init__(self, marker: Path):
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return Payload(self.marker).__reduce__()


# --- training checkpoints ----------------------------------------------------------------------------


def test_a_pickle_payload_planted_in_a_checkpoint_stops_the_resume(tmp_path: Path, dataset, trained) -> None:
    checkpoints = shutil.copytree(trained.checkpoints[0].parent, tmp_path / "checkpoints")  # epochs 1-3
    assert read_checkpoint(checkpoints / "epoch-003.pt")["epoch"] == 3  # genuine checkpoints read with weights_only
    marker = tmp_path / "marker"
    planted = checkpoints / "epoch-004.pt"  # the newest checkpoint: resume reads it first
    torch.save({"fingerprint": "any", "epoch": 4, "model": Payload(marker)}, planted)

    longer = TrainParams(**{**FAST_TRAIN, "epochs": 5})
    with pytest.raises(ValueError, match=r"epoch-004\.pt: refused to load this checkpoint: .*"
                                         r"\(Unsupported global: GLOBAL exec was not an allowed global by default\)"):
        fit(new_model(dataset), dataset, longer, checkpoints, "tiny-vit")
    assert not marker.exists()
    # Refused, not skipped: nothing was retrained or overwritten.
    assert sorted(p.name for p in checkpoints.glob("epoch-*.pt")) == [f"epoch-00{e}.pt" for e in range(1, 5)]

    torch.load(planted, weights_only=False)  # control: a full unpickle runs the payload
    assert marker.read_text() == "payload ran"


def test_a_checkpoint_that_is_not_a_torch_file_is_named(tmp_path: Path, dataset) -> None:
    (tmp_path / "epoch-001.pt").write_bytes(pickle.dumps({"fingerprint": "x"}))
    with pytest.raises(ValueError, match=r"epoch-001\.pt: (refused to load|not a readable training checkpoint)"):
        fit(new_model(dataset), dataset, TrainParams(**{**FAST_TRAIN, "epochs": 1}), tmp_path, "tiny-vit")


@pytest.mark.parametrize("make_samples", [make_multilabel_samples, make_segmentation_samples],
                         ids=["multilabel", "segmentation"])
def test_checkpoints_of_every_task_type_read_with_weights_only(tmp_path: Path, make_samples) -> None:
    from tasks.dataset import SplitParams, load_dataset, write_dataset

    samples = make_samples()
    write_dataset(samples, DOMAIN, samples.task, tmp_path / "dataset", SplitParams(seed=0))
    data = load_dataset(tmp_path / "dataset")
    result = fit(new_model(data), data, TrainParams(**{**FAST_TRAIN, "epochs": 1}), tmp_path / "ck", "tiny-vit")
    state = read_checkpoint(result.checkpoints[0])
    assert state["history"] == result.history and state["best_epoch"] == 1
    assert {"model", "optimizer", "scheduler", "torch_rng", "best_state"} <= set(state)


# --- registered reference models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """(workdir, experiment id) of a fresh SQLite tracking store for this module."""
    workdir = tmp_path_factory.mktemp("mlflow-safe")
    with mlflow_sandbox() as patch:
        patch.chdir(workdir)
        yield workdir, tracking.ensure_experiment(DOMAIN, workdir)
        while mlflow.active_run() is not None:
            mlflow.end_run()


def log_reference(store, model, metadata: dict) -> str:
    _, experiment_id = store
    with mlflow.start_run(experiment_id=experiment_id):
        return tracking.log_reference_model(model, np.zeros((1, 3, 16, 16), dtype=np.float32), metadata)


def stored_folder(model_uri: str) -> Path:
    """Where the local store keeps a logged model's files (what an attacker with store access edits)."""
    from urllib.parse import urlparse

    model_id = mlflow.models.get_model_info(model_uri).model_id
    return Path(urlparse(mlflow.get_logged_model(model_id).artifact_location).path)


@pytest.fixture(scope="module")
def reference_uri(store, trained_model, model_metadata: dict) -> str:
    return log_reference(store, trained_model, model_metadata)


def test_the_logged_reference_model_holds_safetensors_and_no_pickle(reference_uri: str) -> None:
    folder = stored_folder(reference_uri)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["MLmodel", "artifacts/architecture.json", "artifacts/model.safetensors", "conda.yaml",
                     "input_example.json", "python_env.yaml", "reference_model_pyfunc.py", "requirements.txt",
                     "serving_input_example.json"]
    assert not [f for f in files if Path(f).suffix in PICKLE_SUFFIXES]
    pyfunc = mlflow.models.get_model_info(reference_uri).flavors["python_function"]
    assert "python_model" not in pyfunc  # MLflow's key for a cloudpickled PythonModel
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"


def test_a_registered_reference_model_round_trips_bitwise(reference_uri: str, trained_model, dataset,
                                                          model_metadata: dict) -> None:
    version = tracking.register_version(reference_uri, "safe-reference", {})
    tracking.set_alias("safe-reference", "champion", version)
    uri = "models:/safe-reference@champion"
    flavor, metadata = tracking.model_flavor(uri)
    # Logging adds the model's identity (its digest) and the units it takes (this dataset stores physical values).
    assert metadata.pop("model_digest") and metadata.pop("input_scaling") is None
    assert (flavor, metadata) == ("pytorch", model_metadata)
    images = dataset.splits["test"].images[:]  # a small split, read whole
    expected = predict_logits(trained_model, images)
    np.testing.assert_array_equal(predict_logits(tracking.load_reference_model(uri), images), expected)
    # Still a working MLflow model for serving outside Vitrail (this runs the stored code file: ours).
    np.testing.assert_allclose(mlflow.pyfunc.load_model(uri).predict(images), expected, atol=1e-6)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_payload_planted_in_a_registered_model_is_refused(store, trained_model, model_metadata: dict,
                                                                    tmp_path: Path, writer: str) -> None:
    uri = log_reference(store, trained_model, model_metadata)
    name = f"tampered-{writer.replace('.', '-')}"
    version = tracking.register_version(uri, name, {})
    marker = tmp_path / "marker"
    weights = stored_folder(uri) / "artifacts" / "model.safetensors"
    if writer == "pickle":
        weights.write_bytes(pickle.dumps({"net.head.weight": Payload(marker)}))
    else:
        torch.save({"net.head.weight": Payload(marker)}, weights)

    with pytest.raises(ReferenceModelError, match=r"model\.safetensors: not a safetensors file .*never unpickles"):
        tracking.load_reference_model(f"models:/{name}/{version}")
    assert not marker.exists()

    # control: unpickling the planted bytes runs the payload (from memory: torch.load would dispatch a
    # .safetensors name to safetensors)
    planted = weights.read_bytes()
    pickle.loads(planted) if writer == "pickle" else torch.load(io.BytesIO(planted), weights_only=False)
    assert marker.read_text() == "payload ran"


def test_a_model_registered_with_the_pickle_flavour_is_refused(store, model_metadata: dict, tmp_path: Path) -> None:
    import mlflow.pytorch

    _, experiment_id = store
    marker = tmp_path / "marker"
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.pytorch.log_model(PayloadModule(marker), name="model", serialization_format="pickle",
                                        metadata=model_metadata, pip_requirements=["torch"])
    version = tracking.register_version(info.model_uri, "legacy-pickle", {})
    uri = f"models:/legacy-pickle/{version}"
    assert tracking.model_flavor(uri)[0] == "pytorch"  # metadata still readable: it is YAML, not a pickle

    with pytest.raises(ValueError, match=r"models:/legacy-pickle/1: refused to load: this model was logged with "
                                         r"MLflow's pytorch flavour.*Re-register it"):
        tracking.load_reference_model(uri)
    with pytest.raises(ValueError, match="refused to load"):
        from tasks.prediction import load_model

        load_model(uri)
    assert not marker.exists()

    with contextlib.suppress(Exception):  # control: MLflow's own loader unpickles it and runs the payload
        mlflow.pytorch.load_model(uri)
    assert marker.read_text() == "payload ran"


def test_a_pyfunc_model_of_another_kind_is_not_taken_for_a_reference_model(store, tmp_path: Path) -> None:
    _, experiment_id = store
    code = tmp_path / "constant_model.py"
    code.write_text("import mlflow\nfrom mlflow.pyfunc import PythonModel\n\n\nclass Constant(PythonModel):\n"
                    "    def predict(self, context, model_input, params=None):\n        return model_input\n\n\n"
                    "mlflow.models.set_model(Constant())\n")
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=["mlflow"])
    with pytest.raises(ValueError, match="not a Vitrail reference model"):
        tracking.load_reference_model(info.model_uri)
