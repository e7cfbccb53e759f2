"""Declarative description of an imaging domain: what the rest of Vitrail needs to know about it.

Everything here is plain data (frozen dataclasses) plus callables supplied by the domain. This module
must stay light: no torch, prefect, mlflow or format readers are imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Protocol

import numpy as np

TaskType = Literal["classification", "multilabel", "segmentation"]
"""What a sample's label is.

- ``classification``: one class id per sample, labels shape (N,), -1 for an unlabelled sample.
- ``multilabel``: K independent 0/1 findings per sample, labels shape (N, K) int8; an unlabelled
  sample is a row of -1.
- ``segmentation``: a class id per pixel, labels shape (N, H, W) int16, -1 for pixels to ignore; an
  unlabelled sample is all -1.
"""


# Dimensions of a task's label array: (N,), (N, K) or (N, H, W).
LABEL_RANKS = {"classification": 1, "multilabel": 2, "segmentation": 3}


def labelled_samples(labels: np.ndarray) -> np.ndarray:
    """Boolean (N,) mask of samples that carry any label, whatever the task's label shape."""
    if labels.ndim == 1:
        return labels >= 0
    return (labels.reshape(len(labels), -1) >= 0).any(axis=1)


def printable_path(path: Path | str) -> str:
    """A path as text that any terminal, log handler or JSON encoder accepts.

    Linux file names are bytes; Python keeps the ones that are not UTF-8 as lone surrogates, which
    make ``print``, log shipping and JSON encoders fail. They are shown as ``\\xNN`` escapes instead.
    """
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class DomainInputError(ValueError):
    """Bad input for a domain reader; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{printable_path(path)}: {printable_path(problem)}")


Scaling = tuple[tuple[float, float], ...] | None
"""Per channel ``(scale, offset)`` of values: physical = value * scale + offset; None: values are physical.

A dataset records the scaling of its stored samples (:attr:`SampleSet.scaling`) and a model the scaling of
the values it takes (its raw input units, ``input_scaling``): a model trained on a dataset takes the
dataset's stored units, its normalisation folded into its own buffers.
"""


def convert_units(values: np.ndarray, source: Scaling, target: Scaling) -> np.ndarray:
    """``values`` (N, C, ...) under the ``source`` scaling, as float32 under the ``target`` scaling.

    Both name a per-channel affine map to physical units (None: already physical), so the result is
    ``((values * s_src + o_src) - o_tgt) / s_tgt``. When both are the same the values are only cast to
    float32, which is exact for the integers a source stores (uint8, int16, uint16): a raw-in model fed
    from a source of its own convention sees exactly the stored numbers. Sources of another convention
    (a Sentinel-2 product of another processing baseline, a Landsat scene's own MTL coefficients) go
    through physical units in float64, so a model sees what it was trained on whatever the source wrote.
    """
    values = np.asarray(values)
    if same_scaling(source, target):
        return values.astype(np.float32, copy=False)
    shape = (1, -1) + (1,) * (values.ndim - 2)
    out = values.astype(np.float64)
    if source is not None:
        out = out * np.array([s for s, _ in source]).reshape(shape) + np.array([o for _, o in source]).reshape(shape)
    if target is not None:
        out = (out - np.array([o for _, o in target]).reshape(shape)) / np.array([s for s, _ in target]).reshape(shape)
    return out.astype(np.float32)


def same_scaling(a: Scaling, b: Scaling) -> bool:
    """Whether two scalings are the same map (both None, or the same (scale, offset) per channel)."""
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(float(x) == float(y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


@dataclass(frozen=True)
class Channel:
    """One input channel of a model (a spectral band, a CT window, a stain...)."""

    name: str
    wavelength_nm: float | None = None
    resolution_m: float | None = None


@dataclass(frozen=True)
class WindowChannel:
    """One model channel made inside the model from a stored channel: ``clip((x - low) / (high - low), 0, 1)``.

    ``source`` indexes the stored channels (e.g. the HU plane of a CT slice, or of its neighbour for 2.5D);
    ``low`` and ``high`` are in physical units (HU for CT). A dataset that records windows stores the
    physical quantity (HU) and its model starts with these windows (:class:`tasks.models.WindowLayer`), so
    the window constants are part of the model, not of a reader.
    """

    name: str
    source: int
    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"window {self.name!r}: need finite low < high, got {self.low}, {self.high}")
        if self.source < 0:
            raise ValueError(f"window {self.name!r}: source channel {self.source} is negative")


Windows = tuple[WindowChannel, ...] | None
"""The windows a dataset's model starts with (None: the model takes the stored channels as they are)."""


def apply_windows(physical: np.ndarray, windows: tuple[WindowChannel, ...]) -> np.ndarray:
    """(N, C, ...) physical values as the (N, K, ...) windowed channels ``windows`` make (float32).

    The numpy twin of :class:`tasks.models.WindowLayer` (dataset statistics are computed with it).
    """
    values = np.asarray(physical, dtype=np.float32)
    out = [np.clip((values[:, w.source] - np.float32(w.low)) / np.float32(w.high - w.low), 0.0, 1.0)
           for w in windows]
    return np.stack(out, axis=1).astype(np.float32, copy=False)


@dataclass(frozen=True)
class IngestRequest:
    """What the ingest stage asks a domain reader for.

    Attributes:
        source: a scene/study/slide path (file or folder) in the domain's on-disk format.
        labels: optional label file aligned with the source (e.g. a class raster).
        tile_size: side of each square sample, in pixels of the working grid.
        stride: step between neighbouring samples, in pixels (``stride < tile_size`` overlaps).
        block_size: side of the leakage block in pixels; samples never straddle two blocks (None: the
            domain's ``default_block_size``, filled in by the ingest stage before the reader sees it).
        max_nodata_fraction: samples with more nodata than this are dropped and counted.
        channels: explicit channel list (e.g. band names of a multi-band GeoTIFF), or None to infer.
        sensor: sensor name whose band table applies, or None to infer from file names.
        class_names: names for label values 0..K-1, or None for the domain's defaults.
        batch_samples: the most samples a streaming reader yields in one :class:`SampleSet`; with the
            reader's own working buffers it bounds ingest memory, whatever the size of the source.
        mpp: microns per pixel of the source, for sources whose metadata states none (a whole-slide image
            without a resolution is refused otherwise); it overrides the metadata and is recorded as given
            by the user. None: read it from the metadata. Domains without a micron scale ignore it.
        tile_mpp: microns per pixel samples are cut at (histopathology: tiles are resampled from the best
            pyramid level to exactly this), None for the domain's default. Other domains ignore it.
        group_by: the leakage group of each sample. histopathology: 'patient' (default) or 'site' (every
            slide of a site shares a split; a patient seen at two sites is refused); other domains ignore it.
        cloud_mask: how clouds and their shadows are found (satellite: 'none', 'qa' the sensor's quality
            layer, 'model' an offline segmentation model, 'auto' either); other domains ignore it.
        max_cloud_fraction: samples with a larger share of cloud/shadow pixels are dropped and counted.
        task: the task asked of a domain that offers several from the same labels (satellite: 'segmentation'
            learns a class per pixel from the class raster, 'classification' one per tile); None: the
            domain's default. Domains with one task ignore it.
        coarse_as_patches: hand channels that are stored at their own, coarser resolution (see
            :class:`CoarsePatches`) only as their patches, leaving them out of ``images``: what a dataset
            writer stores, read without upsampling them first (set by the ingest stage). Readers without
            coarse channels ignore it.
    """

    source: Path
    labels: Path | None = None
    tile_size: int = 32
    stride: int = 32
    block_size: int | None = 128
    max_nodata_fraction: float = 0.5
    channels: tuple[str, ...] | None = None
    sensor: str | None = None
    class_names: tuple[str, ...] | None = None
    batch_samples: int = 256
    mpp: float | None = None
    tile_mpp: float | None = None
    group_by: str | None = None
    cloud_mask: str = "none"
    max_cloud_fraction: float = 1.0
    task: str | None = None
    coarse_as_patches: bool = False


@dataclass(frozen=True)
class CoarseGrid:
    """Channels stored on their own grid, ``factor`` times coarser than the samples' (Sentinel-2's 20 m and 60 m
    bands beside its 10 m ones): each sample keeps the patch of coarse pixels that upsampling it reads, at most
    ``side`` pixels a side, instead of the upsampled channel (a quarter or a thirty-sixth of the pixels)."""

    factor: int
    channels: tuple[int, ...]
    """Positions of these channels among the samples' channels."""
    side: int


@dataclass(frozen=True)
class CoarsePatches:
    """What rebuilds a batch's coarse channels bit for bit: per grid, each sample's patch and where the sample
    lies in it; and where every channel of a sample holds data (elsewhere a channel holds its ``fill``).

    ``patches[g]`` is (N, len(grids[g].channels), side, side) in the images' dtype, ``patch_valid[g]`` the same
    shape, bool: where the coarse pixel holds data (padding counts as valid). ``spans[g]`` is (N, 4) int: the patch's rows and columns
    in use (the rest is padding) and the sample's first fine row and column counted from the patch's first
    coarse pixel (``factor`` fine pixels each). ``valid`` is (N, H, W) bool, ``fill`` one stored value per
    channel of the samples. The samples' ``images`` hold either every channel, these upsampled, or (read
    with :attr:`IngestRequest.coarse_as_patches`) only the channels on no coarse grid, in channel order
    (:attr:`SampleSet.fine_only`); a dataset stores the patches either way.
    """

    grids: tuple[CoarseGrid, ...]
    patches: tuple[np.ndarray, ...]
    patch_valid: tuple[np.ndarray, ...]
    spans: tuple[np.ndarray, ...]
    valid: np.ndarray
    fill: tuple[float, ...]

    @property
    def layout(self) -> tuple[tuple[CoarseGrid, ...], tuple[float, ...]]:
        """What every batch of one source shares: the grids and the fill values."""
        return self.grids, self.fill


@dataclass
class SampleSet:
    """Samples read from one source, ready to be split and written as a dataset.

    ``images`` have shape (N, C, H, W) (or hold only the channels on no coarse grid, see :attr:`fine_only`).
    They are either already in physical units (float32, ``scaling`` None) or in the source's own dtype (uint8, uint16, int16, float16...) with ``scaling`` giving each
    channel's ``(scale, offset)``: physical = raw * scale + offset (e.g. Sentinel-2 L1C: 1e-4, 0).
    Storing the native dtype keeps datasets near the size of what they sample; :meth:`physical`
    converts. A streaming reader yields several SampleSets for one source (see ``read_samples`` in
    :class:`DomainSpec`): they share ``source``, ``channels``, ``class_names``, ``task`` and
    ``scaling``; their ``dropped`` counts add up and their ``provenance`` and ``quarantine`` merge.
    ``labels`` follow the task's shape (see :data:`TaskType`), -1 marking what is unlabelled.
    ``groups`` names the leakage group of each sample (spatial block, patient, slide): samples of a
    group share a split. ``locations`` gives (row, col) of each sample's top-left corner on the
    working grid (for volumes: slice index and 0). ``dropped`` counts samples that were not kept, by
    reason. ``provenance`` holds small string facts about the source (CRS, transform, sensor) that
    are stored with the dataset. ``task`` overrides the domain's default task when the labels given
    decide it (e.g. radiology: a findings CSV is multilabel, masks are segmentation).
    ``sample_ids`` optionally names each sample (must be unique and free of identifying values); by
    default a sample is named ``<source>#<row>,<col>``. ``quarantine`` lists the files or series of the
    source that were left out, one ``{"item", "reason", "problem"}`` record each (``item`` is the file,
    or its pseudonymous key where names may identify people); the rest of the source was kept.
    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    locations: np.ndarray
    source: str
    channels: tuple[Channel, ...]
    class_names: tuple[str, ...]
    dropped: dict[str, int] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)
    task: TaskType | None = None
    sample_ids: np.ndarray | None = None
    quarantine: list[dict[str, str]] = field(default_factory=list)
    scaling: tuple[tuple[float, float], ...] | None = None
    windows: tuple[WindowChannel, ...] | None = None
    """Windows the model of these samples starts with (see :class:`WindowChannel`); None: no window layer."""
    coarse: CoarsePatches | None = None
    """Coarse channels at their own resolution, for a dataset to store compactly (see :class:`CoarsePatches`)."""

    @property
    def fine_only(self) -> bool:
        """Whether ``images`` leave out the channels held only as coarse patches (see :class:`CoarsePatches`)."""
        return self.coarse is not None and self.images.shape[1] != len(self.channels)

    def _every_channel(self) -> None:
        if self.fine_only:
            raise ValueError(f"{self.source}: these samples hold their coarse channels as patches only; "
                             "rebuild them (tasks.coarse_bands.rebuild_samples) before converting units")

    def physical(self, index: slice | np.ndarray | None = None) -> np.ndarray:
        """Images (all, or ``images[index]``) as float32 in physical units."""
        self._every_channel()
        raw = self.images if index is None else self.images[index]
        if self.scaling is None:
            return np.asarray(raw, dtype=np.float32)
        scale = np.array([s for s, _ in self.scaling], dtype=np.float32).reshape(1, -1, 1, 1)
        offset = np.array([o for _, o in self.scaling], dtype=np.float32).reshape(1, -1, 1, 1)
        return raw.astype(np.float32) * scale + offset

    def in_units(self, target: Scaling, index: slice | np.ndarray | None = None) -> np.ndarray:
        """Images (all, or ``images[index]``) as float32 under the ``target`` scaling (a model's raw units)."""
        self._every_channel()
        raw = self.images if index is None else self.images[index]
        return convert_units(raw, self.scaling, target)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.scaling is not None and len(self.scaling) != len(self.channels):
            raise ValueError(f"{self.source}: scaling has {len(self.scaling)} (scale, offset) pairs for "
                             f"{len(self.channels)} channels")
        coarse_channels = {c for grid in self.coarse.grids for c in grid.channels} if self.coarse is not None else set()
        if self.images.ndim != 4 or self.images.shape[1] not in {len(self.channels),
                                                                 len(self.channels) - len(coarse_channels)}:
            raise ValueError(f"{self.source}: images must be (N, {len(self.channels)}, H, W), got {self.images.shape}")
        if self.windows is not None and (not self.windows or any(w.source >= len(self.channels) for w in self.windows)):
            raise ValueError(f"{self.source}: windows {self.windows} need at least one window and sources among "
                             f"the {len(self.channels)} stored channels")
        for name in ("labels", "groups", "locations", "sample_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{self.source}: {name} has {len(value)} rows for {n} images")
        if self.task == "multilabel" and (self.labels.ndim != 2 or self.labels.shape[1] != len(self.class_names)):
            raise ValueError(f"{self.source}: multilabel labels must be (N, {len(self.class_names)}), got {self.labels.shape}")
        if self.task == "segmentation" and self.labels.shape[1:] != self.images.shape[2:]:
            raise ValueError(f"{self.source}: segmentation labels must be (N, H, W) like the images, got {self.labels.shape}")
        if self.sample_ids is not None and len(set(self.sample_ids.tolist())) != n:
            raise ValueError(f"{self.source}: sample_ids are not unique")
        if self.coarse is not None:
            coarse = self.coarse
            if len(coarse.fill) != len(self.channels) or coarse.valid.shape != (n, *self.images.shape[2:]):
                raise ValueError(f"{self.source}: coarse patches need a fill per channel and a valid mask per "
                                 f"sample, got {len(coarse.fill)} fills and a mask of {coarse.valid.shape}")
            for grid, patches, valid, spans in zip(coarse.grids, coarse.patches, coarse.patch_valid, coarse.spans,
                                                   strict=True):
                if patches.shape != (n, len(grid.channels), grid.side, grid.side) or valid.shape != patches.shape \
                        or spans.shape != (n, 4):
                    raise ValueError(f"{self.source}: patches of the 1/{grid.factor} grid shaped {patches.shape} "
                                     f"(valid {valid.shape}, spans {spans.shape}) for {n} samples of "
                                     f"{len(grid.channels)} channels, {grid.side} px a side")


@dataclass(frozen=True)
class PredictionRequest:
    """What the predict stage asks a domain to do with one input.

    The domain reads ``input`` with the channels the model was trained on, runs ``infer`` over
    samples of ``tile_size`` moved by ``stride``, and writes a result in the input's geometry.
    ``infer`` maps a float32 batch (N, C, H, W) in the model's input units (``input_scaling``: the raw units
    it was trained on, see :func:`convert_units`) to probabilities shaped by ``task``:
    (N, K) softmax for classification, (N, K) independent sigmoids for multilabel, (N, K, H, W)
    per-pixel softmax for segmentation. ``mpp`` and ``tile_mpp`` mean what they mean in
    :class:`IngestRequest` (the slide's resolution when its metadata has none; the resolution samples are
    cut at, None for the domain default); domains without a micron scale ignore them.

    A slide-level model (trained on bags of a slide's tiles) comes with ``infer_bag`` instead of a tile
    classifier: it maps the tiles of one slide, float32 (N, C, H, W) in the model's input units, to the slide's class
    probabilities (K,) and each tile's attention weight (N,), summing to 1. ``bag_max_tiles`` is the most
    tiles one call may take (a slide with more is scored on an even spread of its tiles). Domains
    without slide-level inputs refuse such a model.
    """

    input: Path
    output: Path
    channels: tuple[Channel, ...]
    class_names: tuple[str, ...]
    tile_size: int
    stride: int
    infer: Callable[[np.ndarray], np.ndarray]
    batch_size: int = 64
    task: TaskType = "classification"
    mpp: float | None = None
    tile_mpp: float | None = None
    infer_bag: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    bag_max_tiles: int = 1024
    input_contract: dict | None = None
    """What the model's inputs must be (satellite: sensor, processing level, band order, scaling, cloud
    policy), as recorded at training; the domain refuses an input that differs and applies the rest."""
    input_scaling: Scaling = None
    """The units ``infer`` takes, per channel ``(scale, offset)`` to physical (None: physical units): the
    stored units of the model's training dataset. A domain converts what it reads into these units
    (:func:`convert_units`), whatever scaling its source writes, and applies nothing else."""
    screen_ppmm: float | None = None
    """Hyperspectral plume segmentation: run the model only on tiles whose methane enhancement channel
    (3 x 3 mean) exceeds this many ppm·m somewhere, the rest being background (the on-board cascade of
    :mod:`domains.hyperspectral.cascade`); None runs it on every tile. Domains without
    :attr:`DomainSpec.screening_channel` refuse it."""


@dataclass(frozen=True)
class PredictionSummary:
    """Receipt for one prediction written by a domain."""

    input: str
    output: str
    samples: int
    class_counts: dict[str, int]


class ExampleWriter(Protocol):
    def __call__(self, directory: Path, seed: int = 0) -> dict[str, Path]:
        """Write a tiny valid example in the real on-disk format; return the paths by role."""


@dataclass(frozen=True)
class DomainSpec:
    """One imaging domain, as every flow and the UI see it.

    Attributes:
        name: registry key, also the CLI ``--domain`` value and the MLflow experiment name.
        title: one line shown in listings.
        intended_use: what models of this domain are (and are not) for.
        task: the learning task the domain's datasets are labelled for.
        task_name: short task slug used in registered model names (``<domain>-<task_name>``).
        default_class_names: class names used when a label file gives none.
        default_channels: the channels of the domain's reference sensor.
        group_kind: what a leakage group is (spatial block, patient, slide, ...).
        default_backbone: timm model name used when a run names none.
        default_peft_targets: module names LoRA attaches to on the default backbone.
        default_tile_size: sample side in pixels.
        default_block_size: side of the spatial leakage blocks in pixels when a run names none (domains
            without spatial blocks ignore it).
        read_samples: reader turning an :class:`IngestRequest` into samples: one :class:`SampleSet`, or
            (the way for sources of real size) an iterator of SampleSets of at most
            ``request.batch_samples`` samples each, read window by window so memory does not grow
            with the source.
        predict: writes a prediction for one input (see :class:`PredictionRequest`).
        list_prediction_inputs: expands a path (one input or a drop folder) into inputs.
        write_example: writes a tiny real-format example (tests, fixtures, docs).
        prepare_demo: writes the demo inputs into a folder and returns them as ``{"source": ...,
            "labels": ...}`` (``labels`` may be absent); None when the domain has no demo.
        demo_notes: one paragraph saying where the demo data comes from and how its labels are made.
        prediction_suffix: file suffix of the main prediction output written per input (``.tif`` for
            a class raster, ``.json`` for a per-study report); the predict stage names outputs
            ``<input name><suffix>`` in its output folder.
        train_flips: whether flips/90-degree rotations are valid augmentations (overhead imagery: yes;
            chest radiographs, where left and right differ: no).
        name_prediction: names the output of one input (without suffix); by default the input's file
            or folder name. Domains whose file names may carry identity (radiology) give a pseudonym.
        write_ingest_reports: writes extra reports about a read (e.g. radiology's de-identification
            audit) into the dataset folder after it is written; returns the files.
        ingest_table: ``provenance -> rows``: one plain row per input read (histopathology: slide pseudonym,
            tissue fraction, kept tiles, mask PNG), which the ingest task logs and publishes as a table;
            a column whose name ends in ``_png`` holds a path relative to the folder ``write_ingest_reports``
            wrote into (the task makes it full). None when the domain has none.
        demo_settings: pipeline parameters the domain's demo sets beyond the common ones, as plain nested
            data (histopathology: slide-level learning, ``{"bags": {"enabled": True, ...}}``).
        input_normalisations: names of the input normalisations the domain offers, fitted on a model's
            training tiles and applied before the model by every stage (histopathology: "macenko" and
            "reinhard" stain normalisation).
        fit_input_normalisation: ``(name, images) -> reference``: fits one on float32 (N, C, H, W) physical
            training tiles; the reference is plain JSON-safe data kept with the model. Raises ValueError
            when the tiles cannot fit it.
        apply_input_normalisation: ``(reference, images) -> images``: applies a fitted reference to float32
            (N, C, H, W) physical tiles; never fails on a tile's content (tiles it cannot normalise are
            returned as they are).
        input_contract_keys: dataset provenance keys a model carries as its input contract
            (satellite: sensor, processing level, channels, scaling and its units, cloud policy); predict
            hands them back in :attr:`PredictionRequest.input_contract`.
        screening_channel: for a domain whose predict can screen tiles before the model
            (:attr:`PredictionRequest.screen_ppmm`): ``channels -> index`` of the model channel it screens on,
            raising ValueError naming the channels when a model has none; None: the domain cannot screen.
    """

    name: str
    title: str
    intended_use: str
    task: TaskType
    task_name: str
    default_class_names: tuple[str, ...]
    default_channels: tuple[Channel, ...]
    group_kind: str
    default_backbone: str
    default_peft_targets: tuple[str, ...]
    default_tile_size: int
    read_samples: Callable[[IngestRequest], SampleSet | Iterable[SampleSet]]
    predict: Callable[[PredictionRequest], PredictionSummary]
    list_prediction_inputs: Callable[[Path], list[Path]]
    write_example: ExampleWriter
    prepare_demo: Callable[[Path], dict[str, Path]] | None = None
    demo_notes: str = ""
    prediction_suffix: str = ".tif"
    train_flips: bool = True
    default_block_size: int = 128
    name_prediction: Callable[[Path], str] | None = None
    write_ingest_reports: Callable[[SampleSet, Path], list[Path]] | None = None
    ingest_table: Callable[[dict[str, str]], list[dict]] | None = None
    demo_settings: dict = field(default_factory=dict)
    input_normalisations: tuple[str, ...] = ()
    fit_input_normalisation: Callable[[str, np.ndarray], dict] | None = None
    apply_input_normalisation: Callable[[dict, np.ndarray], np.ndarray] | None = None
    input_contract_keys: tuple[str, ...] = ()
    screening_channel: Callable[[tuple[Channel, ...]], int] | None = None
