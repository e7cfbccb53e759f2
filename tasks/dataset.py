"""Versioned, leakage-free datasets: a manifest plus content-addressed shards, with one digest.

On disk a dataset is a folder::

    dataset.json       metadata: digest, domain, task, channels, classes, geometry, normalisation, counts
    quarantine.json    files or series of the source left out, each with its reason (may be empty)
    manifest.parquet   one row per sample: id, shard, index in shard, label shard, source, row, col,
                       label, group, split
    shards/<sha>.npy   float32 (n, C, H, W) image stacks, named by the SHA-256 of their bytes; for
                       multilabel (n, K) int8 and segmentation (n, H, W) int16 tasks, label stacks too

For classification the manifest's ``label`` column is the class id; for the other tasks it is 1 for a
labelled sample and -1 for an unlabelled one, and the labels themselves live in the label shards.

Splits are assigned per leakage group (spatial block, patient, slide), never per sample, and the
"no group in two splits" invariant is asserted both when writing and when loading.

A dataset is written into a hidden sibling folder (``.<name>.partial-<pid>-<token>``) and renamed into
place only once complete, so a killed ingest never leaves a half-written dataset where a later stage
would read it; the next write sweeps the leftovers of writers that are no longer running.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field, model_validator

from domains import LABEL_RANKS, Channel, IngestRequest, SampleSet, get_domain, labelled_samples
from domains.confinement import ensure_inside
from domains.spec import printable_path

SPLITS = ("train", "val", "test")
SHARD_SAMPLES = 2048
FORMAT_VERSION = 2
LABEL_DTYPES = {"multilabel": np.int8, "segmentation": np.int16}
QUARANTINE_FILE = "quarantine.json"
PARTIAL_MARK = ".partial-"
_REPLACED_MARK = ".replaced-"


class DatasetError(ValueError):
    """A dataset on disk is missing, corrupt or violates an invariant."""


class SplitParams(BaseModel):
    """How leakage groups are divided between training, validation and test."""

    val_fraction: float = Field(0.15, ge=0.0, le=0.5, description="Share of groups held out for validation")
    test_fraction: float = Field(0.2, gt=0.0, le=0.5, description="Share of groups held out for the final test")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the group shuffle (same seed, same split)")

    @model_validator(mode="after")
    def _leave_training_data(self) -> "SplitParams":
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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_json(cls, payload: dict) -> "DatasetInfo":
        payload = dict(payload)
        payload["channels"] = tuple(Channel(**c) for c in payload["channels"])
        for key in ("class_names", "sources", "channel_mean", "channel_std"):
            payload[key] = tuple(payload[key])
        return cls(**payload)


@dataclass(frozen=True)
class Split:
    """The images and labels of one split, in memory."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    """A dataset loaded from disk, verified against its digest."""

    path: Path
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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dataset_digest(rows: dict[str, list], channels: tuple[Channel, ...], class_names: tuple[str, ...],
                    shards: list[str]) -> str:
    """One digest over every manifest row, the band list, the classes and the shard contents."""
    payload = {"rows": rows, "channels": [asdict(c) for c in channels], "classes": list(class_names), "shards": shards}
    return _sha256(json.dumps(payload, sort_keys=True).encode())


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # Per-channel statistics from the training split only, so test pixels never shape normalisation.
    mean = images.mean(axis=(0, 2, 3), dtype=np.float64)
    std = images.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.where(std < 1e-6, 1.0, std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _class_counts(labels: np.ndarray, splits: np.ndarray, task: str, class_names: tuple[str, ...]) -> dict:
    """Per split: samples per class (classification), positives per finding (multilabel), pixels per class (segmentation)."""
    counts = {}
    for split in SPLITS:
        members = labels[splits == split]
        if task == "multilabel":
            counts[split] = {name: int((members[:, k] == 1).sum()) for k, name in enumerate(class_names)}
        else:
            counts[split] = {name: int((members == k).sum()) for k, name in enumerate(class_names)}
    return counts


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


def merge_sample_batches(batches: SampleSet | Iterable[SampleSet]) -> SampleSet:
    """One float32 SampleSet in physical units from a reader's batches (or a single SampleSet).

    Batches follow the streaming contract of :class:`domains.SampleSet`: one source, the same channels,
    classes, task and scaling; dropped counts add up, provenance and quarantine merge.

    Raises:
        DatasetError: batches that disagree on source, channels, classes, task or scaling.
    """
    if isinstance(batches, SampleSet):
        batches = [batches]
    parts = list(batches)
    if not parts:
        raise DatasetError("no samples were read: the reader yielded no sample batches")
    first = parts[0]
    for part in parts[1:]:
        for name in ("source", "channels", "class_names", "task", "scaling"):
            if getattr(part, name) != getattr(first, name):
                raise DatasetError(f"{printable_path(first.source)}: sample batches disagree on {name} "
                                   f"({getattr(first, name)!r} then {getattr(part, name)!r})")
    dropped: dict[str, int] = {}
    provenance: dict[str, str] = {}
    quarantine: list[dict[str, str]] = []
    for part in parts:
        for reason, count in part.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + int(count)
        provenance.update(part.provenance)
        quarantine.extend(entry for entry in part.quarantine if entry not in quarantine)
    with_ids = [p.sample_ids is not None for p in parts]
    if any(with_ids) and not all(with_ids):
        raise DatasetError(f"{printable_path(first.source)}: some sample batches name their samples and some do not")
    return SampleSet(
        images=np.concatenate([p.physical() for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        groups=np.concatenate([np.asarray(p.groups) for p in parts]),
        locations=np.concatenate([np.asarray(p.locations).reshape(len(p.images), 2) for p in parts]),
        source=first.source, channels=first.channels, class_names=first.class_names, dropped=dropped,
        provenance=provenance, task=first.task,
        sample_ids=np.concatenate([p.sample_ids for p in parts]) if all(with_ids) else None,
        quarantine=quarantine)


def write_dataset(samples: SampleSet | Iterable[SampleSet], domain: str, task_type: str, out_dir: Path, params: SplitParams,
                  extra_files: Callable[[Path], object] | None = None) -> DatasetInfo:
    """Split ``samples`` by leakage group and write manifest, shards and metadata to ``out_dir``.

    ``samples`` is one SampleSet or a reader's stream of batches (see :func:`merge_sample_batches`);
    images in a source dtype are converted to physical units with their recorded ``scaling``.

    Only labelled samples are split for training; an unlabelled sample set is written entirely as
    the ``test`` split with label -1, so prediction-only datasets keep the same format. The task is
    the sample set's own when it names one, else ``task_type`` (the domain's default).

    Everything is written into a hidden sibling folder first; ``extra_files`` (e.g. a domain's ingest
    reports) is called with that folder, and the folder is renamed to ``out_dir`` only when complete. An
    existing dataset at ``out_dir`` is replaced then; a non-empty folder that is not a dataset is refused.

    Raises:
        DatasetError: nothing to write, labels that do not fit the task, splits that cannot be filled, or
            ``out_dir`` holding something other than a dataset.
    """
    out_dir = Path(os.path.abspath(out_dir))
    if not out_dir.name or out_dir == out_dir.parent:
        raise DatasetError(f"{out_dir}: a dataset needs a folder of its own, not the file system root")
    if is_partial_dataset(out_dir):
        raise DatasetError(f"{out_dir}: names the temporary folder of an unfinished write; choose another name")
    _check_replaceable(out_dir)
    samples = merge_sample_batches(samples)
    task_type = samples.task or task_type
    _check_samples(samples, task_type)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _sweep_abandoned(out_dir)
    partial = out_dir.with_name(f".{out_dir.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    partial.mkdir()
    try:
        info = _write_contents(samples, domain, task_type, partial, params, where=out_dir)
        if extra_files is not None:
            extra_files(partial)
        _publish(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return info


def _check_samples(samples: SampleSet, task_type: str) -> None:
    if len(samples.images) == 0:
        raise DatasetError(f"{samples.source}: no samples left after filtering (dropped: {samples.dropped})")
    if LABEL_RANKS.get(task_type) != samples.labels.ndim:
        raise DatasetError(f"{samples.source}: labels of shape {samples.labels.shape} do not fit task {task_type!r}")


def _write_contents(samples: SampleSet, domain: str, task_type: str, out_dir: Path, params: SplitParams,
                    where: Path) -> DatasetInfo:
    """Write manifest, shards, quarantine list and (last) ``dataset.json`` into ``out_dir``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_samples(samples, task_type)
    # File names are bytes on Linux; Parquet and JSON need text, so names that are not UTF-8 are escaped.
    source = printable_path(samples.source)
    labelled = labelled_samples(samples.labels)
    if labelled.any():
        split_of = assign_splits(samples.groups[labelled], params)
        splits = np.array([split_of.get(g, "unlabelled") for g in samples.groups.tolist()])
        splits[~labelled] = "unlabelled"
    else:
        splits = np.full(len(samples.labels), "test")
    check_no_group_leak(samples.groups[splits != "unlabelled"], splits[splits != "unlabelled"], str(where))
    if labelled.any() and not all((splits == s).any() for s in SPLITS if s != "val" or params.val_fraction > 0):
        raise DatasetError(f"{samples.source}: a split came out empty; add data or lower the block size")

    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    rows = {k: [] for k in ("sample_id", "shard", "index", "label_shard", "source", "row", "col", "label", "group",
                            "split")}
    shard_digests: list[str] = []

    def save_block(block: np.ndarray) -> str:
        digest = _sha256(block.tobytes() + str(block.shape).encode())
        np.save(ensure_inside(shard_dir, shard_dir / f"{digest}.npy"), block)
        shard_digests.append(digest)
        return digest

    for split in (*SPLITS, "unlabelled"):
        members = np.flatnonzero(splits == split)
        for start in range(0, len(members), SHARD_SAMPLES):
            chunk = members[start:start + SHARD_SAMPLES]
            digest = save_block(np.ascontiguousarray(samples.images[chunk], dtype=np.float32))
            label_digest = ""
            if task_type in LABEL_DTYPES:
                label_digest = save_block(np.ascontiguousarray(samples.labels[chunk], dtype=LABEL_DTYPES[task_type]))
            for index, sample in enumerate(chunk):
                row, col = int(samples.locations[sample][0]), int(samples.locations[sample][1])
                rows["sample_id"].append(printable_path(samples.sample_ids[sample]) if samples.sample_ids is not None
                                         else f"{source}#{row},{col}")
                rows["shard"].append(digest)
                rows["index"].append(index)
                rows["label_shard"].append(label_digest)
                rows["source"].append(source)
                rows["row"].append(row)
                rows["col"].append(col)
                rows["label"].append(int(samples.labels[sample]) if task_type == "classification"
                                     else 1 if labelled[sample] else -1)
                rows["group"].append(printable_path(samples.groups[sample]))
                rows["split"].append(split)
    table = pa.table(rows)
    pq.write_table(table, out_dir / "manifest.parquet")

    train_mask = splits == "train" if (splits == "train").any() else np.ones(len(splits), bool)
    mean, std = _channel_stats(samples.images[train_mask])
    class_counts = _class_counts(samples.labels, splits, task_type, samples.class_names)
    info = DatasetInfo(
        digest=_dataset_digest(rows, samples.channels, samples.class_names, shard_digests),
        domain=domain,
        task=task_type,
        channels=samples.channels,
        class_names=samples.class_names,
        tile_size=int(samples.images.shape[-1]),
        sources=(source,),
        split_counts={s: int((splits == s).sum()) for s in (*SPLITS, "unlabelled")},
        class_counts=class_counts,
        dropped=dict(samples.dropped),
        channel_mean=mean,
        channel_std=std,
        provenance={key: printable_path(value) for key, value in samples.provenance.items()},
        quarantined=len(samples.quarantine),
    )
    quarantine = [{key: printable_path(value) for key, value in entry.items()} for entry in samples.quarantine]
    (out_dir / QUARANTINE_FILE).write_text(json.dumps(quarantine, indent=2))
    # dataset.json last: a folder holding it holds everything it describes.
    (out_dir / "dataset.json").write_text(json.dumps(asdict(info), indent=2))
    return info


def _shard_order(manifest: dict[str, list]) -> list[str]:
    """Shard digests in the order the writer saved them (each image shard, then its label shard)."""
    order: dict[str, None] = {}
    for image, label in zip(manifest["shard"], manifest.get("label_shard", [""] * len(manifest["shard"]))):
        order.setdefault(image)
        if label:
            order.setdefault(label)
    return list(order)


def read_dataset_info(path: Path | str) -> DatasetInfo:
    """Read only the metadata of the dataset at ``path`` (cheap; no shards are touched)."""
    if is_partial_dataset(path):
        raise DatasetError(f"{path}: an unfinished dataset write (the ingest was interrupted); rerun the ingest "
                           "and use the folder it names")
    meta = Path(path) / "dataset.json"
    if not meta.is_file():
        raise DatasetError(f"{path}: not a Vitrail dataset (no dataset.json); run the ingest flow first")
    return DatasetInfo.from_json(json.loads(meta.read_text()))


def load_dataset(path: Path | str, verify: bool = True) -> Dataset:
    """Load a dataset, checking shard digests and the no-leak invariant."""
    import pyarrow.parquet as pq

    path = Path(path)
    info = read_dataset_info(path)
    manifest = pq.read_table(path / "manifest.parquet").to_pydict()
    groups = np.array(manifest["group"])
    split_col = np.array(manifest["split"])
    labelled = split_col != "unlabelled"
    check_no_group_leak(groups[labelled], split_col[labelled], str(path))
    if verify:
        shard_order = _shard_order(manifest)
        if _dataset_digest(manifest, info.channels, info.class_names, shard_order) != info.digest:
            raise DatasetError(f"{path / 'manifest.parquet'}: manifest does not match the dataset digest "
                               "(labels, splits or rows were edited after ingest)")
    shards: dict[str, np.ndarray] = {}
    label_shards = manifest.get("label_shard", [""] * len(groups))
    for digest in dict.fromkeys([*manifest["shard"], *(d for d in label_shards if d)]):
        shard_path = path / "shards" / f"{digest}.npy"
        if not shard_path.is_file():
            raise DatasetError(f"{shard_path}: shard listed in the manifest is missing")
        try:
            block = np.load(shard_path)
        except (ValueError, OSError, EOFError) as error:
            raise DatasetError(f"{shard_path}: unreadable shard ({error})") from error
        if verify and _sha256(block.tobytes() + str(block.shape).encode()) != digest:
            raise DatasetError(f"{shard_path}: content does not match its digest (file changed or corrupt)")
        shards[digest] = block
    splits: dict[str, Split] = {}
    for split in (*SPLITS, "unlabelled"):
        members = np.flatnonzero(split_col == split)
        if len(members) == 0:
            continue
        images = np.stack([shards[manifest["shard"][i]][manifest["index"][i]] for i in members])
        if info.task in LABEL_DTYPES:
            labels = np.stack([shards[label_shards[i]][manifest["index"][i]] for i in members]).astype(np.int64)
        else:
            labels = np.array([manifest["label"][i] for i in members], dtype=np.int64)
        splits[split] = Split(images=images, labels=labels, groups=groups[members])
    return Dataset(path=path, info=info, splits=splits)


def build_dataset(domain_name: str, request: IngestRequest, out_dir: Path, params: SplitParams) -> DatasetInfo:
    """Read a source with its domain's reader and write it as a dataset (the ingest stage's work)."""
    domain = get_domain(domain_name)
    if request.block_size is None:
        request = replace(request, block_size=domain.default_block_size)
    samples = merge_sample_batches(domain.read_samples(request))
    reports = domain.write_ingest_reports
    return write_dataset(samples, domain.name, domain.task, out_dir, params,
                         extra_files=(lambda folder: reports(samples, folder)) if reports is not None else None)


build_dataset_task = task(build_dataset, name="build-dataset", cache_policy=NONE)
