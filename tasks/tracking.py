"""Everything that talks to MLflow: tracking URI, stage runs, dataset lineage, models and the registry.

No other module imports mlflow, except :mod:`tasks.reference_model_pyfunc`, the file MLflow itself
runs to serve a reference model. Tracking goes to ``MLFLOW_TRACKING_URI`` when it is set (a team's
MLflow server), else to a SQLite file in the work folder with artifacts beside it.

A work folder on object storage (``s3://bucket/prefix``) needs ``MLFLOW_TRACKING_URI``: SQLite needs
a real local file with working locks, which an object store cannot provide, and a database kept in a
local cache instead would hide the runs from every other worker that shares the work folder, which is
the reason to put it on object storage. So that combination is refused with what to set; with a server,
artifacts go where the server's experiment says (``--artifacts-destination s3://...`` for instance).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# Prefect first: ``import mlflow.pytorch`` calls logging.basicConfig, which would otherwise flatten
# Prefect's log format (see ENVIRONMENT.md).
import prefect
from prefect.cache_policies import NONE

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from tasks.dataset import DatasetInfo  # noqa: E402
from tasks.request_errors import RequestError  # noqa: E402
from tasks.storage import as_location, is_url  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_REQUIREMENTS = ["torch", "timm", "onnxruntime", "numpy"]


@dataclass(frozen=True)
class StageRun:
    """An open MLflow run of one pipeline stage, with a scratch folder for its artifacts."""

    run_id: str
    experiment_id: str
    artifact_dir: Path


# mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; remember what we exported so that a later
# workdir is not mistaken for a team server the user configured.
_EXPORTED_URIS: set[str] = set()


def user_tracking_uri() -> str | None:
    """The tracking URI the user (not Vitrail) set in the environment, if any."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri and uri not in _EXPORTED_URIS else None


def resolve_tracking_uri(workdir: Path | str) -> str:
    """``MLFLOW_TRACKING_URI`` when the user set it, else ``sqlite:///<workdir>/mlflow.db`` (local workdir only).

    Raises:
        RequestError: the work folder is a URL and no tracking server is set (see the module docstring).
    """
    user = user_tracking_uri()
    if user:
        return user
    if is_url(workdir):
        raise RequestError(
            f"{as_location(workdir)}: a work folder on object storage needs an MLflow tracking server: set "
            "MLFLOW_TRACKING_URI (e.g. http://mlflow:5000, whose artifacts may live on the same object store); "
            "the default SQLite store is a local file and cannot live there, or use a local work folder")
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def configure_tracking(workdir: Path | str) -> str:
    """Point MLflow (tracking and registry) at the resolved URI and return it."""
    uri = resolve_tracking_uri(workdir)
    if not is_url(workdir):
        Path(workdir).mkdir(parents=True, exist_ok=True)
    if user_tracking_uri() is None:
        _EXPORTED_URIS.add(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(domain: str, workdir: Path | str) -> str:
    """Experiment per domain; with the local SQLite default, artifacts live in ``<workdir>/mlartifacts``."""
    configure_tracking(workdir)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(domain)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if user_tracking_uri() is None:
        location = (Path(workdir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(domain, artifact_location=location)


def git_commit() -> str:
    """The project's git commit, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _prefect_run_tags() -> dict[str, str]:
    from prefect.runtime import flow_run

    return {"vitrail.prefect_flow_run_id": str(flow_run.id or "none"),
            "vitrail.prefect_flow_run_name": str(flow_run.name or "none")}


def _flatten(prefix: str, value: object, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


@contextmanager
def stage_run(domain: str, stage: str, workdir: Path | str, params: dict | None = None,
              dataset: DatasetInfo | None = None, dataset_path: Path | str | None = None,
              extra_tags: dict[str, str] | None = None) -> Iterator[StageRun]:
    """Open a run for ``stage`` tagged with dataset digest, git commit and Prefect flow-run id.

    Every run also carries what decides its numbers (``vitrail.repro.*`` tags: seed, threads,
    deterministic kernels, device, CPU, Python and library versions; see :mod:`tasks.reproducibility`).
    They are set when the run opens and again when it closes, so settings the stage pinned while it
    ran (its seed and thread count) are the ones recorded.
    """
    from tasks.reproducibility import environment_record

    experiment_id = ensure_experiment(domain, workdir)
    tags = {"vitrail.stage": stage, "vitrail.domain": domain, "vitrail.git_commit": git_commit(),
            **environment_record().as_tags(), **_prefect_run_tags(), **(extra_tags or {})}
    if dataset is not None:
        tags["vitrail.dataset_digest"] = dataset.digest
        tags["vitrail.task"] = dataset.task
        # What the dataset was built from (the scenes, studies or slides), for `vitrail lineage`.
        tags["vitrail.dataset_sources"] = json.dumps(list(dataset.sources))[:5000]
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{domain}-{stage}", tags=tags) as run, \
            tempfile.TemporaryDirectory(prefix=f"vitrail-{stage}-") as scratch:
        if params:
            flat: dict[str, str] = {}
            _flatten("", params, flat)
            mlflow.log_params({k: v[:6000] for k, v in flat.items()})
        if dataset is not None:
            log_dataset_input(dataset, dataset_path, context="training" if stage == "finetune" else stage)
        yield StageRun(run_id=run.info.run_id, experiment_id=experiment_id, artifact_dir=Path(scratch))
        mlflow.set_tags(environment_record().as_tags())
        mlflow.log_artifacts(scratch)


def log_dataset_input(dataset: DatasetInfo, path: Path | str | None, context: str) -> None:
    """Record the dataset (by digest) as an input of the active run: the lineage of every model."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        # A local path matches two equivalent "local artifact" source types; either is right.
        warnings.simplefilter("ignore", UserWarning)
        if path and is_url(path):
            where = as_location(path)
        else:
            where = str(Path(path).resolve()) if path else dataset.sources[0]
        source = resolve_dataset_source(where)
    meta = MetaDataset(source=source, name=f"{dataset.domain}-{dataset.digest[:12]}", digest=dataset.digest[:36])
    mlflow.log_input(meta, context=context)


def log_metrics(metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
    """Log numeric metrics to the active run (or ``run_id``)."""
    clean = {k: float(v) for k, v in metrics.items()}
    if run_id is None:
        mlflow.log_metrics(clean, step=step)
    else:
        client = MlflowClient()
        for key, value in clean.items():
            client.log_metric(run_id, key, value, step=step or 0)


def set_tags(tags: dict[str, str], run_id: str | None = None) -> None:
    if run_id is None:
        mlflow.set_tags(tags)
    else:
        for key, value in tags.items():
            MlflowClient().set_tag(run_id, key, value)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


# The models-from-code file MLflow copies into each reference model (see its docstring); the weights
# and architecture travel as the pyfunc's artifacts, at these paths inside the model.
REFERENCE_MODEL_CODE = Path(__file__).with_name("reference_model_pyfunc.py")
REFERENCE_ARTIFACTS = {"weights": "artifacts/model.safetensors", "architecture": "artifacts/architecture.json"}


def log_reference_model(model, input_example, metadata: dict) -> str:
    """Log the merged torch model as safetensors weights plus ``architecture.json``; return its URI.

    The model is an MLflow pyfunc model from code (no pickled object anywhere in it), so the
    registry, aliases, metadata and ``mlflow models serve`` work as for any MLflow model, and
    :func:`load_reference_model` rebuilds it without unpickling anything.
    """
    import mlflow.pyfunc

    from domains import Channel
    from tasks.models import model_digest, reference_architecture, save_reference_model

    channels = tuple(Channel(**c) for c in metadata["channels"])
    architecture = reference_architecture(model, channels, metadata.get("task", "classification"))
    # The model's identity covers its preprocessing (raw-unit mean/std buffers, input scaling): see model_digest.
    digest = model_digest(model, architecture)
    metadata = {**metadata, "model_digest": digest, "input_scaling": _as_lists(architecture.input_scaling)}
    if mlflow.active_run() is not None:
        mlflow.set_tag("vitrail.model_digest", digest)
    with tempfile.TemporaryDirectory(prefix="vitrail-reference-") as scratch:
        weights, description = save_reference_model(model, architecture, Path(scratch))
        info = mlflow.pyfunc.log_model(name="model", python_model=str(REFERENCE_MODEL_CODE),
                                       artifacts={"weights": str(weights), "architecture": str(description)},
                                       input_example=input_example, metadata=metadata,
                                       pip_requirements=[*MODEL_REQUIREMENTS, "safetensors"])
    return info.model_uri


def _as_lists(scaling) -> list[list[float]] | None:
    return [[float(a), float(b)] for a, b in scaling] if scaling is not None else None


OPENVINO_EDGE_CODE = Path(__file__).with_name("openvino_pyfunc.py")


def log_edge_model(onnx_path: Path, metadata: dict, input_example) -> str:
    """Log the edge artifact as an MLflow model; return its URI.

    An ONNX file is logged with MLflow's onnx flavour; an OpenVINO IR (.xml + .bin) as a pyfunc model from
    code whose metadata says ``runtime: openvino`` (see :mod:`tasks.openvino_pyfunc`).
    """
    import mlflow.onnx
    import onnx

    if Path(onnx_path).suffix == ".xml":
        import mlflow.pyfunc

        info = mlflow.pyfunc.log_model(name="edge_model", python_model=str(OPENVINO_EDGE_CODE),
                                       artifacts={"model": str(onnx_path),
                                                  "weights": str(Path(onnx_path).with_suffix(".bin"))},
                                       metadata={**metadata, "runtime": "openvino"},
                                       pip_requirements=[*MODEL_REQUIREMENTS, "openvino"])
        return info.model_uri

    info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="edge_model", metadata=metadata,
                                 input_example=input_example, save_as_external_data=False,
                                 pip_requirements=MODEL_REQUIREMENTS)
    return info.model_uri


def load_reference_model(model_uri: str):
    """Load a torch model logged by :func:`log_reference_model`, never unpickling anything.

    The model is rebuilt by this checkout's code from the validated ``architecture.json`` and its
    tensors are read from ``model.safetensors`` with every name and shape checked; the code file
    stored with the model is not run. Models logged with MLflow's pytorch (pickle) flavour are
    refused, since unpickling them would run whatever code they carry.
    """
    from tasks.models import load_reference_files

    info = _model_info(model_uri)
    pyfunc = info.flavors.get("python_function", {})
    recorded = {name: entry.get("path") for name, entry in (pyfunc.get("artifacts") or {}).items()}
    if recorded != REFERENCE_ARTIFACTS:
        if "pytorch" in info.flavors:
            raise RequestError(
                f"{model_uri}: refused to load: this model was logged with MLflow's pytorch flavour, which stores "
                "the model as a pickle, and unpickling a file runs any code it carries. Vitrail loads reference "
                "models only from safetensors weights plus architecture.json. Re-register it: rerun the finetune "
                "stage, or, only if you trust where the model came from, load it once with "
                "mlflow.pytorch.load_model and log it again with tasks.tracking.log_reference_model")
        raise RequestError(f"{model_uri}: not a Vitrail reference model (expected safetensors weights and "
                         f"architecture.json at {sorted(REFERENCE_ARTIFACTS.values())}, found {recorded or 'none'})")
    with tempfile.TemporaryDirectory(prefix="vitrail-reference-") as scratch:
        folder = download_model(model_uri, Path(scratch))
        return load_reference_files(folder / REFERENCE_ARTIFACTS["weights"], folder / REFERENCE_ARTIFACTS["architecture"])


def _model_info(model_uri: str):
    """MLflow's description of a logged or registered model (its MLmodel file), with clear errors."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    try:
        return get_model_info(model_uri)
    except MlflowException as error:
        if "@" in model_uri and "alias" in str(error).lower():
            raise RequestError(f"{model_uri}: no model version holds this alias yet (no candidate has passed the "
                             "promotion gate); promote one first, or pass the model URI to use") from error
        raise RequestError(f"{model_uri}: cannot load this model ({error})") from error


def model_flavor(model_uri: str) -> tuple[str, dict]:
    """Return ('onnx' | 'openvino' | 'pytorch', metadata) of a logged or registered model.

    'pytorch' is any reference (torch) model; :func:`load_reference_model` decides whether it is safe to load.
    'openvino' is an edge model logged as an OpenVINO IR (:func:`log_edge_model`).
    """
    info = _model_info(model_uri)
    flavor = ("onnx" if "onnx" in info.flavors else
              "openvino" if (info.metadata or {}).get("runtime") == "openvino" else "pytorch")
    return flavor, dict(info.metadata or {})


def download_model(model_uri: str, destination: Path) -> Path:
    """Download a model's files (any URI MLflow understands) and return the local folder."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(destination)))


def read_run(run_id: str) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of a run."""
    run = MlflowClient().get_run(run_id)
    return dict(run.data.metrics), dict(run.data.tags)


def run_record(run_id: str) -> dict:
    """What a run recorded, for lineage: name, times, status, params, metrics, tags and dataset inputs.

    Raises:
        RequestError: no such run in the tracking store.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as error:
        raise RequestError(f"run {run_id}: not found in the tracking store ({error.message})") from error
    datasets = [{"name": d.dataset.name, "digest": d.dataset.digest, "source_type": d.dataset.source_type,
                 "source": d.dataset.source, "context": next((t.value for t in d.tags if t.key == "mlflow.data.context"),
                                                              None)}
                for d in (run.inputs.dataset_inputs if run.inputs else [])]
    return {"run_id": run_id, "run_name": run.info.run_name, "status": run.info.status,
            "start_time_ms": run.info.start_time, "experiment_id": run.info.experiment_id,
            "params": dict(run.data.params), "metrics": dict(run.data.metrics), "tags": dict(run.data.tags),
            "datasets": datasets}


def logged_model_run_id(model_uri: str) -> str | None:
    """The run that logged ``models:/m-<id>`` (MLflow 3's logged models), ``runs:/<id>/...``'s run; else None."""
    from mlflow.exceptions import MlflowException

    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/", 1)[0]
    if model_uri.startswith("models:/m-"):
        try:
            return MlflowClient().get_logged_model(model_uri.removeprefix("models:/").split("/", 1)[0]).source_run_id
        except MlflowException:
            return None
    return None


def read_json_artifact(run_id: str, path: str) -> dict:
    """Load a JSON artifact of a run."""
    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=scratch)
        return json.loads(Path(local).read_text())


def register_version(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register ``model_uri`` as a new version of ``name``; return the version number."""
    version = mlflow.register_model(model_uri, name, tags=tags)
    return str(version.version)


def register_artifact_folder(artifact_path: str, name: str, tags: dict[str, str]) -> str:
    """Register a folder of the active run's artifacts (not an MLflow model: a pretrained encoder's
    safetensors and description) as a new version of ``name``; return the version number.

    ``mlflow.register_model`` accepts only logged models, so the version is created from the folder's URI.
    """
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run = mlflow.active_run()
    version = client.create_model_version(name, source=mlflow.get_artifact_uri(artifact_path),
                                          run_id=run.info.run_id if run else None, tags=tags)
    return str(version.version)


def alias_holder(name: str, alias: str) -> tuple[str, dict[str, str]] | None:
    """(version, tags) of the version of ``name`` holding ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return str(version.version), dict(version.tags)


def model_versions(name: str) -> dict[str, dict[str, str]]:
    """Every version of registered model ``name`` with its tags ({} when the model does not exist)."""
    return {str(v.version): dict(v.tags) for v in MlflowClient().search_model_versions(f"name='{name}'")}


def model_version(name: str, version: str):
    """MLflow's record of one registered version (source, run id, tags, aliases), with a clear error."""
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version(name, version)
    except MlflowException as error:
        raise RequestError(f"models:/{name}/{version}: no such registered model version ({error.message})") from error


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)


def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def download_run_artifacts(run_id: str, artifact_path: str, destination: Path) -> Path:
    """Download a run's artifact folder and return the local path."""
    destination.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=str(destination)))


def logged_model_metadata(model_uri: str) -> dict:
    """The Vitrail metadata (bands, classes, tile size, lineage) stored with a logged model."""
    return model_flavor(model_uri)[1]


load_reference_model_task = prefect.task(load_reference_model, name="load-reference-model", cache_policy=NONE)
logged_model_metadata_task = prefect.task(logged_model_metadata, name="logged-model-metadata", cache_policy=NONE)
