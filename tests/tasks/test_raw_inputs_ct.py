"""CT models take Hounsfield units: the dataset stores int16 HU, the CT windows are the model's first layer, and
the registered model, its ONNX and OpenVINO exports and radiology predict all take HU (issue 12)."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_support import tiny_backbone

from domains import Channel, IngestRequest, PredictionRequest, apply_windows, get_domain
from domains.radiology.examples import write_ct_cohort, write_example
from domains.radiology.intensity import CT_WINDOWS
from tasks.dataset import SplitParams, load_dataset, write_dataset
from tasks.model_inputs import load_dataset_for
from tasks.models import (
    WindowLayer,
    build_backbone,
    load_reference_files,
    model_digest,
    network_channels,
    normalizing_model,
    reference_architecture,
    save_reference_model,
)
from tasks.training import predict_logits

WINDOWS = ("lung", "mediastinum", "bone")
HU_EXTREMES = (-1024, 3071)  # air, and the top of the usual 12-bit CT range


@pytest.fixture(scope="module")
def ct_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_ct_cohort(tmp_path_factory.mktemp("ct-cohort"))


@pytest.fixture(scope="module")
def ct_dataset(ct_cohort: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CT cohort ingested with three CT windows as channels."""
    out = tmp_path_factory.mktemp("ct-hu") / "dataset"
    samples = get_domain("radiology").read_samples(IngestRequest(source=ct_cohort["source"], labels=ct_cohort["labels"],
                                                                 tile_size=16, channels=WINDOWS, batch_samples=4))
    write_dataset(samples, "radiology", "multilabel", out, SplitParams(val_fraction=0.0, seed=0))
    return out


def hu_model(info, seed: int = 0):
    torch.manual_seed(seed)
    net = build_backbone(tiny_backbone(), network_channels(info), info.num_classes, info.tile_size, task=info.task)
    return normalizing_model(net, info).eval()


def hu_with_extremes(dataset) -> np.ndarray:
    """Test-split HU as the int16 the dataset stores, with air and the CT maximum planted."""
    stored = dataset.splits["test"].images[:].astype(np.int16)
    stored[0, 0, 0, :2] = HU_EXTREMES
    stored[-1, 0, -1, -2:] = HU_EXTREMES[::-1]
    return stored.astype(np.float32)


def test_ct_dataset_stores_one_int16_hu_channel_and_records_the_windows(ct_dataset: Path) -> None:
    info = load_dataset(ct_dataset).info
    assert info.stored_dtype == "int16" and info.scaling == ((1.0, 0.0),)
    assert [c.name for c in info.channels] == ["hu"]
    assert [(w.name, w.source, w.low, w.high) for w in info.windows] == [
        (name, 0, CT_WINDOWS[name].level - CT_WINDOWS[name].width / 2,
         CT_WINDOWS[name].level + CT_WINDOWS[name].width / 2) for name in WINDOWS]
    assert [c.name for c in info.model_channels] == list(WINDOWS)
    assert info.provenance["modalities"] == "CT" and sum(info.split_counts.values()) == 4 * 3 + 3  # DICOM + NIfTI
    assert 0.0 < float(info.provenance["hu_rounding_max_error"]) <= 0.5
    hu = load_dataset_for(ct_dataset).splits["train"].images[:]
    assert np.array_equal(hu, np.rint(hu)) and hu.min() <= -1000 and hu.max() > 100  # HU, not [0, 1] views
    # The statistics are of what the network sees: the windowed channels of the training split.
    windowed = apply_windows(hu, info.windows)
    np.testing.assert_allclose(info.channel_mean, windowed.mean(axis=(0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(info.channel_std, windowed.std(axis=(0, 2, 3)), atol=1e-5)


def test_window_layer_is_the_window_of_each_channel() -> None:
    from domains import WindowChannel

    windows = tuple(WindowChannel(name=n, source=0, low=CT_WINDOWS[n].level - CT_WINDOWS[n].width / 2,
                                  high=CT_WINDOWS[n].level + CT_WINDOWS[n].width / 2) for n in WINDOWS)
    hu = np.array([-2000, -1024, -600, 0, 50, 400, 1300, 3071], dtype=np.float32).reshape(1, 1, 2, 4)
    out = WindowLayer(windows)(torch.from_numpy(hu)).numpy()
    for k, name in enumerate(WINDOWS):
        np.testing.assert_allclose(out[0, k], CT_WINDOWS[name].apply(hu[0, 0]), atol=1e-6)
    np.testing.assert_allclose(out, apply_windows(hu, windows), atol=1e-6)


def test_hu_in_onnx_and_openvino_match_torch_on_raw_hu(ct_dataset: Path, tmp_path: Path) -> None:
    from tasks.compression.export import export_onnx
    from tasks.onnx_runtime import open_session, read_metadata, session_predictor

    dataset = load_dataset_for(ct_dataset)
    info = dataset.info
    model = hu_model(info)
    raw = hu_with_extremes(dataset)
    metadata = {"channels": [asdict(c) for c in info.channels], "class_names": list(info.class_names),
                "tile_size": info.tile_size, "domain": info.domain,
                "input_scaling": [list(pair) for pair in info.scaling]}
    onnx_file = export_onnx(model, raw, tmp_path / "hu-in.onnx", metadata)
    assert read_metadata(onnx_file)["input_scaling"] == [[1.0, 0.0]]
    import onnx

    ops = {node.op_type for node in onnx.load(str(onnx_file)).graph.node}
    assert {"Gather", "Clip"} <= ops  # the windows are in the graph as plain arithmetic and a clip
    reference = predict_logits(model, raw)
    edge = session_predictor(open_session(onnx_file, 1))(raw)
    gap = float(np.abs(edge - reference).max())
    print(f"max |ONNX - torch| on raw HU: {gap:.2e}")
    assert gap <= 1e-4
    openvino_runtime = pytest.importorskip("tasks.openvino_runtime")
    from tasks.onnx_runtime import open_predictor

    fp32 = openvino_runtime.convert_onnx(onnx_file, tmp_path / "hu-in-fp32.xml", metadata)
    gap = float(np.abs(open_predictor(fp32)(raw) - reference).max())
    print(f"max |OpenVINO fp32 - torch| on raw HU: {gap:.2e}")
    assert gap <= 1e-4


def test_reference_model_rebuilds_its_windows_and_the_digest_covers_them(ct_dataset: Path, tmp_path: Path) -> None:
    dataset = load_dataset_for(ct_dataset)
    info = dataset.info
    model = hu_model(info)
    architecture = reference_architecture(model, info.channels, info.task)
    assert architecture.windows == info.windows and architecture.input_scaling == ((1.0, 0.0),)
    loaded = load_reference_files(*save_reference_model(model, architecture, tmp_path / "reference"))
    raw = hu_with_extremes(dataset)
    np.testing.assert_array_equal(predict_logits(loaded, raw), predict_logits(model, raw))
    base = model_digest(model, architecture)
    assert model_digest(loaded, architecture) == base
    # One window constant changed, in the weights (the layer's buffer) or in the recorded windows.
    other = hu_model(info)
    with torch.no_grad():
        other.window.low[0, 1] += 1.0
    changed = model_digest(other, reference_architecture(other, info.channels, info.task))
    moved = replace(info, windows=(info.windows[0], replace(info.windows[1], high=info.windows[1].high + 1.0),
                                   info.windows[2]))
    rebuilt = hu_model(moved)
    rebuilt_digest = model_digest(rebuilt, reference_architecture(rebuilt, info.channels, info.task))
    assert len({base, changed, rebuilt_digest}) == 3


def test_radiology_predict_hands_the_model_hu_from_the_reader(ct_dataset: Path, ct_cohort, tmp_path: Path) -> None:
    """Predict reads a study through the ingest path and hands the model the stored units: int16-valued HU."""
    dataset = load_dataset_for(ct_dataset)
    info = dataset.info
    model = hu_model(info)
    seen = []

    def infer(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return torch.sigmoid(torch.from_numpy(predict_logits(model, batch))).numpy()

    summary = get_domain("radiology").predict(PredictionRequest(
        input=ct_cohort["source"], output=tmp_path / "report.json", channels=info.channels,
        class_names=info.class_names, tile_size=info.tile_size, stride=info.tile_size, infer=infer,
        task=info.task, input_scaling=info.scaling))
    hu = np.concatenate(seen)
    assert summary.samples == len(hu) and hu.shape[1] == 1
    assert np.array_equal(hu, np.rint(hu)) and hu.min() <= -1000 and hu.max() > 100
    # The same slices as the dataset stores (ingest and predict share the reader): every stored slice is seen.
    stored = load_dataset_for(ct_dataset).splits
    everything = np.concatenate([split.images[:] for split in stored.values() if len(split)])
    assert {a.tobytes() for a in everything} <= {a.tobytes() for a in hu}
    # MR and radiographs have no HU: a study mixing them keeps only its CT series (quarantined as before).
    example = write_example(tmp_path / "example", seed=0)
    seen.clear()
    summary = get_domain("radiology").predict(PredictionRequest(
        input=example["source"], output=tmp_path / "mixed.json", channels=(Channel("hu"),),
        class_names=info.class_names, tile_size=info.tile_size, stride=info.tile_size, infer=infer,
        task=info.task, input_scaling=info.scaling))
    assert summary.samples == 6 and np.concatenate(seen).min() <= -1000  # 3 DICOM CT + 3 NIfTI CT slices


def test_a_distilled_student_takes_hu_through_the_teachers_windows(ct_dataset: Path) -> None:
    from tasks.compression.distill import DistillParams, build_student

    dataset = load_dataset_for(ct_dataset)
    teacher = hu_model(dataset.info)
    student = build_student(teacher, DistillParams(enabled=True, student_depth=1), dataset).eval()
    assert student.window.windows == teacher.window.windows and student.input_scaling == teacher.input_scaling
    for name in ("source", "low", "width"):
        assert torch.equal(getattr(student.window, name), getattr(teacher.window, name))
    assert torch.equal(student.mean, teacher.mean) and torch.equal(student.std, teacher.std)
    assert predict_logits(student, hu_with_extremes(dataset)).shape == (len(dataset.splits["test"]), 3)


def test_pretraining_and_probing_refuse_a_ct_window_dataset_by_name(ct_dataset: Path, tmp_path: Path) -> None:
    from tasks.model_inputs import require_unwindowed
    from tasks.request_errors import RequestError

    with pytest.raises(RequestError, match="CT windows yet \\(lung, mediastinum, bone"):
        require_unwindowed(load_dataset(ct_dataset).info, "MAE pretraining")
