"""Preprocessing is part of the model: it takes raw stored pixels (DN, HU, 8-bit), exports them as such, and its
digest covers every preprocessing constant."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_support import make_samples, tiny_backbone

from domains import PredictionRequest, SampleSet, convert_units, get_domain
from tasks.dataset import SplitParams, load_dataset, write_dataset
from tasks.model_inputs import load_dataset_for
from tasks.models import (
    NormalizedClassifier,
    build_backbone,
    fold_scaling,
    load_reference_files,
    model_digest,
    normalizing_model,
    reference_architecture,
    save_reference_model,
)
from tasks.training import predict_logits

# What sources store: Sentinel-2 L2A of processing baseline 04.00 (uint16, reflectance = DN/10000 - 0.1),
# a CT series with the DICOM rescale intercept -1024 (int16, HU = stored - 1024), 8-bit RGB tiles.
SOURCES = {
    "uint16-sentinel2-pb0400": ("uint16", 1e-4, -0.1, lambda p: p),
    "int16-ct-intercept": ("int16", 1.0, -1024.0, lambda p: p * 2000.0 - 1000.0),
    "uint8-rgb": ("uint8", 1 / 255, 0.0, lambda p: p),
}


def stored_samples(kind: str) -> SampleSet:
    """The shared synthetic samples as a source would store them: integers of ``kind``'s dtype and scaling."""
    dtype, scale, offset, physical_of = SOURCES[kind]
    samples = make_samples()
    physical = physical_of(samples.images.astype(np.float64))
    info = np.iinfo(dtype)
    stored = np.clip(np.rint((physical - offset) / scale), info.min, info.max).astype(dtype)
    scaling = tuple((scale, offset) for _ in samples.channels)
    return SampleSet(images=stored, labels=samples.labels, groups=samples.groups, locations=samples.locations,
                     source=f"{kind}-source", channels=samples.channels, class_names=samples.class_names,
                     scaling=scaling)


@pytest.fixture(scope="module", params=sorted(SOURCES))
def stored_dataset(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, SampleSet]:
    samples = stored_samples(request.param)
    out = tmp_path_factory.mktemp(request.param)
    write_dataset(samples, "satellite", "classification", out, SplitParams(seed=0))
    return request.param, out, samples


def raw_model(info, seed: int = 0) -> NormalizedClassifier:
    torch.manual_seed(seed)
    net = build_backbone(tiny_backbone(), info.channels, info.num_classes, info.tile_size, task=info.task)
    return normalizing_model(net, info).eval()


def test_a_model_is_fed_the_stored_numbers_themselves(stored_dataset) -> None:
    kind, path, _ = stored_dataset
    dataset = load_dataset_for(path)  # no model: the dataset's stored units, what a model built for it takes
    test = dataset.splits["test"]
    images = test.images[:]
    assert images.dtype == np.float32 and np.array_equal(images, np.rint(images))
    # The numbers are the stored integers, not physical values: the physical view is their affine image.
    physical = load_dataset(path).splits["test"].images[:]
    np.testing.assert_allclose(convert_units(images, dataset.info.scaling, None), physical, rtol=1e-6, atol=1e-4)
    assert images.max() > 100 and np.dtype(dataset.info.stored_dtype) == np.dtype(SOURCES[kind][0])


def test_raw_in_model_is_the_physical_model_with_its_scaling_folded_in(stored_dataset) -> None:
    _, path, _ = stored_dataset
    raw_view, physical_view = load_dataset_for(path), load_dataset(path)
    info = raw_view.info
    model = raw_model(info)
    assert model.input_scaling == info.scaling
    physical_model = NormalizedClassifier(model.net, info.channel_mean, info.channel_std).eval()
    raw, physical = raw_view.splits["test"].images[:], physical_view.splits["test"].images[:]
    np.testing.assert_allclose(predict_logits(model, raw), predict_logits(physical_model, physical), atol=1e-4)


def test_raw_in_onnx_export_matches_torch_on_raw_integers(stored_dataset, tmp_path: Path) -> None:
    from tasks.compression.export import export_onnx
    from tasks.onnx_runtime import open_session, read_metadata, session_predictor

    kind, path, _ = stored_dataset
    dataset = load_dataset_for(path)
    info = dataset.info
    model = raw_model(info)
    dtype = np.dtype(SOURCES[kind][0])
    # Raw stored integers straight from the source's dtype, extremes included (nodata 0, saturated).
    stored = dataset.splits["test"].images[:].astype(dtype)
    stored[0, :, 0, 0] = np.iinfo(dtype).min
    stored[0, :, 0, 1] = np.iinfo(dtype).max
    raw = stored.astype(np.float32)
    metadata = {"channels": [asdict(c) for c in info.channels], "class_names": list(info.class_names),
                "tile_size": info.tile_size, "domain": info.domain,
                "input_scaling": [list(pair) for pair in info.scaling]}
    onnx_file = export_onnx(model, raw, tmp_path / "raw-in.onnx", metadata)
    assert read_metadata(onnx_file)["input_scaling"] == [list(pair) for pair in info.scaling]
    edge = session_predictor(open_session(onnx_file, 1))(raw)
    reference = predict_logits(model, raw)
    assert np.abs(edge - reference).max() <= 1e-4, f"{kind}: max |ONNX - torch| {np.abs(edge - reference).max():.2e}"


def test_saved_model_keeps_its_units_and_statistics(stored_dataset, tmp_path: Path) -> None:
    _, path, _ = stored_dataset
    dataset = load_dataset_for(path)
    model = raw_model(dataset.info)
    architecture = reference_architecture(model, dataset.info.channels, "classification")
    assert architecture.input_scaling == dataset.info.scaling
    assert architecture.mean == pytest.approx(fold_scaling(dataset.info.channel_mean, dataset.info.channel_std,
                                                           dataset.info.scaling)[0])
    loaded = load_reference_files(*save_reference_model(model, architecture, tmp_path))
    assert loaded.input_scaling == dataset.info.scaling
    assert model_digest(loaded, architecture) == model_digest(model, architecture)
    # A stage reading the dataset for the loaded model gets the model's units: the stored integers.
    images = dataset.splits["test"].images[:8]
    assert np.array_equal(load_dataset_for(path, loaded).splits["test"].images[:8], images)
    np.testing.assert_array_equal(predict_logits(loaded, images), predict_logits(model, images))


def test_a_model_of_another_convention_gets_the_dataset_in_its_own_units(stored_dataset) -> None:
    """A dataset stored with another scaling than the model's (e.g. another processing baseline) is converted."""
    _, path, _ = stored_dataset
    info = load_dataset(path).info
    other = tuple((s / 2, o + 0.5 * s) for s, o in info.scaling)
    model = NormalizedClassifier(torch.nn.Identity(), (0.0,) * 3, (1.0,) * 3, input_scaling=other)
    seen = load_dataset_for(path, model).splits["test"].images[:4]
    physical = load_dataset(path).splits["test"].images[:4]
    np.testing.assert_allclose(convert_units(seen, other, None), physical, rtol=1e-5, atol=1e-3 * info.scaling[0][0])


# --- the model digest covers every preprocessing constant ----------------------------------------------------


def test_changing_any_preprocessing_constant_changes_the_model_digest(stored_dataset) -> None:
    _, path, _ = stored_dataset
    info = load_dataset(path).info
    model = raw_model(info)
    channels = info.channels

    def digest(m) -> str:
        return model_digest(m, reference_architecture(m, channels, "classification"))

    base = digest(model)
    assert digest(raw_model(info)) == base  # deterministic: the same model, the same digest
    changed = []
    for name in ("mean", "std"):
        other = raw_model(info)
        with torch.no_grad():
            getattr(other, name)[0, 1] *= 1.001
        changed.append(digest(other))
    for index in (0, 1):  # one channel's scale, then its offset
        scaling = [list(pair) for pair in info.scaling]
        scaling[2][index] = scaling[2][index] * 1.001 + 1e-6
        other = raw_model(info)
        other.input_scaling = tuple(tuple(pair) for pair in scaling)
        changed.append(digest(other))
    # Built from a dataset whose recorded scale differs: the folded buffers and the units both change.
    rescaled = replace(info, scaling=tuple((s * 2, o) for s, o in info.scaling))
    changed.append(digest(raw_model(rescaled)))
    assert base not in changed and len(set(changed)) == len(changed)


def test_registered_model_records_its_digest_and_units(stored_dataset, tmp_path: Path) -> None:
    import mlflow

    from tasks import tracking
    from mlflow_isolation import mlflow_sandbox

    kind, path, _ = stored_dataset
    if kind != "uint16-sentinel2-pb0400":
        pytest.skip("one registry round trip is enough")
    dataset = load_dataset_for(path)
    info = dataset.info
    model = raw_model(info)
    metadata = {"domain": info.domain, "task": info.task, "channels": [asdict(c) for c in info.channels],
                "class_names": list(info.class_names), "tile_size": info.tile_size}
    images = dataset.splits["test"].images[:4]
    with mlflow_sandbox() as patch:
        patch.chdir(tmp_path)
        tracking.configure_tracking(tmp_path)
        experiment = tracking.ensure_experiment("satellite", tmp_path)
        with mlflow.start_run(experiment_id=experiment) as run:
            uri = tracking.log_reference_model(model, images, metadata)
        _, logged = tracking.model_flavor(uri)
        expected = model_digest(model, reference_architecture(model, info.channels, "classification"))
        assert logged["model_digest"] == expected
        assert mlflow.get_run(run.info.run_id).data.tags["vitrail.model_digest"] == expected
        assert logged["input_scaling"] == [list(pair) for pair in info.scaling]
        from tasks.prediction import load_model

        loaded = load_model(uri, threads=1)
        assert loaded.input_scaling == info.scaling
        np.testing.assert_array_equal(loaded.predict_logits(images), predict_logits(model, images))


# --- predict converts each source to the model's units at read time ------------------------------------------


def test_satellite_predict_feeds_the_scene_in_the_models_units(tmp_path: Path) -> None:
    from domains.satellite.examples import write_example

    scene = write_example(tmp_path / "example")["scene_dir"]
    domain = get_domain("satellite")
    channels = tuple(c for c in domain.default_channels if c.name in ("B04", "B03", "B02"))

    runs = []

    def batches_seen(input_scaling) -> np.ndarray:
        seen = []
        runs.append(input_scaling)

        def infer(batch: np.ndarray) -> np.ndarray:
            seen.append(batch.copy())
            return np.full((len(batch), 3), 1 / 3, dtype=np.float32)

        domain.predict(PredictionRequest(input=scene, output=tmp_path / f"prediction-{len(runs)}.tif",
                                         channels=channels, class_names=("a", "b", "c"), tile_size=12, stride=12,
                                         infer=infer, input_scaling=input_scaling))
        return np.concatenate(seen)

    # A model trained on this product convention (L1C: reflectance = DN / 10000) sees the DN themselves.
    own = batches_seen(((1e-4, 0.0),) * 3)
    assert np.array_equal(own, np.rint(own)) and own.max() > 100
    # A model trained on processing baseline 04.00 (DN / 10000 - 0.1) sees the same reflectance in its own DN.
    baseline_0400 = batches_seen(((1e-4, -0.1),) * 3)
    np.testing.assert_allclose(baseline_0400, own + 1000.0, atol=1e-3)
    # A model of physical units (logged before models recorded theirs) sees reflectance.
    np.testing.assert_allclose(batches_seen(None), own * 1e-4, atol=1e-6)


def test_raw_in_openvino_ir_matches_torch_and_calibrates_on_raw_integers(stored_dataset, tmp_path: Path) -> None:
    openvino_runtime = pytest.importorskip("tasks.openvino_runtime")
    from tasks.compression.export import export_onnx
    from tasks.onnx_runtime import open_predictor, read_any_metadata

    kind, path, _ = stored_dataset
    dataset = load_dataset_for(path)
    info = dataset.info
    model = raw_model(info)
    raw = dataset.splits["test"].images[:]
    metadata = {"channels": [asdict(c) for c in info.channels], "class_names": list(info.class_names),
                "tile_size": info.tile_size, "domain": info.domain,
                "input_scaling": [list(pair) for pair in info.scaling]}
    onnx_file = export_onnx(model, raw, tmp_path / "raw-in.onnx", metadata)
    fp32 = openvino_runtime.convert_onnx(onnx_file, tmp_path / "raw-in-fp32.xml", metadata)
    assert read_any_metadata(fp32)["input_scaling"] == metadata["input_scaling"]
    reference = predict_logits(model, raw)
    edge = open_predictor(fp32)(raw)
    assert np.abs(edge - reference).max() <= 1e-4, f"{kind}: max |OpenVINO - torch| {np.abs(edge - reference).max():.2e}"
    # int8 calibrated on the training split as the compress stage reads it: the same raw units.
    int8 = openvino_runtime.quantize_nncf(onnx_file, dataset.splits["train"].images, tmp_path / "raw-in-int8.xml",
                                          metadata, samples=16)
    quantized = open_predictor(int8)(raw)
    # Measured on the uint16 case: 0.04 calibrated on raw; 0.45 calibrated on physical values (bound 0.17).
    assert np.abs(quantized - reference).max() < 0.25 * np.abs(reference).max()


def test_fine_tuning_trains_and_scores_on_the_raw_units_it_records(tmp_path: Path) -> None:
    """Training, the validation score it reports and a later stage's read of the dataset see one set of units."""
    from tasks.finetune import fit_adapter
    from tasks.models import LoraParams
    from tasks.training import TrainParams

    path = tmp_path / "dataset"
    write_dataset(stored_samples("uint16-sentinel2-pb0400"), "satellite", "classification", path, SplitParams(seed=0))
    train = TrainParams(epochs=3, batch_size=16, learning_rate=5e-3, warmup_epochs=0.0, threads=1)
    outcome = fit_adapter(path, tiny_backbone(), LoraParams(rank=4), train, tmp_path / "ckpt")
    info = load_dataset(path).info
    assert outcome.model.input_scaling == info.scaling
    assert outcome.metadata["input_scaling"] == [list(pair) for pair in info.scaling]
    assert outcome.model.mean.flatten().tolist() == pytest.approx(
        fold_scaling(info.channel_mean, info.channel_std, info.scaling)[0], rel=1e-6)
    val = load_dataset_for(path, outcome.model).splits["val"]
    assert val.images[:].max() > 1000  # the DN themselves
    accuracy = (predict_logits(outcome.model, val.images).argmax(1) == val.labels).mean()
    assert accuracy == pytest.approx(outcome.fit.best_metrics["val_accuracy"]) and accuracy >= 0.8
