"""Datasets on disk: round trip, digest, leakage-free splits, and detection of damaged datasets."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from tasks_support import CHANNELS, CLASS_NAMES, make_samples

from tasks.dataset import (
    SPLITS,
    DatasetError,
    SplitParams,
    assign_splits,
    build_dataset,
    load_dataset,
    read_dataset_info,
    write_dataset,
)


def write(samples, out: Path, **split) -> object:
    return write_dataset(samples, "satellite", "classification", out, SplitParams(**split))


def sample_index(samples, image: np.ndarray) -> int:
    """Index of ``image`` in ``samples.images`` (images are unique: they carry random noise)."""
    matches = np.flatnonzero((samples.images == image).all(axis=(1, 2, 3)))
    assert len(matches) == 1
    return int(matches[0])


# --- write / load round trip -------------------------------------------------------------------------


def test_round_trip_returns_every_sample_with_its_label_and_group(samples, dataset) -> None:
    total = sum(len(split) for split in dataset.splits.values())
    assert total == len(samples.images)
    assert set(dataset.splits) == set(SPLITS)
    for split in dataset.splits.values():
        assert split.images.dtype == np.float32 and split.images.shape[1:] == (3, 16, 16)
        for image, label, group in zip(split.images, split.labels, split.groups, strict=True):
            i = sample_index(samples, image)
            assert label == samples.labels[i] and group == samples.groups[i]


def test_written_info_matches_what_is_read_back(tmp_path: Path, samples) -> None:
    info = write(samples, tmp_path)
    assert read_dataset_info(tmp_path) == info
    assert info.channels == CHANNELS and info.class_names == CLASS_NAMES and info.tile_size == 16
    assert info.sources == ("synthetic-scene",) and info.dropped == {"nodata": 2}
    assert info.provenance == {"crs": "EPSG:32618"}
    assert sum(info.split_counts.values()) == len(samples.images) and info.split_counts["unlabelled"] == 0
    for split, counts in info.class_counts.items():
        assert sum(counts.values()) == info.split_counts[split]


def test_normalisation_statistics_come_from_the_training_split_only(dataset) -> None:
    train = np.asarray(dataset.splits["train"].images)
    np.testing.assert_allclose(dataset.info.channel_mean, train.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(dataset.info.channel_std, train.std(axis=(0, 2, 3)), rtol=1e-4)
    everything = np.concatenate([s.images[:] for s in dataset.splits.values()])
    assert not np.allclose(dataset.info.channel_mean, everything.mean(axis=(0, 2, 3)), rtol=1e-6, atol=0)


def test_digest_is_stable_for_the_same_input_in_two_folders(tmp_path: Path, samples) -> None:
    first = write(samples, tmp_path / "a")
    second = write(make_samples(), tmp_path / "b")
    assert first.digest == second.digest and len(first.digest) == 64
    assert first.chunks == second.chunks and len(first.chunks["images"]) >= 1


def test_digest_changes_when_one_pixel_changes(tmp_path: Path, samples) -> None:
    changed = make_samples()
    changed.images[5, 1, 3, 7] += 0.25
    assert write(samples, tmp_path / "a").digest != write(changed, tmp_path / "b").digest


def test_digest_changes_when_one_label_changes(tmp_path: Path, samples) -> None:
    changed = make_samples()
    changed.labels[0] = (changed.labels[0] + 1) % 3
    assert write(samples, tmp_path / "a").digest != write(changed, tmp_path / "b").digest


def test_unlabelled_samples_are_kept_apart_from_the_splits(tmp_path: Path) -> None:
    samples = make_samples()
    samples.labels[:8] = -1  # the whole of group blk-0
    info = write(samples, tmp_path)
    loaded = load_dataset(tmp_path)
    assert info.split_counts["unlabelled"] == 8
    assert (loaded.splits["unlabelled"].labels == -1).all()
    assert set(loaded.splits["unlabelled"].groups) == {"blk-0"}
    assert all((loaded.splits[s].labels >= 0).all() for s in SPLITS)


def test_an_unlabelled_sample_set_is_written_as_the_test_split(tmp_path: Path) -> None:
    samples = make_samples(n_groups=2)
    samples.labels[:] = -1
    info = write(samples, tmp_path)
    assert info.split_counts == {"train": 0, "val": 0, "test": len(samples.images), "unlabelled": 0}
    assert set(load_dataset(tmp_path).splits) == {"test"}


def test_writing_no_samples_is_an_error(tmp_path: Path) -> None:
    samples = make_samples()
    empty = replace(samples, images=samples.images[:0], labels=samples.labels[:0], groups=samples.groups[:0],
                    locations=samples.locations[:0])
    with pytest.raises(DatasetError, match="no samples"):
        write(empty, tmp_path)


def test_build_dataset_reads_a_real_geotiff_scene(tmp_path: Path) -> None:
    from domains.satellite.examples import write_example
    from domains.spec import IngestRequest

    example = write_example(tmp_path / "example", seed=0)
    request = IngestRequest(source=example["scene_dir"], labels=example["labels"], tile_size=12, stride=12,
                            block_size=12)
    info = build_dataset("satellite", request, tmp_path / "dataset", SplitParams(seed=1))
    loaded = load_dataset(tmp_path / "dataset")
    assert info.domain == "satellite" and len(info.channels) == 13 and info.tile_size == 12
    assert info.class_names == ("water", "vegetation", "bare_or_built")
    assert all(len(loaded.splits[s]) > 0 for s in SPLITS)
    assert loaded.splits["train"].images.shape[1:] == (13, 12, 12)
    assert 0.0 < loaded.splits["train"].images[:].max() < 1.0  # reflectance, not raw DN


# --- splits ------------------------------------------------------------------------------------------


GROUPS = np.array([f"blk-{i}" for i in range(12) for _ in range(3)])


def test_no_group_is_in_two_splits(dataset) -> None:
    seen = {s: set(split.groups) for s, split in dataset.splits.items()}
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]


def test_assign_splits_maps_every_group_once_and_fills_each_split() -> None:
    split_of = assign_splits(GROUPS, SplitParams(seed=3))
    assert set(split_of) == set(GROUPS)
    assert set(split_of.values()) == set(SPLITS)
    counts = {s: sum(v == s for v in split_of.values()) for s in SPLITS}
    assert counts == {"test": 2, "val": 2, "train": 8}  # round(0.2 * 12), round(0.15 * 12)


def test_assign_splits_is_deterministic_for_a_seed() -> None:
    assert assign_splits(GROUPS, SplitParams(seed=7)) == assign_splits(GROUPS[::-1].copy(), SplitParams(seed=7))
    assignments = {tuple(sorted(assign_splits(GROUPS, SplitParams(seed=s)).items())) for s in range(6)}
    assert len(assignments) > 1  # the seed matters


def test_assign_splits_without_validation_share_leaves_val_empty() -> None:
    split_of = assign_splits(GROUPS, SplitParams(val_fraction=0.0))
    assert set(split_of.values()) == {"train", "test"}


def test_assign_splits_needs_three_groups() -> None:
    with pytest.raises(DatasetError, match="at least 3 leakage groups.*found 2"):
        assign_splits(np.array(["a", "a", "b"]), SplitParams())


def test_assign_splits_always_leaves_a_training_group() -> None:
    # 0.5 + 0.35 < 0.9 passes SplitParams, but round(0.5 * 3) = 2 val groups + 1 test group = all 3.
    split_of = assign_splits(np.array(["a", "b", "c"]), SplitParams(val_fraction=0.5, test_fraction=0.35))
    assert "train" in split_of.values()


def test_split_params_must_leave_training_data() -> None:
    with pytest.raises(ValidationError, match="at least 10%"):
        SplitParams(val_fraction=0.45, test_fraction=0.45)
    with pytest.raises(ValidationError):
        SplitParams(test_fraction=0.0)  # a test split is mandatory
    assert SplitParams(val_fraction=0.3, test_fraction=0.5).test_fraction == 0.5


# --- damaged datasets --------------------------------------------------------------------------------


@pytest.fixture
def dataset_copy(dataset_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(dataset_dir, target)
    return target


def first_chunk(folder: Path) -> Path:
    return folder / "images" / "c" / "0" / "0" / "0" / "0"


def read_every_split(folder: Path, verify: bool = True) -> int:
    return sum(len(split.images[:]) for split in load_dataset(folder, verify=verify).splits.values())


def test_a_tampered_chunk_is_detected_on_first_read_and_named(dataset_copy: Path) -> None:
    import zarr

    images = zarr.open_group(zarr.storage.LocalStore(dataset_copy), mode="r+")["images"]
    images[0, 0, 0, 0] = images[0, 0, 0, 0] + 1.0  # re-encoded: a valid chunk whose pixels differ
    loaded = load_dataset(dataset_copy)  # opening is lazy: nothing read yet
    with pytest.raises(DatasetError, match="does not match its digest") as caught:
        loaded.splits["train"].images[0]
    assert str(first_chunk(dataset_copy).relative_to(dataset_copy.parent)) in str(caught.value)
    assert read_every_split(dataset_copy, verify=False) > 0


def test_a_missing_chunk_is_named(dataset_copy: Path) -> None:
    first_chunk(dataset_copy).unlink()
    with pytest.raises(DatasetError, match="is missing") as caught:
        read_every_split(dataset_copy)
    assert str(first_chunk(dataset_copy)) in str(caught.value)


def test_a_truncated_chunk_is_a_dataset_error_naming_the_file(dataset_copy: Path) -> None:
    chunk = first_chunk(dataset_copy)
    chunk.write_bytes(chunk.read_bytes()[:200])
    with pytest.raises(DatasetError) as caught:
        read_every_split(dataset_copy)
    assert str(chunk) in str(caught.value)


def test_a_format_2_dataset_is_refused_with_a_reingest_hint(dataset_copy: Path) -> None:
    import json

    meta = json.loads((dataset_copy / "dataset.json").read_text())
    (dataset_copy / "dataset.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(DatasetError, match="dataset format 2 .* re-ingest the source"):
        load_dataset(dataset_copy)


def rewrite_manifest(folder: Path, change) -> None:
    manifest = pq.read_table(folder / "manifest.parquet").to_pydict()
    change(manifest)
    pq.write_table(pa.table(manifest), folder / "manifest.parquet")


def test_a_manifest_with_a_group_in_two_splits_is_rejected(dataset_copy: Path) -> None:
    def leak(manifest: dict) -> None:
        train_rows = [i for i, s in enumerate(manifest["split"]) if s == "train"]
        test_rows = [i for i, s in enumerate(manifest["split"]) if s == "test"]
        manifest["group"][train_rows[0]] = manifest["group"][test_rows[0]]

    rewrite_manifest(dataset_copy, leak)
    with pytest.raises(DatasetError, match=r"appears in both .*splits") as caught:
        load_dataset(dataset_copy)
    assert str(dataset_copy) in str(caught.value)


def test_a_manifest_edited_after_writing_is_detected(dataset_copy: Path) -> None:
    def relabel(manifest: dict) -> None:
        manifest["label"][0] = (manifest["label"][0] + 1) % 3

    rewrite_manifest(dataset_copy, relabel)
    with pytest.raises(DatasetError):
        load_dataset(dataset_copy)


def test_reading_a_folder_without_dataset_json_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no dataset.json") as caught:
        read_dataset_info(tmp_path)
    assert str(tmp_path) in str(caught.value)
    with pytest.raises(DatasetError, match="no dataset.json"):
        load_dataset(tmp_path)


# --- crash safety, quarantine record and output confinement -------------------------------------------------

_KILLABLE_WRITER = """
import sys, time
sys.path[:0] = [{root!r}, {support!r}]
import numpy as np
from tasks_support import make_samples
from tasks.dataset import SplitParams, write_dataset

from tasks.dataset_store import ChunkedArrayWriter

real_store = ChunkedArrayWriter._store_chunk

def store_then_wait(self, block):
    # The test's stand-in for a slow disk: after the first chunk lands, stay mid-write until killed.
    real_store(self, block)
    print("first chunk written", flush=True)
    time.sleep(120)

ChunkedArrayWriter._store_chunk = store_then_wait
write_dataset(make_samples(seed={seed}), "satellite", "classification", {out!r}, SplitParams())
"""


def _kill_mid_write(out: Path, seed: int, tmp_path: Path) -> None:
    """Start a real writer process, SIGKILL it once it has written its first shard, and wait for it to die."""
    import signal
    import subprocess
    import sys

    script = tmp_path / f"writer-{seed}.py"
    script.write_text(_KILLABLE_WRITER.format(root=str(Path(__file__).resolve().parents[2]),
                                              support=str(Path(__file__).resolve().parent), seed=seed, out=str(out)))
    writer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = writer.stdout.readline()
        assert line.strip() == "first chunk written", writer.stderr.read()
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == -signal.SIGKILL


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.slow  # a writer subprocess imports Prefect: about 15 s each on 2 cores
def test_a_write_killed_midway_leaves_no_dataset_and_a_rerun_gives_the_same_digest(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    _kill_mid_write(out, seed=0, tmp_path=tmp_path)
    assert not out.exists()  # nothing where a later stage would look
    [partial] = _partials(out)
    assert list((partial / "images" / "c").rglob("*")) and not (partial / "dataset.json").exists()
    for reader in (read_dataset_info, load_dataset):
        with pytest.raises(DatasetError, match="unfinished dataset write"):
            reader(partial)
        with pytest.raises(DatasetError):
            reader(out)

    rerun = write(make_samples(seed=0), out)
    uninterrupted = write(make_samples(seed=0), tmp_path / "uninterrupted")
    assert rerun.digest == uninterrupted.digest == load_dataset(out).info.digest
    assert _partials(out) == []  # the dead writer's leftovers were swept


@pytest.mark.slow  # a writer subprocess imports Prefect: about 15 s each on 2 cores
def test_a_rewrite_killed_midway_keeps_the_previous_dataset(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    before = write(make_samples(seed=0), out)
    _kill_mid_write(out, seed=1, tmp_path=tmp_path)
    assert load_dataset(out).info.digest == before.digest
    after = write(make_samples(seed=1), out)  # a complete rewrite replaces it
    assert after.digest != before.digest and load_dataset(out).info.digest == after.digest
    assert _partials(out) == [] and not list(tmp_path.glob(".dataset.replaced-*"))


def test_a_folder_that_is_not_a_dataset_is_never_replaced(tmp_path: Path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a Vitrail dataset"):
        write(make_samples(), out)
    assert (out / "keep.txt").read_text() == "mine" and _partials(out) == []


def test_quarantine_is_recorded_beside_the_dataset(tmp_path: Path) -> None:
    import json

    samples = replace(make_samples(), quarantine=[{"item": "scene/B04.tif", "reason": "unreadable", "problem": "x"}])
    info = write(samples, tmp_path / "dataset")
    assert info.quarantined == 1 and read_dataset_info(tmp_path / "dataset").quarantined == 1
    assert json.loads((tmp_path / "dataset" / "quarantine.json").read_text()) == samples.quarantine


def test_hostile_names_in_samples_stay_data(tmp_path: Path) -> None:
    import os

    hostile = "../../../etc/" + os.fsdecode(b"\xff") + "/x"
    samples = replace(make_samples(), source=hostile,
                      sample_ids=np.array([f"/abs/{hostile}/{i}" for i in range(len(make_samples().labels))]))
    root = tmp_path / "root"
    write(samples, root / "dataset")
    written = {p.resolve() for p in tmp_path.rglob("*")}
    assert all(root.resolve() in p.parents or p == root.resolve() for p in written)
    assert load_dataset(root / "dataset").info.sources == ("../../../etc/\\xff/x",)


# --- streamed batches in the source dtype -----------------------------------------------------------------


def as_uint16_batches(samples, batch: int) -> list:
    """``samples`` as a reader streaming raw uint16 counts would yield them: scaled 1e-4, in batches."""
    counts = np.clip(np.round(samples.images / 1e-4), 0, 65535).astype(np.uint16)
    scaling = tuple((1e-4, 0.0) for _ in samples.channels)
    batches = []
    for start in range(0, len(counts), batch):
        part = slice(start, start + batch)
        batches.append(replace(samples, images=counts[part], labels=samples.labels[part], groups=samples.groups[part],
                               locations=samples.locations[part], scaling=scaling,
                               dropped={"nodata": 1}, provenance={"crs": "EPSG:32618", f"batch{start}": "x"},
                               quarantine=[{"item": f"f{start // batch % 2}", "reason": "r", "problem": "p"}]))
    return batches


def test_streamed_uint16_batches_are_stored_natively_and_read_as_their_physical_values(tmp_path: Path) -> None:
    batches = as_uint16_batches(make_samples(), batch=20)
    whole = replace(make_samples(), images=np.concatenate([b.physical() for b in batches]))
    streamed = write(iter(batches), tmp_path / "streamed")
    at_once = write(whole, tmp_path / "whole")
    assert streamed.stored_dtype == "uint16" and at_once.stored_dtype == "float32"
    assert streamed.scaling == ((1e-4, 0.0),) * 3 and streamed.digest != at_once.digest
    assert streamed.dropped == {"nodata": len(batches)}  # counts add up over batches
    assert streamed.quarantined == 2 and set(streamed.provenance) == {"crs", *(f"batch{s}" for s in range(0, 96, 20))}
    np.testing.assert_allclose(streamed.channel_mean, at_once.channel_mean, rtol=1e-9)
    native, physical = load_dataset(tmp_path / "streamed"), load_dataset(tmp_path / "whole")
    for name, split in physical.splits.items():
        assert native.splits[name].images.dtype == np.float32
        assert np.array_equal(native.splits[name].images[:], split.images[:])  # bitwise: same arithmetic
        assert np.array_equal(native.splits[name].labels, split.labels)


@pytest.mark.parametrize("dtype", ["uint16", "int16", "uint8", "int8", "float32"])
def test_per_sample_sums_are_exact_at_the_extremes_of_the_stored_dtype(dtype: str) -> None:
    """Integer sums (squares in 32 bits, totals in 64) equal the exact sums, the dtype's extremes included."""
    from tasks.dataset import _stored_sample_sums

    rng = np.random.default_rng(3)
    shape = (5, 3, 40, 40)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        images = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
        images[0] = info.max  # the largest squares there are
        images[1] = info.min
    else:
        images = rng.normal(1.0, 3.0, size=shape).astype(dtype)
    sums, squares = _stored_sample_sums(images)
    wide = images.astype(np.float64).reshape(5, 3, -1)
    assert sums.dtype == squares.dtype == np.float64 and sums.shape == squares.shape == (5, 3)
    if np.issubdtype(np.dtype(dtype), np.integer):
        exact = images.astype(object).reshape(5, 3, -1)
        assert sums.tolist() == [[float(sum(c)) for c in s] for s in exact]
        assert squares.tolist() == [[float(sum(v * v for v in c)) for c in s] for s in exact]
    np.testing.assert_allclose(sums, wide.sum(axis=2), rtol=1e-12)
    np.testing.assert_allclose(squares, (wide * wide).sum(axis=2), rtol=1e-12)


@pytest.mark.parametrize(("dtype", "side"), [("uint16", 256), ("uint16", 257), ("int16", 256), ("int16", 257)])
def test_per_sample_sums_stay_exact_where_32_bits_no_longer_hold_them(dtype: str, side: int) -> None:
    """At 256^2 px a uint16 sample's sum still fits 32 bits, at 257^2 it does not (int16: 2**31 of 32768s)."""
    from tasks.dataset import _stored_sample_sums

    info = np.iinfo(dtype)
    images = np.full((2, 1, side, side), info.max, dtype=dtype)
    images[1] = info.min
    sums, squares = _stored_sample_sums(images)
    pixels = side * side
    assert sums[:, 0].tolist() == [float(pixels * int(info.max)), float(pixels * int(info.min))]
    assert squares[:, 0].tolist() == [float(pixels * int(info.max) ** 2), float(pixels * int(info.min) ** 2)]


def test_the_digest_does_not_depend_on_how_a_reader_batched_the_samples(tmp_path: Path) -> None:
    digests = {write(as_uint16_batches(make_samples(), batch=b), tmp_path / str(b)).digest for b in (7, 20, 96)}
    assert len(digests) == 1


def test_batches_that_disagree_on_channels_are_refused(tmp_path: Path) -> None:
    batches = as_uint16_batches(make_samples(), batch=48)
    batches[1] = replace(batches[1], scaling=tuple((2e-4, 0.0) for _ in CHANNELS))
    with pytest.raises(DatasetError, match="disagree on scaling"):
        write(batches, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


# --- lazy reading ----------------------------------------------------------------------------------------


def small_chunks(monkeypatch) -> None:
    """Chunks of 10 samples (instead of about 16 MiB), so the tiny test datasets span several chunks."""
    import tasks.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "chunk_samples_for", lambda sample_bytes: 10)


def test_a_split_indexes_like_an_array_and_decodes_each_chunk_once_in_order(tmp_path: Path, monkeypatch) -> None:
    import pickle

    from tasks.dataset_store import ChunkSource

    small_chunks(monkeypatch)
    samples = make_samples()
    write(samples, tmp_path / "ds")
    train = load_dataset(tmp_path / "ds").splits["train"]
    images = train.images
    whole = images[:]
    assert images.shape == whole.shape and len(images) == len(train) and images.dtype == np.float32
    assert np.array_equal(images[3], whole[3]) and np.array_equal(images[-1], whole[-1])
    picks = np.array([7, 0, 7, len(images) - 1])
    assert np.array_equal(images[picks], whole[picks]) and np.array_equal(images[2:9:3], whole[2:9:3])
    assert np.array_equal(images[whole[:, 0, 0, 0] > 0.3], whole[whole[:, 0, 0, 0] > 0.3])
    assert np.array_equal(images[1:4, 2], whole[1:4, 2]) and np.array_equal(images[5, 1], whole[5, 1])
    with pytest.raises(IndexError):
        images[len(images)]

    decoded: list[int] = []
    real_decode = ChunkSource._decode
    monkeypatch.setattr(ChunkSource, "_decode", lambda self, i: decoded.append(i) or real_decode(self, i))
    fresh = load_dataset(tmp_path / "ds").splits["train"].images
    assert np.array_equal(np.stack(list(fresh)), whole)  # iteration in order
    assert decoded == sorted(set(decoded)) and len(decoded) == len(set(fresh.members // 10)) > 1
    copy = pickle.loads(pickle.dumps(fresh))  # what a DataLoader worker with spawn receives
    assert np.array_equal(copy[picks], whole[picks])


def test_a_tampered_chunk_is_named_when_reached_and_not_before(tmp_path: Path, monkeypatch) -> None:
    import zarr

    small_chunks(monkeypatch)
    write(make_samples(), tmp_path / "ds")
    images = zarr.open_group(zarr.storage.LocalStore(tmp_path / "ds"), mode="r+")["images"]
    images[95, 0, 0, 0] = 5.0  # the last chunk (9) only
    loaded = load_dataset(tmp_path / "ds")
    split = next(s for s in loaded.splits.values() if 95 in s.images.members)
    earlier = split.images.members < 90
    assert len(split.images[earlier]) == int(earlier.sum()) > 0  # samples of the other chunks read fine
    with pytest.raises(DatasetError, match=r"images/c/9/0/0/0: chunk 9 of images does not match its digest"):
        split.images[int(np.flatnonzero(split.images.members == 95)[0])]


def test_segmentation_masks_are_lazy_and_scored_batch_by_batch(tmp_path: Path) -> None:
    from tasks_support import make_segmentation_samples

    from tasks.evaluation import evaluate_predictor, score_segmentation

    write_dataset(make_segmentation_samples(), "hs", "segmentation", tmp_path, SplitParams())
    test = load_dataset(tmp_path).splits["test"]
    assert test.labels.dtype == np.int64 and test.labels.shape == (len(test), 16, 16)

    def predict(images: np.ndarray) -> np.ndarray:  # class 1 where channel 0 is bright
        bright = images[:, 0] > 0.3
        return np.stack([~bright, bright], axis=1).astype(np.float32)

    streamed = evaluate_predictor(predict, test.images, test.labels, ("background", "plume"), batch_size=5,
                                  task="segmentation")
    whole = score_segmentation(test.labels[:], predict(test.images[:]).argmax(axis=1), ("background", "plume"))
    assert streamed == whole and streamed.samples == len(test)


def test_a_chunk_shuffled_order_visits_every_sample_once_decoding_each_chunk_once(tmp_path: Path, monkeypatch) -> None:
    from tasks.dataset_store import ChunkSource

    small_chunks(monkeypatch)
    write(make_samples(), tmp_path / "ds")
    images = load_dataset(tmp_path / "ds").splits["train"].images
    decoded: list[int] = []
    real_decode = ChunkSource._decode
    monkeypatch.setattr(ChunkSource, "_decode", lambda self, i: decoded.append(i) or real_decode(self, i))
    order = images.chunk_shuffled_order(np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(len(images))) and order.tolist() != sorted(order.tolist())
    for position in order:  # what a DataLoader drawing one sample at a time does
        images[int(position)]
    assert sorted(decoded) == sorted(set(images.members // 10))  # every chunk decoded exactly once
