"""Versioned, leakage-free datasets: a manifest plus content-addressed chunks, with one digest.

A dataset lives in a folder or under an fsspec URL prefix (``s3://bucket/prefix``)::

    dataset.json       metadata: digest, domain, task, channels, classes, geometry, normalisation, counts,
                       stored dtype, per-channel scaling and the digest (BLAKE3) of every chunk (written last)
    quarantine.json    files or series of the source left out, each with its reason (may be empty)
    manifest.parquet   one row per sample: sample_id, index (into the arrays), source, row, col, label,
                       group, split
    zarr.json, images/ a zarr v3 group; ``images`` is (N, C, H, W) in the source's dtype (uint8, uint16,
                       int16, ...; float32 when the reader gives physical values), chunked along N and
                       compressed (see :mod:`tasks.dataset_store` for why zarr)
    labels/            (N, K) int8 for multilabel, (N, H, W) int16 for segmentation tasks
    coarse-<f>*/, valid/  channels on a coarser grid (Sentinel-2's 20 m and 60 m bands) stored at their own
                       resolution, ``images`` then holding the other channels (see :mod:`tasks.coarse_bands`);
                       read back as (N, C, H, W), as if stored upsampled

Pixels are stored as the source holds them and turned into physical units (``raw * scale + offset``
per channel) when read. For classification the manifest's ``label`` column is the class id; for the
other tasks it is 1 for a labelled sample and -1 for an unlabelled one, and the labels live in ``labels``.

The writer takes a reader's stream of batches and appends them chunk by chunk: its memory is one batch
plus one chunk buffer, whatever the size of the source. Per-group channel sums are kept as it goes,
so the training split's normalisation statistics come out at the end without rereading any pixels.
Splits are assigned per leakage group (spatial block, patient, slide), never per sample, once every
group is known; the "no group in two splits" invariant is asserted both when writing and when loading.

Reading is lazy (:func:`load_dataset`): a split's images are a :class:`tasks.dataset_store.LazySamples`
that decodes chunks on demand and checks each chunk's digest the first time it is read;
:func:`verify_dataset` (``vitrail dataset verify``) checks everything at once.

Crash safety: a local dataset is written into a hidden sibling folder (``.<name>.partial-<pid>-<token>``)
and renamed into place only once complete, so a killed ingest never leaves a half-written dataset where
a later stage would read it; the next write sweeps the leftovers of writers that are no longer running.
Object stores cannot rename a prefix atomically, so there the writer marks the prefix as being written,
writes ``dataset.json`` last, and a prefix without ``dataset.json`` is never read as a dataset.

Datasets of format 2 (float32 ``.npy`` shards) are not read: re-ingest the source (the message says so).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field, model_validator

from domains import (
    LABEL_RANKS,
    Channel,
    CoarseGrid,
    CoarsePatches,
    IngestRequest,
    SampleSet,
    WindowChannel,
    apply_windows,
    get_domain,
    labelled_samples,
)
from domains.array_memory import ReusableArrays
from domains.confinement import ensure_inside
from domains.spec import printable_path
from tasks.allocator import keep_freed_memory_for_reuse
from tasks.coarse_bands import (
    RebuiltSource,
    coarse_subset,
    fine_channels,
    interpolated_sums,
    near_nodata,
    rebuild_samples,
    stored_arrays,
)
from tasks.dataset_store import (
    BATCHES_IN_FLIGHT,
    ChunkedArrayWriter,
    ChunkSource,
    DatasetError,
    DatasetFiles,
    LazySamples,
    as_location,
    chunk_samples_for,
    is_url,
)

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 3
LABEL_DTYPES = {"multilabel": np.int8, "segmentation": np.int16}
QUARANTINE_FILE = "quarantine.json"
PARTIAL_MARK = ".partial-"
_REPLACED_MARK = ".replaced-"
# On an object store: present while a writer fills the prefix (a rename there is not atomic).
WRITING_MARK = ".vitrail-writing"
MANIFEST_COLUMNS = ("sample_id", "index", "source", "row", "col", "label", "group", "split")
# Dtypes a reader may store samples in when it records their scaling (float16 only if the loss is known).
STORED_DTYPES = ("uint8", "uint16", "int16", "int8", "uint32", "int32", "float16", "float32")
# Samples turned into physical units at once while statistics are summed (bounds the float64 scratch).
_STATS_SCRATCH_BYTES = 32 * 2**20


class SplitParams(BaseModel):
    """How leakage groups are divided between training, validation and test."""

    val_fraction: float = Field(0.15, ge=0.0, le=0.5, description="Share of groups held out for validation")
    test_fraction: float = Field(0.2, gt=0.0, le=0.5, description="Share of groups held out for the final test")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the group shuffle (same seed, same split)")

    @model_validator(mode="after")
    def _leave_training_data(self) -> SplitParams:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% of groups for training")
        return self


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a written dataset (the content of ``dataset.json``)."""

    digest: str
    domain: str
    task: str
    channels: tuple[Channel, ...]
    class_names: tuple[str, ...]
    tile_size: int
    sources: tuple[str, ...]
    split_counts: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    dropped: dict[str, int]
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    provenance: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    quarantined: int = 0
    """Files or series of the source left out (listed with their reasons in ``quarantine.json``)."""
    stored_dtype: str = "float32"
    """dtype of the stored ``images`` array (the source's own)."""
    scaling: tuple[tuple[float, float], ...] | None = None
    """Per channel ``(scale, offset)``: physical = stored * scale + offset; None when stored physical."""
    chunk_samples: int = 0
    """Samples per chunk of the stored arrays."""
    chunks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Digest of every chunk of each stored array (``images``, ``labels``), in order."""
    windows: tuple[WindowChannel, ...] | None = None
    """Windows a model of this dataset starts with (CT: HU stored, windows made inside the model); then
    ``channel_mean``/``channel_std`` are the statistics of the windowed channels, one per window."""
    coarse_grids: tuple[CoarseGrid, ...] = ()
    """Channels stored at their own, coarser resolution (see :mod:`tasks.coarse_bands`); empty: none."""
    coarse_fill: tuple[float, ...] = ()
    """With ``coarse_grids``: the stored value of each channel where a sample is not valid."""

    @property
    def model_channels(self) -> tuple[Channel, ...]:
        """The channels the network after the window layer sees: the windows' names, else the stored channels."""
        return tuple(Channel(name=w.name) for w in self.windows) if self.windows else self.channels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_json(cls, payload: dict) -> DatasetInfo:
        payload = dict(payload)
        payload["channels"] = tuple(Channel(**c) for c in payload["channels"])
        for key in ("class_names", "sources", "channel_mean", "channel_std"):
            payload[key] = tuple(payload[key])
        if payload.get("scaling") is not None:
            payload["scaling"] = tuple((float(s), float(o)) for s, o in payload["scaling"])
        payload["chunks"] = {name: tuple(digests) for name, digests in payload.get("chunks", {}).items()}
        if payload.get("windows") is not None:
            payload["windows"] = tuple(WindowChannel(**w) for w in payload["windows"])
        payload["coarse_grids"], payload["coarse_fill"] = coarse_from_json(payload)
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in payload.items() if key in known})


def coarse_from_json(payload: dict) -> tuple[tuple[CoarseGrid, ...], tuple[float, ...]]:
    """The coarse grids and fill values recorded in a ``dataset.json`` or ``part.json`` payload."""
    grids = tuple(CoarseGrid(factor=int(g["factor"]), channels=tuple(int(c) for c in g["channels"]),
                             side=int(g["side"])) for g in payload.get("coarse_grids", ()))
    return grids, tuple(float(v) for v in payload.get("coarse_fill", ()))


@dataclass(frozen=True)
class Split:
    """The samples of one split.

    ``images`` is a lazy, chunk-backed array (:class:`tasks.dataset_store.LazySamples`): index it
    (``images[i]``, ``images[a:b]``, ``images[indices]``) to get float32 physical values; nothing is
    read until then. ``labels`` is an int64 NumPy array, except for segmentation where it is lazy too.
    ``groups`` is the leakage group of each sample; ``sample_ids`` names each sample (a slide's tiles are
    ``<slide>/<x>,<y>``: :mod:`tasks.bags` gathers them into slide bags), None when not read.
    """

    images: LazySamples | np.ndarray
    labels: LazySamples | np.ndarray
    groups: np.ndarray
    sample_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    """A dataset opened from a folder or URL; its manifest is verified against the digest."""

    path: Path | str
    info: DatasetInfo
    splits: dict[str, Split]


def assign_splits(groups: np.ndarray, params: SplitParams) -> dict[str, str]:
    """Map each distinct group id to a split; every split that asks for data gets at least one group."""
    unique = sorted(set(groups.tolist()))
    if len(unique) < 3:
        raise DatasetError(f"need at least 3 leakage groups for train/val/test splits, found {len(unique)}; "
                           "use a smaller block size or a larger source")
    order = np.random.default_rng(params.seed).permutation(len(unique))
    n_test = max(1, round(params.test_fraction * len(unique)))
    n_val = max(1, round(params.val_fraction * len(unique))) if params.val_fraction > 0 else 0
    n_val = min(n_val, len(unique) - n_test - 1)  # rounding up both must still leave a training group
    if n_val < 0 or (params.val_fraction > 0 and n_val == 0):
        raise DatasetError(f"{len(unique)} leakage groups cannot fill train, val and test with "
                           f"val_fraction={params.val_fraction} and test_fraction={params.test_fraction}")
    split_of: dict[str, str] = {}
    for rank, index in enumerate(order):
        split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        split_of[unique[index]] = split
    return split_of


def check_no_group_leak(groups: np.ndarray, splits: np.ndarray, where: str) -> None:
    """Raise if any leakage group appears in more than one split."""
    seen: dict[str, str] = {}
    for group, split in zip(groups.tolist(), splits.tolist()):
        if seen.setdefault(group, split) != split:
            raise DatasetError(f"{where}: group {group!r} appears in both {seen[group]!r} and {split!r} splits")




def _dataset_digest(rows: dict[str, list], channels: tuple[Channel, ...], class_names: tuple[str, ...],
                    scaling, stored_dtype: str, chunks: dict[str, list[str]] | dict[str, tuple[str, ...]],
                    windows: tuple[WindowChannel, ...] | None = None,
                    coarse: tuple[tuple[CoarseGrid, ...], tuple[float, ...]] = ((), ())) -> str:
    """One digest over every manifest row, the channels, classes, scaling, dtype, windows, coarse grids and every
    chunk's digest."""
    digest = hashlib.sha256()
    header = {"format_version": FORMAT_VERSION, "channels": [asdict(c) for c in channels],
              "classes": list(class_names), "scaling": [list(pair) for pair in scaling] if scaling else None,
              "dtype": stored_dtype, "chunks": {name: list(values) for name, values in chunks.items()}}
    if windows:  # only when present, so the digests of datasets without windows stay what they were
        header["windows"] = [asdict(w) for w in windows]
    if coarse[0]:  # likewise
        header["coarse"] = {"grids": [asdict(g) for g in coarse[0]], "fill": list(coarse[1])}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for column in MANIFEST_COLUMNS:
        digest.update(column.encode())
        digest.update(json.dumps(rows[column]).encode())
    return digest.hexdigest()


def require_utf8_path(value: object) -> object:
    """Refuse a path that is not valid UTF-8 (Linux names are bytes) with a message naming it.

    Flow parameters travel as JSON to the Prefect server, which cannot carry such names; the user gets
    this sentence instead of a bare parsing error.
    """
    if isinstance(value, str) and printable_path(value) != value:
        raise ValueError(f"{printable_path(value)}: the path is not valid UTF-8 and cannot be passed to a flow; "
                         "rename it (e.g. convmv -f latin1 -t utf8)")
    return value


def is_partial_dataset(path: Path | str) -> bool:
    """Whether ``path`` is an unfinished (or abandoned) dataset write, never a dataset to read."""
    return PARTIAL_MARK in Path(path).name or _REPLACED_MARK in Path(path).name


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _sweep_abandoned(out_dir: Path) -> None:
    """Remove partial folders of ``out_dir`` left by writers that died (``kill -9``, power cut)."""
    for mark in (PARTIAL_MARK, _REPLACED_MARK):
        prefix = f".{out_dir.name}{mark}"
        for sibling in out_dir.parent.glob(f".*{mark}*"):
            if not sibling.name.startswith(prefix):
                continue
            pid = sibling.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _writer_alive(int(pid)):
                shutil.rmtree(sibling, ignore_errors=True)


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise DatasetError(f"{out_dir}: exists and is not a folder; choose another dataset folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "dataset.json").is_file():
        raise DatasetError(f"{out_dir}: exists, is not empty and is not a Vitrail dataset; refusing to replace "
                           "what it holds: choose a new or empty folder")


def _publish(partial: Path, out_dir: Path) -> None:
    """Rename the complete ``partial`` folder to ``out_dir``, replacing an earlier dataset there."""
    _check_replaceable(out_dir)  # again: something may have appeared there while the dataset was written
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.rename(partial, out_dir)
        return
    # Two renames: the old dataset stays complete until the new one is complete and about to take its name.
    old = out_dir.with_name(f".{out_dir.name}{_REPLACED_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(out_dir, old)
    os.rename(partial, out_dir)
    shutil.rmtree(old, ignore_errors=True)



class _GroupTotals:
    """Running sums of one leakage group: pixels and channel sums (physical, float64), class counts."""

    def __init__(self, channels: int, classes: int):
        self.pixels = 0
        self.sums = np.zeros(channels, dtype=np.float64)
        self.squares = np.zeros(channels, dtype=np.float64)
        self.classes = np.zeros(classes, dtype=np.int64)

    def merge(self, other: _GroupTotals) -> None:
        self.pixels += other.pixels
        self.sums += other.sums
        self.squares += other.squares
        self.classes += other.classes


def _stored_sample_sums(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample and channel, the sum of stored values and of their squares (float64, (n, C) each).

    Integers of up to 16 bits are summed as integers, one sample at a time: a square fits 32 bits and a
    sample's sums fit 64, so the sums are exact (rounded once, to float64, only beyond 2**53), and the
    scratch is one sample widened to 32 bits, not a float64 copy of the batch (4x its bytes, and about
    three times slower to sum). Other dtypes are summed in float64.
    """
    count, channels = images.shape[:2]
    pixels = int(np.prod(images.shape[2:]))
    flat = images.reshape(count, channels, pixels)
    if flat.dtype.kind in "ui" and flat.dtype.itemsize <= 2 and pixels < 2**32:
        unsigned = flat.dtype.kind == "u"
        widened = np.empty((channels, pixels), dtype=np.uint32 if unsigned else np.int32)
        total = np.uint64 if unsigned else np.int64  # a square of an int16 is at most 2**30
        # A sample's sum fits the 32-bit type when its pixels times the largest value do (a 224^2 tile of
        # uint16): summed without widening again, a quarter faster.
        largest = max(np.iinfo(flat.dtype).max, -int(np.iinfo(flat.dtype).min))
        sum_type = widened.dtype if pixels * largest <= np.iinfo(widened.dtype).max else total
        sums = np.empty((count, channels), dtype=np.float64)
        squares = np.empty((count, channels), dtype=np.float64)
        for i in range(count):
            np.copyto(widened, flat[i])
            sums[i] = np.add.reduce(widened, axis=1, dtype=sum_type)
            np.multiply(widened, widened, out=widened)
            squares[i] = widened.sum(axis=1, dtype=total)
        return sums, squares
    raw = np.asarray(flat, dtype=np.float64)
    return raw.sum(axis=2), np.einsum("ijk,ijk->ij", raw, raw)


def _sample_shape(batch: SampleSet) -> tuple[int, ...]:
    """(C, H, W) of the samples, every channel counted (also where ``images`` hold the fine ones only)."""
    return (len(batch.channels), *(int(s) for s in batch.images.shape[2:]))


def _patch_sample_sums(images: np.ndarray, coarse: CoarsePatches, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_stored_sample_sums` of samples whose ``images`` hold only the channels on no coarse grid.

    The fine channels are summed exactly; the coarse ones from their patches, without upsampling them
    (:func:`tasks.coarse_bands.interpolated_sums`: the sums of the bilinear values before they are
    rounded to the stored dtype, within half a unit per pixel of the stored values' and far closer on
    average). Samples near nodata, whose stored values are weighted around it or filled, are rebuilt as a
    reader of the dataset gets them and summed exactly.
    """
    count = len(images)
    sums = np.empty((count, channels), dtype=np.float64)
    squares = np.empty((count, channels), dtype=np.float64)
    fine = fine_channels(coarse.grids, channels)
    sums[:, fine], squares[:, fine] = _stored_sample_sums(images)
    for grid_channels, grid_sums, grid_squares in interpolated_sums(coarse, images.shape[-1]):
        sums[:, grid_channels], squares[:, grid_channels] = grid_sums, grid_squares
    exact = near_nodata(coarse)
    if exact.any():
        coarse_channels = [c for grid in coarse.grids for c in grid.channels]
        rebuilt = rebuild_samples(images[exact], coarse_subset(coarse, exact), channels)
        sums[np.ix_(exact, coarse_channels)], squares[np.ix_(exact, coarse_channels)] = _stored_sample_sums(
            rebuilt[:, coarse_channels])
    return sums, squares


def _physical_sample_sums(batch: SampleSet, part: slice) -> tuple[np.ndarray, np.ndarray]:
    """Per sample and channel, the sum of physical values and of their squares (float64, (n, C) each).

    Sums are taken over the stored values once (:func:`_stored_sample_sums`: exact for integer sources
    up to 16 bits) and the per-channel scaling is applied to the sums (sum(s*x+o) = s*sum(x) + o*n, and
    likewise for squares): one pass over the pixels instead of a float32 physical copy summed per group,
    so only the final scaling rounds; per-sample sums also make the totals independent of batching.
    """
    if batch.windows:  # statistics of what the network sees: the windowed channels (float32, as the model)
        windowed = apply_windows(batch.physical(part), batch.windows).astype(np.float64)
        flat = windowed.reshape(windowed.shape[0], windowed.shape[1], -1)
        return flat.sum(axis=2), np.einsum("ijk,ijk->ij", flat, flat)
    images = np.asarray(batch.images[part])
    if batch.fine_only:
        sums, squares = _patch_sample_sums(images, coarse_subset(batch.coarse, part), len(batch.channels))
    else:
        sums, squares = _stored_sample_sums(images)
    if batch.scaling is None:
        return sums, squares
    # The float32 constants of SampleSet.physical (what training sees), not the float64 ones given.
    scale = np.array([s for s, _ in batch.scaling], dtype=np.float32).astype(np.float64)
    offset = np.array([o for _, o in batch.scaling], dtype=np.float32).astype(np.float64)
    pixels = int(np.prod(images.shape[2:]))
    return (scale * sums + offset * pixels,
            scale**2 * squares + 2 * scale * offset * sums + offset**2 * pixels)


@dataclass(frozen=True)
class UnsplitWrite:
    """Samples of one source as stored before any split (see :meth:`_StreamingWriter.finish_unsplit`).

    ``rows`` holds the manifest columns except ``split``; ``channels`` is empty, and ``stored_dtype``
    None, when the source yielded no batch or no sample at all.
    """

    rows: dict[str, list]
    task: str
    channels: tuple[Channel, ...]
    class_names: tuple[str, ...]
    scaling: tuple[tuple[float, float], ...] | None
    stored_dtype: str | None
    windows: tuple[WindowChannel, ...] | None
    sample_shape: tuple[int, ...] | None
    chunk_samples: int
    chunks: dict[str, tuple[str, ...]]
    named_samples: bool
    dropped: dict[str, int]
    provenance: dict[str, str]
    quarantine: list[dict[str, str]]
    coarse_grids: tuple[CoarseGrid, ...] = ()
    coarse_fill: tuple[float, ...] = ()


def _without_samples(batch: SampleSet) -> SampleSet:
    """``batch`` with its metadata (channels, classes, task, scaling, source, sample shape) and no sample."""
    def empty(values):
        return None if values is None else np.asarray(values)[:0].copy()

    return replace(batch, images=np.empty((0, *_sample_shape(batch)), dtype=batch.images.dtype),
                   labels=empty(batch.labels), groups=empty(batch.groups), locations=empty(batch.locations),
                   sample_ids=empty(batch.sample_ids), coarse=None)


class _StreamingWriter:
    """Appends a reader's batches to the stored arrays and keeps what the end of the write needs.

    One source by default (a reader's stream). With ``several_sources`` the batches may come from
    several sources one after another (the combine step of a many-source ingest); everything else must
    still agree, and a disagreement names both sources. Without ``statistics`` the per-group sums are
    not kept (a per-source part is split and normalised only once combined).
    """

    _CONSISTENT = ("source", "channels", "class_names", "task", "scaling", "windows")

    def __init__(self, files: DatasetFiles, task_type: str, several_sources: bool = False, statistics: bool = True):
        keep_freed_memory_for_reuse()  # a chunk's buffers serve the next chunk (see tasks.allocator)
        self.files = files
        self.default_task = task_type
        self.several_sources = several_sources
        self.statistics = statistics
        self.sources: dict[str, dict[str, str]] = {}
        """Each source (printable) in order of arrival, with its own provenance."""
        self.first: SampleSet | None = None
        self.images: ChunkedArrayWriter | None = None
        self.labels: ChunkedArrayWriter | None = None
        self.sample_shape: tuple[int, ...] | None = None
        """Of the samples as read (``images`` holds fewer channels when some are stored coarse)."""
        self.coarse_layout: tuple[tuple[CoarseGrid, ...], tuple[float, ...]] = ((), ())
        self.coarse_arrays: dict[str, ChunkedArrayWriter] = {}
        self._fine_arrays: ReusableArrays | None = None
        """The fine channels of each batch, stored apart from its coarse ones (see :meth:`_stored_images`)."""
        self.group = None
        self.rows: dict[str, list] = {column: [] for column in MANIFEST_COLUMNS if column != "split"}
        self.labelled: list[bool] = []
        self.dropped: dict[str, int] = {}
        self.quarantine: list[dict[str, str]] = []
        self.labelled_totals: dict[str, _GroupTotals] = {}
        self.all_totals: _GroupTotals | None = None
        self._sums_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitrail-sums")
        self._sums_in_flight: deque[Future] = deque()

    @property
    def task(self) -> str:
        return (self.first.task if self.first is not None else None) or self.default_task

    def add(self, batch: SampleSet) -> None:
        self._check_batch(batch)
        for reason, count in batch.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + int(count)
        self.sources.setdefault(printable_path(batch.source), {}).update(
            {key: printable_path(value) for key, value in batch.provenance.items()})
        for entry in batch.quarantine:
            entry = {key: printable_path(value) for key, value in entry.items()}
            if entry not in self.quarantine:
                self.quarantine.append(entry)
        if len(batch.images) == 0:
            return
        if self.images is None:
            self._create_arrays(batch)
        self.images.append(self._stored_images(batch))
        if self.coarse_arrays:
            for name, array in stored_arrays(batch.coarse).items():
                self.coarse_arrays[name].append(array)
        if self.labels is not None:
            self.labels.append(np.asarray(batch.labels, dtype=LABEL_DTYPES[self.task]))
        self._add_rows(batch)
        if self.statistics:
            # Summed on a thread of their own while this one cuts the next batch (numpy's sums release the
            # GIL); added to the group totals here, in batch order, so the totals do not depend on timing.
            while len(self._sums_in_flight) >= BATCHES_IN_FLIGHT:
                self._add_totals(self._sums_in_flight.popleft().result())
            self._sums_in_flight.append(self._sums_pool.submit(self._batch_totals, batch))

    def _finish_totals(self) -> None:
        while self._sums_in_flight:
            self._add_totals(self._sums_in_flight.popleft().result())
        self._sums_pool.shutdown()

    @property
    def provenance(self) -> dict[str, str]:
        """Facts about the sources: as read for one source; for several, a fact on which they differ is a
        JSON object by source (nothing of one source is lost or passed off as another's)."""
        if len(self.sources) <= 1:
            return dict(next(iter(self.sources.values()), {}))
        merged: dict[str, str] = {}
        for key in dict.fromkeys(key for facts in self.sources.values() for key in facts):
            values = {source: facts[key] for source, facts in self.sources.items() if key in facts}
            same = len(values) == len(self.sources) and len(set(values.values())) == 1
            merged[key] = next(iter(values.values())) if same else json.dumps(values, sort_keys=True)
        return merged

    def abandon(self) -> None:
        """Stop the arrays' background stores after a failure (what is written is then discarded)."""
        for array in self._arrays():
            array.abandon()
        for job in self._sums_in_flight:
            job.cancel()
        self._sums_pool.shutdown(wait=True, cancel_futures=True)

    def _close_arrays(self) -> None:
        """Close every array at once: each ends by syncing its files to disk, which the file system then
        commits together (one after another they took half a second at the end of a full-tile ingest)."""
        arrays = self._arrays()
        with ThreadPoolExecutor(max_workers=max(1, len(arrays)), thread_name_prefix="vitrail-close") as pool:
            for job in [pool.submit(array.close) for array in arrays]:
                job.result()

    def _arrays(self) -> list[ChunkedArrayWriter]:
        return [a for a in (self.images, self.labels, *self.coarse_arrays.values()) if a is not None]

    def _check_batch(self, batch: SampleSet) -> None:
        if self.first is None:
            # Its metadata only: the batch itself would keep a whole batch of pixels in memory until the end.
            self.first = _without_samples(batch)
            self.coarse_layout = batch.coarse.layout if batch.coarse is not None else ((), ())
            if LABEL_RANKS.get(self.task) != batch.labels.ndim:
                raise DatasetError(f"{printable_path(batch.source)}: labels of shape {batch.labels.shape} do not fit "
                                   f"task {self.task!r}")
            return
        for name in self._CONSISTENT:
            if getattr(batch, name) == getattr(self.first, name) or (name == "source" and self.several_sources):
                continue
            if batch.source != self.first.source:
                raise DatasetError(f"sources {printable_path(self.first.source)} and {printable_path(batch.source)} "
                                   f"disagree on {name} ({getattr(self.first, name)!r} against "
                                   f"{getattr(batch, name)!r}); ingest them as separate datasets, or give both the "
                                   "same channels and classes")
            raise DatasetError(f"{printable_path(self.first.source)}: sample batches disagree on {name} "
                               f"({getattr(self.first, name)!r} then {getattr(batch, name)!r})")
        if (batch.coarse.layout if batch.coarse is not None else ((), ())) != self.coarse_layout \
                and len(batch.images):
            raise DatasetError(f"{printable_path(batch.source)}: sample batches disagree on the channels stored "
                               f"coarse ({self.coarse_layout} then "
                               f"{batch.coarse.layout if batch.coarse is not None else None})")
        if (batch.sample_ids is None) != (self.first.sample_ids is None):
            raise DatasetError(f"{printable_path(self.first.source)}: some sample batches name their samples "
                               "and some do not")
        if LABEL_RANKS.get(self.task) != batch.labels.ndim:
            raise DatasetError(f"{printable_path(batch.source)}: labels of shape {batch.labels.shape} do not fit "
                               f"task {self.task!r}")

    def _create_arrays(self, batch: SampleSet) -> None:
        sample_shape = _sample_shape(batch)
        dtype = np.dtype(np.float32) if batch.scaling is None else np.dtype(batch.images.dtype)
        if dtype.name not in STORED_DTYPES:
            raise DatasetError(f"{printable_path(batch.source)}: samples in {dtype} with a scaling cannot be stored; "
                               f"use one of {', '.join(STORED_DTYPES)}")
        chunk_samples = chunk_samples_for(int(np.prod(sample_shape)) * dtype.itemsize)
        self.sample_shape = sample_shape
        self.group = self.files.zarr_group("w")
        stored_shape = sample_shape
        if batch.coarse is not None and batch.scaling is not None:
            stored_shape = (len(fine_channels(batch.coarse.grids, sample_shape[0])), *sample_shape[1:])
            # Every array chunked alike: chunk i of each holds the same samples (see tasks.coarse_bands).
            for name, array in stored_arrays(batch.coarse).items():
                self.coarse_arrays[name] = ChunkedArrayWriter(self.group, name, array.shape[1:], array.dtype,
                                                              chunk_samples, files=self.files)
        self.images = ChunkedArrayWriter(self.group, "images", stored_shape, dtype, chunk_samples, files=self.files)
        if self.task in LABEL_DTYPES:
            self.labels = ChunkedArrayWriter(self.group, "labels", tuple(batch.labels.shape[1:]),
                                             np.dtype(LABEL_DTYPES[self.task]), chunk_samples, files=self.files)

    def _stored_images(self, batch: SampleSet) -> np.ndarray:
        if _sample_shape(batch) != self.sample_shape:
            raise DatasetError(f"{printable_path(batch.source)}: a batch of samples shaped {_sample_shape(batch)} "
                               f"after samples shaped {self.sample_shape}")
        if batch.scaling is None:
            if batch.fine_only:
                raise DatasetError(f"{printable_path(batch.source)}: samples holding coarse channels as patches "
                                   "only must come in their stored dtype, with a scaling")
            return np.asarray(batch.images, dtype=np.float32)
        if batch.images.dtype != self.images.dtype:
            raise DatasetError(f"{printable_path(batch.source)}: a batch in {batch.images.dtype} after batches in "
                               f"{self.images.dtype}")
        if batch.fine_only:
            return batch.images  # stored as it is (without a staging copy when handed over, see handed_over)
        if self.coarse_arrays:
            channels = fine_channels(self.coarse_layout[0], batch.images.shape[1])
            if self._fine_arrays is None:
                self._fine_arrays = ReusableArrays((len(batch.images), len(channels), *self.sample_shape[1:]),
                                                   batch.images.dtype, keep=BATCHES_IN_FLIGHT + 2)
            fine = self._fine_arrays.take((len(batch.images), len(channels), *self.sample_shape[1:]))
            for j, channel in enumerate(channels):  # plain copies (np.take into ``out`` stages through a buffer)
                fine[:, j] = batch.images[:, channel]
            # Nobody else holds it (a batch-sized one, reused once the store let go): stored without a staging copy.
            fine.flags.writeable = False
            return fine
        return batch.images

    def _add_rows(self, batch: SampleSet) -> None:
        source = printable_path(batch.source)
        labelled = labelled_samples(batch.labels)
        start = len(self.labelled)
        self.labelled.extend(labelled.tolist())
        locations = np.asarray(batch.locations).reshape(len(batch.images), -1)
        rows = [int(v) for v in locations[:, 0]]
        cols = [int(v) for v in locations[:, 1]]
        self.rows["index"].extend(range(start, start + len(batch.images)))
        self.rows["source"].extend([source] * len(batch.images))
        self.rows["row"].extend(rows)
        self.rows["col"].extend(cols)
        if batch.sample_ids is not None:
            self.rows["sample_id"].extend(printable_path(s) for s in batch.sample_ids.tolist())
        else:
            self.rows["sample_id"].extend(f"{source}#{r},{c}" for r, c in zip(rows, cols))
        if self.task == "classification":
            self.rows["label"].extend(int(v) for v in batch.labels)
        else:
            self.rows["label"].extend(1 if v else -1 for v in labelled.tolist())
        self.rows["group"].extend(printable_path(g) for g in np.asarray(batch.groups).tolist())

    def _batch_totals(self, batch: SampleSet) -> list[tuple[str | None, np.ndarray | None, int, np.ndarray | None,
                                                            np.ndarray | None]]:
        """What ``batch`` adds to the running totals, in the order :meth:`_add_totals` adds it (on the sums thread).

        Per part of the batch (parts bound the float64 scratch): ``(None, None, pixels, sums, squares)`` for
        the totals of all samples, then per group ``(group, class counts, pixels, sums, squares)`` of its
        labelled members (sums None when it has none). Everything but the additions is done here, off the
        thread that reads and stores the samples.
        """
        classes = len(batch.class_names)
        sample_floats = int(np.prod(_sample_shape(batch)))
        step = max(1, _STATS_SCRATCH_BYTES // (8 * sample_floats))
        labelled = labelled_samples(batch.labels)
        groups = np.array([printable_path(g) for g in np.asarray(batch.groups).tolist()])
        pixels = int(np.prod(batch.images.shape[2:]))
        deltas: list = []
        for start in range(0, len(batch.images), step):
            part = slice(start, start + step)
            sums, squares = _physical_sample_sums(batch, part)
            deltas.append((None, None, pixels * len(sums), sums.sum(axis=0), squares.sum(axis=0)))
            for group in dict.fromkeys(groups[part].tolist()):
                in_group = groups[part] == group
                members = in_group & labelled[part]
                counts = self._class_counts(batch.labels[part][in_group], classes)
                if members.any():
                    deltas.append((group, counts, pixels * int(members.sum()), sums[members].sum(axis=0),
                                   squares[members].sum(axis=0)))
                else:
                    deltas.append((group, counts, 0, None, None))
        return deltas

    def _add_totals(self, deltas: list[tuple[str | None, np.ndarray | None, int, np.ndarray | None,
                                             np.ndarray | None]]) -> None:
        """Add one batch's :meth:`_batch_totals` to the running totals (in batch order: totals do not depend on timing)."""
        channels = len(self.first.windows) if self.first.windows else len(self.first.channels)
        classes = len(self.first.class_names)
        if self.all_totals is None:
            self.all_totals = _GroupTotals(channels, classes)
        for group, counts, pixels, sums, squares in deltas:
            totals = self.all_totals if group is None else self.labelled_totals.setdefault(
                group, _GroupTotals(channels, classes))
            if counts is not None:
                totals.classes += counts
            if sums is not None:
                totals.pixels += pixels
                totals.sums += sums
                totals.squares += squares

    def _class_counts(self, labels: np.ndarray, classes: int) -> np.ndarray:
        """Samples per class (classification), positives per finding (multilabel), pixels per class (segmentation)."""
        if self.task == "multilabel":
            return (labels == 1).sum(axis=0).astype(np.int64)
        values = np.asarray(labels).reshape(-1)
        values = values[(values >= 0) & (values < classes)]
        return np.bincount(values.astype(np.int64), minlength=classes)[:classes]

    def finish_unsplit(self) -> UnsplitWrite:
        """Close the arrays and return what was written, without splits or statistics (a per-source part)."""
        self._finish_totals()
        self._close_arrays()
        first = self.first
        return UnsplitWrite(
            rows={column: list(values) for column, values in self.rows.items()}, task=self.task,
            channels=first.channels if first is not None else (),
            class_names=first.class_names if first is not None else (),
            scaling=tuple((float(s), float(o)) for s, o in first.scaling) if first is not None and first.scaling
            else None,
            stored_dtype=self.images.dtype.name if self.images is not None else None,
            windows=first.windows if first is not None else None,
            sample_shape=self.sample_shape,
            chunk_samples=self.images.chunk_samples if self.images is not None else 0,
            chunks={array.name: tuple(array.digests) for array in self._arrays()},
            named_samples=first is not None and first.sample_ids is not None,
            dropped=dict(self.dropped), provenance=self.provenance, quarantine=list(self.quarantine),
            coarse_grids=self.stored_coarse[0], coarse_fill=self.stored_coarse[1])

    @property
    def stored_coarse(self) -> tuple[tuple[CoarseGrid, ...], tuple[float, ...]]:
        """The coarse grids and fills the arrays were written with (none when every channel is in ``images``)."""
        return self.coarse_layout if self.coarse_arrays else ((), ())

    def finish(self, domain: str, params: SplitParams, where: str) -> DatasetInfo:
        """Close the arrays, assign splits, write manifest and quarantine list; return the metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._finish_totals()
        if self.first is None:
            raise DatasetError(f"{where}: no samples were read (the reader yielded no sample batches)")
        if self.images is None:
            raise DatasetError(f"{printable_path(self.first.source)}: no samples left after filtering "
                               f"(dropped: {self.dropped})")
        self._close_arrays()
        groups = np.array(self.rows["group"])
        labelled = np.array(self.labelled, dtype=bool)
        if labelled.any():
            split_of = assign_splits(groups[labelled], params)
            splits = np.array([split_of.get(g, "unlabelled") for g in groups.tolist()], dtype=object)
            splits[~labelled] = "unlabelled"
        else:
            split_of = {}
            splits = np.full(len(groups), "test", dtype=object)
        splits = splits.astype(str)
        check_no_group_leak(groups[splits != "unlabelled"], splits[splits != "unlabelled"], where)
        if labelled.any() and not all((splits == s).any() for s in SPLITS if s != "val" or params.val_fraction > 0):
            raise DatasetError(f"{printable_path(self.first.source)}: a split came out empty; add data or lower "
                               "the block size")
        rows = {**self.rows, "split": splits.tolist()}
        rows = {column: rows[column] for column in MANIFEST_COLUMNS}
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(rows), sink)
        self.files.write_bytes("manifest.parquet", sink.getvalue().to_pybytes())

        mean, std = self._train_statistics(split_of)
        chunks = {array.name: list(array.digests) for array in self._arrays()}
        first = self.first
        scaling = tuple((float(s), float(o)) for s, o in first.scaling) if first.scaling is not None else None
        info = DatasetInfo(
            digest=_dataset_digest(rows, first.channels, first.class_names, scaling, self.images.dtype.name, chunks,
                                   first.windows, self.stored_coarse),
            domain=domain, task=self.task, channels=first.channels, class_names=first.class_names,
            tile_size=int(self.sample_shape[-1]), sources=tuple(self.sources),
            split_counts={s: int((splits == s).sum()) for s in (*SPLITS, "unlabelled")},
            class_counts=self._split_class_counts(split_of), dropped=dict(self.dropped),
            channel_mean=mean, channel_std=std, provenance=dict(self.provenance), quarantined=len(self.quarantine),
            stored_dtype=self.images.dtype.name, scaling=scaling, chunk_samples=self.images.chunk_samples,
            chunks={name: tuple(values) for name, values in chunks.items()}, windows=first.windows,
            coarse_grids=self.stored_coarse[0], coarse_fill=self.stored_coarse[1])
        self.files.write_bytes(QUARANTINE_FILE, json.dumps(self.quarantine, indent=2).encode())
        return info

    def _train_statistics(self, split_of: dict[str, str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # Per-channel statistics from the training split only, so test pixels never shape normalisation.
        train = _GroupTotals(len(self.first.windows or self.first.channels), len(self.first.class_names))
        for group, totals in self.labelled_totals.items():
            if split_of.get(group) == "train":
                train.merge(totals)
        if train.pixels == 0:  # an unlabelled dataset: everything is test, normalise by all of it
            train = self.all_totals
        mean = train.sums / train.pixels
        std = np.sqrt(np.maximum(train.squares / train.pixels - mean**2, 0.0))
        std = np.where(std < 1e-6, 1.0, std)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def _split_class_counts(self, split_of: dict[str, str]) -> dict[str, dict[str, int]]:
        totals = {split: np.zeros(len(self.first.class_names), dtype=np.int64) for split in SPLITS}
        for group, group_totals in self.labelled_totals.items():
            split = split_of.get(group, "test" if not split_of else None)
            if split in totals:
                totals[split] += group_totals.classes
        return {split: {name: int(count) for name, count in zip(self.first.class_names, totals[split].tolist())}
                for split in SPLITS}

    def summary(self, source: str | None = None) -> SampleSet:
        """A sample-free SampleSet carrying the merged metadata (for a domain's ingest reports).

        With ``source`` (one of :attr:`sources`) it carries that source's own provenance instead.
        """
        first = self.first
        provenance = self.provenance if source is None else dict(self.sources[source])
        shape = self.sample_shape if self.sample_shape is not None else first.images.shape[1:]
        label_shape = {"multilabel": (0, len(first.class_names)), "segmentation": (0, *shape[1:])}
        return SampleSet(images=np.zeros((0, *shape), dtype=np.float32),
                         labels=np.zeros(label_shape.get(self.task, (0,)), dtype=np.int64),
                         groups=np.array([], dtype=str), locations=np.zeros((0, 2), dtype=np.int64),
                         source=first.source if source is None else source, channels=first.channels,
                         class_names=first.class_names, dropped=dict(self.dropped), provenance=provenance,
                         task=first.task,
                         quarantine=list(self.quarantine), scaling=first.scaling, windows=first.windows)


def _as_batches(samples: SampleSet | Iterable[SampleSet]) -> Iterable[SampleSet]:
    return [samples] if isinstance(samples, SampleSet) else samples


def _write_contents(samples: SampleSet | Iterable[SampleSet], domain: str, task_type: str, files: DatasetFiles,
                    params: SplitParams, where: str,
                    reports: Callable[[SampleSet, Path], object] | None,
                    several_sources: bool = False, quarantine: Sequence[dict[str, str]] = ()) -> DatasetInfo:
    """Stream the batches into ``files``, then manifest, quarantine list, reports and (last) ``dataset.json``."""
    writer = _StreamingWriter(files, task_type, several_sources=several_sources)
    writer.quarantine.extend(dict(entry) for entry in quarantine)
    try:
        for batch in _as_batches(samples):
            writer.add(batch)
    except BaseException:
        writer.abandon()  # no background store may still write into a folder about to be removed
        raise
    info = writer.finish(domain, params, where)
    if reports is not None:
        # One source: its reports beside dataset.json. Several: each source's own under sources/<i>/, i its
        # position in DatasetInfo.sources (a report such as a de-identification audit is per source).
        summaries = ([(writer.summary(), "")] if len(writer.sources) <= 1 else
                     [(writer.summary(source), f"sources/{i:03d}/") for i, source in enumerate(writer.sources)])
        for summary, prefix in summaries:
            if files.remote or prefix:  # domain code writes into a folder: copy what it wrote
                with tempfile.TemporaryDirectory() as scratch:
                    reports(summary, Path(scratch))
                    for path in sorted(Path(scratch).rglob("*")):
                        if path.is_file():
                            files.write_bytes(prefix + path.relative_to(scratch).as_posix(), path.read_bytes())
            else:
                reports(summary, Path(files.location))
    # dataset.json last: a folder or prefix holding it holds everything it describes.
    files.write_bytes("dataset.json", json.dumps(asdict(info), indent=2).encode())
    return info


def write_dataset(samples: SampleSet | Iterable[SampleSet], domain: str, task_type: str, out_dir: Path | str,
                  params: SplitParams, reports: Callable[[SampleSet, Path], object] | None = None, *,
                  several_sources: bool = False, quarantine: Sequence[dict[str, str]] = ()) -> DatasetInfo:
    """Append ``samples`` (one SampleSet or a reader's stream of batches) to chunked storage at ``out_dir``.

    Batches follow the streaming contract of :class:`domains.SampleSet` (one source; same channels,
    classes, task and scaling; dropped counts add up, provenance and quarantine merge). Images given
    with a ``scaling`` are stored in their own dtype; images without one are stored as float32.
    Only labelled samples are split for training; an unlabelled sample set is written entirely as the
    ``test`` split with label -1, so prediction-only datasets keep the same format. The task is the
    samples' own when they name one, else ``task_type`` (the domain's default).

    With ``several_sources`` the batches may come from several sources in turn (a many-source ingest's
    combine step): channels, classes, task and scaling must still agree, splits are assigned over the
    groups of all of them, ``DatasetInfo.sources`` lists each, and ``reports`` runs once per source.
    ``quarantine`` adds entries for what was left out before the write (e.g. a whole unreadable source).

    ``out_dir`` is a local folder or an fsspec URL (``s3://bucket/prefix``). A local dataset is written
    into a hidden sibling folder and renamed into place when complete; ``reports`` (a domain's ingest
    reports) is called with the merged metadata and that folder before the rename. An existing dataset
    at ``out_dir`` is replaced; a non-empty folder or prefix that is not a dataset is refused.

    Raises:
        DatasetError: nothing to write, labels that do not fit the task, batches that disagree, splits
            that cannot be filled, or ``out_dir`` holding something other than a dataset.
    """
    if is_url(out_dir):
        return _write_remote(samples, domain, task_type, as_location(out_dir), params, reports, several_sources,
                             quarantine)
    out_dir = Path(os.path.abspath(out_dir))
    if not out_dir.name or out_dir == out_dir.parent:
        raise DatasetError(f"{out_dir}: a dataset needs a folder of its own, not the file system root")
    if is_partial_dataset(out_dir):
        raise DatasetError(f"{out_dir}: names the temporary folder of an unfinished write; choose another name")
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _sweep_abandoned(out_dir)
    partial = out_dir.with_name(f".{out_dir.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    partial.mkdir()
    ensure_inside(out_dir.parent, partial)
    try:
        info = _write_contents(samples, domain, task_type, DatasetFiles(partial), params, str(out_dir), reports,
                               several_sources, quarantine)
        _publish(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return info


def _write_remote(samples: SampleSet | Iterable[SampleSet], domain: str, task_type: str, url: str,
                  params: SplitParams, reports: Callable[[SampleSet, Path], object] | None,
                  several_sources: bool = False, quarantine: Sequence[dict[str, str]] = ()) -> DatasetInfo:
    """Write under an object-store prefix: marked while written, ``dataset.json`` last (no atomic rename there)."""
    files = DatasetFiles(url)
    keys = files.keys()
    if keys and "dataset.json" not in keys and WRITING_MARK not in keys:
        raise DatasetError(f"{url}: holds files and is not a Vitrail dataset; refusing to replace what it holds: "
                           "choose a new or empty prefix")
    files.remove("dataset.json")  # first of all: from here on the prefix is not read as a dataset
    files.clear()
    files.write_bytes(WRITING_MARK, json.dumps({"pid": os.getpid()}).encode())
    try:
        info = _write_contents(samples, domain, task_type, files, params, url, reports, several_sources, quarantine)
    except BaseException:
        files.clear()
        raise
    files.remove(WRITING_MARK)
    return info


def dataset_location(location: Path | str) -> str:
    """A dataset location as later stages should be given it: an absolute local path, or the URL as is."""
    return as_location(location).rstrip("/") if is_url(location) else os.path.realpath(location)


def _dataset_files(path: Path | str) -> DatasetFiles:
    if is_partial_dataset(path):
        raise DatasetError(f"{path}: an unfinished dataset write (the ingest was interrupted); rerun the ingest "
                           "and use the folder it names")
    return DatasetFiles(path)


def read_dataset_info(path: Path | str) -> DatasetInfo:
    """Read only the metadata of the dataset at ``path`` (a folder or URL; cheap: no chunks are touched)."""
    files = _dataset_files(path)
    if not files.exists("dataset.json"):
        if files.remote and files.exists(WRITING_MARK):
            raise DatasetError(f"{path}: an unfinished dataset write (the ingest was interrupted or is running); "
                               "rerun the ingest")
        raise DatasetError(f"{path}: not a Vitrail dataset (no dataset.json); run the ingest flow first")
    try:
        return DatasetInfo.from_json(json.loads(files.read_bytes("dataset.json")))
    except (ValueError, TypeError, KeyError) as error:
        raise DatasetError(f"{files.describe('dataset.json')}: unreadable dataset metadata ({error})") from error


def _read_manifest(files: DatasetFiles, info: DatasetInfo, verify: bool) -> dict[str, list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        manifest = pq.read_table(pa.BufferReader(files.read_bytes("manifest.parquet"))).to_pydict()
    except (OSError, ValueError, pa.ArrowException) as error:
        raise DatasetError(f"{files.describe('manifest.parquet')}: missing or unreadable manifest ({error})") from error
    missing = [column for column in MANIFEST_COLUMNS if column not in manifest]
    if missing:
        raise DatasetError(f"{files.describe('manifest.parquet')}: manifest lacks columns {missing}")
    groups = np.array(manifest["group"])
    split_col = np.array(manifest["split"])
    labelled = split_col != "unlabelled"
    check_no_group_leak(groups[labelled], split_col[labelled], files.location)
    if verify and _dataset_digest(manifest, info.channels, info.class_names, info.scaling, info.stored_dtype,
                                  info.chunks, info.windows, (info.coarse_grids, info.coarse_fill)) != info.digest:
        raise DatasetError(f"{files.describe('manifest.parquet')}: manifest does not match the dataset digest "
                           "(labels, splits or rows were edited after ingest)")
    return manifest


def _open_source(files: DatasetFiles, group, name: str, info: DatasetInfo, samples: int, verify: bool) -> ChunkSource:
    try:
        array = group[name]
    except KeyError as error:
        raise DatasetError(f"{files.describe(name)}: stored array missing") from error
    if int(array.shape[0]) != samples or len(info.chunks.get(name, ())) != -(-samples // int(array.chunks[0])):
        raise DatasetError(f"{files.describe(name)}: holds {array.shape[0]} samples in chunks of {array.chunks[0]}, "
                           f"the manifest {samples} samples and dataset.json {len(info.chunks.get(name, ()))} chunks")
    return ChunkSource(files, array, name, info.chunks[name], verify=verify)


def _open(path: Path | str, verify: bool) -> tuple[DatasetFiles, DatasetInfo, dict[str, list], dict[str, ChunkSource]]:
    info = read_dataset_info(path)
    files = _dataset_files(path)
    if info.format_version != FORMAT_VERSION:
        raise DatasetError(f"{path}: dataset format {info.format_version} is not read by this version of Vitrail "
                           f"(format {FORMAT_VERSION}: chunked, native dtype); re-ingest the source")
    manifest = _read_manifest(files, info, verify)
    try:
        group = files.zarr_group("r")
    except Exception as error:  # zarr raises several types for a missing or damaged group
        raise DatasetError(f"{files.describe('zarr.json')}: unreadable array store ({error})") from error
    sources = {name: _open_source(files, group, name, info, len(manifest["index"]), verify) for name in info.chunks}
    return files, info, manifest, sources


def samples_source(sources: dict[str, ChunkSource], grids: tuple[CoarseGrid, ...], fill: tuple[float, ...],
                   channels: int) -> ChunkSource | RebuiltSource:
    """Where a dataset's (or part's) samples are read from: ``images`` as stored, or rebuilt with the coarse arrays."""
    return RebuiltSource(sources, grids, fill, channels) if grids else sources["images"]


def _read_all(source: ChunkSource) -> np.ndarray:
    return np.concatenate([source.chunk(i) for i in range(source.num_chunks)])


def load_dataset(path: Path | str, verify: bool = True) -> Dataset:
    """Open a dataset lazily: metadata and manifest are read (and checked); pixels only when indexed.

    With ``verify`` the manifest is checked against the digest now and each chunk against its own
    digest the first time it is decoded (a mismatch raises :class:`DatasetError` naming the chunk).
    """
    _, info, manifest, sources = _open(path, verify)
    groups = np.array(manifest["group"])
    split_col = np.array(manifest["split"])
    index = np.asarray(manifest["index"], dtype=np.int64)
    if info.task == "multilabel":  # (N, K) int8: small, read now
        all_labels = _read_all(sources["labels"]).astype(np.int64)
    image_source = samples_source(sources, info.coarse_grids, info.coarse_fill, len(info.channels))
    splits: dict[str, Split] = {}
    for split in (*SPLITS, "unlabelled"):
        members = np.flatnonzero(split_col == split)
        if len(members) == 0:
            continue
        images = LazySamples(image_source, index[members], info.scaling, np.float32)
        if info.task == "segmentation":
            labels = LazySamples(sources["labels"], index[members], None, np.int64)
        elif info.task == "multilabel":
            labels = all_labels[index[members]]
        else:
            labels = np.asarray(manifest["label"], dtype=np.int64)[members]
        splits[split] = Split(images=images, labels=labels, groups=groups[members],
                              sample_ids=np.asarray(manifest["sample_id"], dtype=object)[members])
    return Dataset(path=as_location(path) if is_url(path) else Path(path), info=info, splits=splits)


@dataclass(frozen=True)
class VerificationReport:
    """What ``vitrail dataset verify`` checked."""

    location: str
    digest: str
    samples: int
    chunks: int
    stored_bytes: int

    def line(self) -> str:
        return (f"{self.location}: ok, {self.samples} samples, {self.chunks} chunks and the manifest match digest "
                f"{self.digest[:12]} ({self.stored_bytes / 2**20:.1f} MiB stored)")


def verify_dataset(path: Path | str) -> VerificationReport:
    """Check the manifest and every chunk of a dataset against their digests.

    Raises:
        DatasetError: naming the first file or chunk that is missing, damaged or edited.
    """
    files, info, manifest, sources = _open(path, verify=True)
    chunks = 0
    for source in sources.values():
        chunks += source.verify_all()
    return VerificationReport(location=files.location, digest=info.digest, samples=len(manifest["index"]),
                              chunks=chunks, stored_bytes=files.total_bytes())


def build_dataset(domain_name: str, request: IngestRequest, out_dir: Path | str, params: SplitParams) -> DatasetInfo:
    """Read a source with its domain's reader and write it as a dataset (the ingest stage's work)."""
    domain = get_domain(domain_name)
    if request.block_size is None:
        request = replace(request, block_size=domain.default_block_size)
    # The writer stores coarse channels as patches: read them so, without upsampling them first.
    return write_dataset(domain.read_samples(replace(request, coarse_as_patches=True)), domain.name, domain.task,
                         out_dir, params, reports=domain.write_ingest_reports)


build_dataset_task = task(build_dataset, name="build-dataset", cache_policy=NONE)
