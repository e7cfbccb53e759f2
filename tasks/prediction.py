"""The predict stage's work: load a logged or registered model and run it over new inputs."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from domains import Channel, DomainInputError, DomainSpec, PredictionRequest, PredictionSummary, get_domain
from domains.confinement import confined_path
from domains.spec import printable_path
from tasks import tracking
from tasks.onnx_runtime import (open_predictor, open_session, read_any_metadata, read_metadata,
                                 session_bag_predictor, session_predictor)
from tasks.request_errors import RequestError
from tasks.storage import is_url, location_name, parent_location, staged_folder, staged_reference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to infer, with the bands, classes and tile size it was trained on."""

    uri: str
    flavor: str
    predict_logits: Callable[[np.ndarray], np.ndarray]
    channels: tuple[Channel, ...]
    class_names: tuple[str, ...]
    tile_size: int
    domain: str
    task: str = "classification"
    tile_mpp: float | None = None
    """Microns per pixel the training tiles were cut at (whole-slide images); None for other domains."""
    predict_bag: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    """For a slide model: one slide's tiles (T, C, H, W) -> (logits (K,), attention weights (T,))."""
    bags: dict | None = None
    """For a slide model: the bag settings it was trained with (:class:`tasks.bags.BagParams`)."""
    input_contract: dict | None = None
    """What inputs must be (satellite: sensor, level, bands, scaling units, cloud policy), from training."""
    input_scaling: tuple[tuple[float, float], ...] | None = None
    """The raw units the model takes (per channel (scale, offset) to physical; None: physical units)."""

    def bag_probabilities(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A slide model's class probabilities (K,) and attention weights (T,) for one slide's tiles."""
        logits, attention = self.predict_bag(tiles)
        return _softmax(logits[None])[0], attention

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax over classes (per sample or per pixel), or independent sigmoids for multilabel models."""
        logits = self.predict_logits(images)
        if self.task == "multilabel":
            return 1.0 / (1.0 + np.exp(-logits))
        return _softmax(logits)


@dataclass
class PredictionBatch:
    """Outputs written and inputs that failed (with the reason), so one bad scene loses nothing else."""

    written: list[PredictionSummary] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def load_model(model_uri: str, threads: int = 2) -> LoadedModel:
    """Load an ONNX (edge) or torch (reference) model from any MLflow model URI.

    An alias (``models:/<name>@champion``) is pinned to its version once, after checking that its
    reference/edge twin holds the alias too; a half-applied promotion is refused (HalfPromotionError).
    """
    from tasks.promotion import pinned_model_uri

    source_uri = pinned_model_uri(model_uri)
    flavor, metadata = tracking.model_flavor(source_uri)
    if flavor == "openvino":  # an edge model whose runtime is OpenVINO: its IR is compiled here, offline
        folder = tracking.download_model(source_uri, Path(tempfile.mkdtemp(prefix="vitrail-model-")))
        ir_file = next(folder.rglob("*.xml"), None)
        if ir_file is None:
            raise FileNotFoundError(f"{model_uri}: no OpenVINO .xml file in the model's artifacts")
        metadata = read_any_metadata(ir_file)
        predict, predict_bag = open_predictor(ir_file, threads), None
    elif flavor == "onnx":
        folder = tracking.download_model(source_uri, Path(tempfile.mkdtemp(prefix="vitrail-model-")))
        onnx_file = next(folder.rglob("*.onnx"), None)
        if onnx_file is None:
            raise FileNotFoundError(f"{model_uri}: no .onnx file in the model's artifacts")
        metadata = read_metadata(onnx_file)
        session = open_session(onnx_file, threads)
        predict = session_predictor(session)
        predict_bag = session_bag_predictor(session) if metadata.get("bags") else None
    else:
        import torch

        from tasks.models import BagOutputs

        torch.set_num_threads(threads)
        model = tracking.load_reference_model(source_uri).eval()

        def predict(images: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(images)).numpy()

        def predict_bag(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.inference_mode():
                logits, attention = BagOutputs(model)(torch.from_numpy(np.ascontiguousarray(tiles[None])))
            return logits[0].numpy(), attention[0].numpy()

        if not metadata.get("bags"):
            predict_bag = None
        # The units the weights were trained on, from the model itself (architecture.json), not its metadata.
        metadata = {**metadata, "input_scaling": getattr(model, "input_scaling", None)}

    input_scaling = _scaling(metadata.get("input_scaling"))
    normalisation = metadata.get("input_normalisation")
    if normalisation:  # what the model was trained on: normalise every tile before it sees one
        predict, predict_bag = _normalising(predict, predict_bag, str(metadata.get("domain")), normalisation,
                                            input_scaling)
    missing = {"channels", "class_names", "tile_size", "domain"} - set(metadata)
    if missing:
        raise RequestError(f"{model_uri}: model metadata lacks {sorted(missing)}; was it logged by Vitrail?")
    return LoadedModel(uri=model_uri, flavor=flavor, predict_logits=predict,
                       channels=tuple(Channel(**c) for c in metadata["channels"]),
                       class_names=tuple(metadata["class_names"]), tile_size=int(metadata["tile_size"]),
                       domain=str(metadata["domain"]), task=str(metadata.get("task", "classification")),
                       tile_mpp=float(metadata["tile_mpp"]) if metadata.get("tile_mpp") else None,
                       predict_bag=predict_bag, bags=metadata.get("bags"),
                       input_contract=metadata.get("input_contract"), input_scaling=input_scaling)


def _scaling(value) -> tuple[tuple[float, float], ...] | None:
    """A recorded ``input_scaling`` (lists from JSON metadata, or tuples) as tuples; None stays None."""
    return tuple((float(s), float(o)) for s, o in value) if value else None


def _normalising(predict, predict_bag, domain: str, normalisation: dict, scaling=None):
    """The predictors with the model's input normalisation applied to their tiles (in ``scaling`` units) first.

    The one preprocessing step that stays outside the model's graph (stain normalisation fits a per-tile
    stain matrix by an eigendecomposition, which ONNX cannot express); it is recorded with the model and
    applied here exactly as training applied it (:mod:`tasks.model_inputs`).
    """
    from tasks.model_inputs import apply_normalisation

    def normalised_predict(images: np.ndarray) -> np.ndarray:
        return predict(apply_normalisation(domain, normalisation, images, scaling))

    def normalised_bag(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return predict_bag(apply_normalisation(domain, normalisation, tiles, scaling))

    return normalised_predict, (normalised_bag if predict_bag is not None else None)


def predict_inputs(domain_name: str, model_uri: str, input_path: Path, output: Path | str, stride: int | None = None,
                   threads: int = 2, mpp: float | None = None, screen_ppmm: float | None = None) -> PredictionBatch:
    """Predict one input or every input of a drop folder.

    ``output`` is a file when ``input_path`` is a single input, else a folder that receives
    ``<input name><suffix>`` per input (the domain's prediction suffix: ``.tif`` rasters, ``.json``
    study reports; names made safe by :func:`prediction_target`). An input that fails, for any reason, is
    recorded with its error and skipped; the others are still predicted. ``mpp`` is the inputs' resolution
    in microns per pixel for whole-slide images whose metadata states none; ``screen_ppmm`` turns on the
    hyperspectral screening cascade (see :attr:`domains.spec.PredictionRequest.screen_ppmm`).

    ``output`` may be a URL (``s3://bucket/prefix/predictions``): the domain's writers (GDAL among them)
    need real files, so predictions are written to a local staging folder and uploaded, each file whole,
    once every input is done; the receipt names the URLs.
    """
    domain = get_domain(domain_name)
    refuse_unscreenable(domain, screen_ppmm)
    model = load_model(model_uri, threads)
    if model.domain != domain.name:
        raise RequestError(f"{model_uri}: model was trained for domain {model.domain!r}, not {domain.name!r}")
    if screen_ppmm is not None:
        try:  # a model the cascade cannot serve is refused once, before any input is read
            domain.screening_channel(model.channels)
        except ValueError as error:
            raise RequestError(f"{model_uri}: {error}") from error
    inputs = domain.list_prediction_inputs(Path(input_path))
    single = len(inputs) == 1 and Path(input_path) == inputs[0]
    if not is_url(output):
        return _predict_each(domain, model, inputs, single, Path(output), stride, mpp, screen_ppmm)
    parent = parent_location(output)
    with staged_folder(parent) as staging:
        batch = _predict_each(domain, model, inputs, single, staging / location_name(output), stride, mpp,
                              screen_ppmm)
        batch.written = [replace(summary, output=staged_reference(Path(summary.output), staging, parent))
                         for summary in batch.written]
    return batch


def refuse_unscreenable(domain: DomainSpec, screen_ppmm: float | None) -> None:
    """Raise RequestError when ``screen_ppmm`` is asked of a domain whose predict cannot screen tiles."""
    if screen_ppmm is not None and domain.screening_channel is None:
        raise RequestError(f"screen_ppmm screens methane plume candidates: hyperspectral models only, not {domain.name}")


def _predict_each(domain: DomainSpec, model: LoadedModel, inputs: list[Path], single: bool, output: Path,
                  stride: int | None, mpp: float | None = None, screen_ppmm: float | None = None) -> PredictionBatch:
    batch = PredictionBatch()
    for item in inputs:
        try:
            target = output if single and output.suffix else prediction_target(domain, item, output)
            target.parent.mkdir(parents=True, exist_ok=True)
            request = PredictionRequest(input=item, output=target, channels=model.channels,
                                        class_names=model.class_names, tile_size=model.tile_size,
                                        stride=stride or model.tile_size, infer=model.probabilities, task=model.task,
                                        mpp=mpp, tile_mpp=model.tile_mpp,
                                        infer_bag=model.bag_probabilities if model.predict_bag else None,
                                        bag_max_tiles=int((model.bags or {}).get("predict_max_tiles", 1024)),
                                        input_contract=model.input_contract,
                                        input_scaling=model.input_scaling, screen_ppmm=screen_ppmm)
            batch.written.append(domain.predict(request))
        except DomainInputError as error:
            log.error("skipping %s: %s", printable_path(item), error)
            batch.failed[printable_path(item)] = str(error)
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - one input's failure must not cost the others
            # Not a known input problem: keep the traceback for whoever fixes it, and go on with the rest.
            log.error("skipping %s: unexpected %s: %s", printable_path(item), type(error).__name__, error,
                      exc_info=True)
            batch.failed[printable_path(item)] = f"{printable_path(item)}: unexpected {type(error).__name__}: {error}"
    return batch


def prediction_target(domain: DomainSpec, item: Path, output: Path) -> Path:
    """Where the prediction of one input of a drop folder goes: ``<output>/<safe name><suffix>``.

    The name comes from the domain (a pseudonym for radiology) or the input's file name; either way it
    is made one harmless file name and checked to stay inside ``output`` (input names are data).
    """
    name = domain.name_prediction(item) if domain.name_prediction else (
        item.name.removesuffix(".gz").removesuffix(".nii") if item.name.endswith((".nii", ".nii.gz"))
        else item.stem if item.is_file() or item.is_symlink() else item.name)
    return confined_path(output, name, domain.prediction_suffix)


predict_inputs_task = task(predict_inputs, name="predict-inputs", cache_policy=NONE)
