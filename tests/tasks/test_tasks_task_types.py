"""Multilabel and segmentation datasets through the same writer, loader, training loop and metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_support import FAST_TRAIN, make_multilabel_samples, make_samples, make_segmentation_samples, new_model

from tasks.dataset import DatasetError, SplitParams, load_dataset, write_dataset
from tasks.evaluation import score_outputs
from tasks.training import TrainParams, fit, predict_logits


@pytest.fixture(scope="module")
def multilabel_dataset(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("multilabel")
    write_dataset(make_multilabel_samples(), "radiology", "multilabel", folder, SplitParams())
    return load_dataset(folder)


@pytest.fixture(scope="module")
def segmentation_dataset(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("segmentation")
    write_dataset(make_segmentation_samples(), "hyperspectral", "classification", folder, SplitParams())
    return load_dataset(folder)


def test_multilabel_labels_round_trip_with_their_sample_ids(multilabel_dataset) -> None:
    samples = make_multilabel_samples()
    info = multilabel_dataset.info
    assert info.task == "multilabel" and info.class_names == ("nodule", "effusion")
    loaded = np.concatenate([s.labels for s in multilabel_dataset.splits.values()])
    assert loaded.shape == (len(samples.labels), 2)
    assert sorted(map(tuple, loaded.tolist())) == sorted(map(tuple, samples.labels.tolist()))
    assert info.class_counts["train"]["nodule"] == int(multilabel_dataset.splits["train"].labels[:, 0].sum())
    import pyarrow.parquet as pq

    ids = pq.read_table(multilabel_dataset.path / "manifest.parquet").column("sample_id").to_pylist()
    assert set(ids) == set(samples.sample_ids.tolist())


def test_segmentation_masks_round_trip_and_the_sample_set_task_wins(segmentation_dataset) -> None:
    samples = make_segmentation_samples()
    info = segmentation_dataset.info
    assert info.task == "segmentation"  # the writer was told "classification"; the sample set knows better
    train = segmentation_dataset.splits["train"]
    assert train.labels.shape[1:] == (16, 16) and set(np.unique(train.labels[:])) == {-1, 0, 1}
    assert train.labels.dtype == np.int64  # masks are read lazily too, like the images
    total = sum(int((s.labels[:] == 1).sum()) for s in segmentation_dataset.splits.values())
    assert total == int((samples.labels == 1).sum())
    assert info.class_counts["train"]["plume"] == int((train.labels[:] == 1).sum())


def test_a_changed_mask_pixel_changes_the_digest(tmp_path: Path) -> None:
    first = write_dataset(make_segmentation_samples(), "hs", "segmentation", tmp_path / "a", SplitParams())
    edited = make_segmentation_samples()
    edited.labels[5, 8, 8] = 1 - edited.labels[5, 8, 8]
    second = write_dataset(edited, "hs", "segmentation", tmp_path / "b", SplitParams())
    assert first.digest != second.digest


def test_a_tampered_label_chunk_is_detected(tmp_path: Path) -> None:
    import zarr

    write_dataset(make_multilabel_samples(), "radiology", "multilabel", tmp_path, SplitParams())
    labels = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="r+")["labels"]
    labels[0, 0] = 1 - labels[0, 0]  # a valid chunk with other content than the digest recorded
    with pytest.raises(DatasetError, match="labels/c/0/0: chunk 0 of labels does not match its digest"):
        load_dataset(tmp_path)


def test_labels_that_do_not_fit_the_task_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="do not fit task 'multilabel'"):
        write_dataset(make_samples(), "satellite", "multilabel", tmp_path, SplitParams())


def test_multilabel_training_ranks_both_findings(tmp_path: Path, multilabel_dataset) -> None:
    result = fit(new_model(multilabel_dataset), multilabel_dataset, TrainParams(**FAST_TRAIN), tmp_path, "tiny")
    assert {"val_macro_auroc", "val_macro_auprc"} <= set(result.best_metrics)
    test = multilabel_dataset.splits["test"]
    report = score_outputs("multilabel", test.labels, predict_logits(result.model, test.images), ("nodule", "effusion"))
    assert report.macro_auroc >= 0.9


def test_segmentation_training_finds_the_squares(tmp_path: Path, segmentation_dataset) -> None:
    model = new_model(segmentation_dataset)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 2, 16, 16)
    result = fit(model, segmentation_dataset, TrainParams(**{**FAST_TRAIN, "epochs": 5}), tmp_path, "tiny")
    assert {"val_foreground_iou", "val_pixel_accuracy"} <= set(result.best_metrics)
    test = segmentation_dataset.splits["test"]
    report = score_outputs("segmentation", test.labels[:], predict_logits(result.model, test.images),
                           ("background", "plume"))
    assert report.foreground_iou >= 0.5
