"""Versioned, leakage-free datasets: a manifest plus content-addressed shards, with one digest.

On disk a dataset is a folder::

    dataset.json       metadata: digest, domain, task, channels, classes, geometry, normalisation, counts
    manifest.parquet   one row per sample: id, shard, index in shard, label shard, source, row, col,
                       label, group, split
    shards/<sha>.npy   float32 (n, C, H, W) image stacks, named by the SHA-256 of their bytes; for
                       multilabel (n, K) int8 and segmentation (n, H, W) int16 tasks, label stacks too

For classification the manifest's ``label`` column is the class id; for the other tasks it is 1 for a
labelled sample and -1 for an unlabelled one, and the labels themselves live in the label shards.

Splits are assigned per leakage group (spatial block, patient, slide), never per sample, and the
"no group in two splits" invariant is asserted both when writing and when loading.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field, model_validator

from domains import LABEL_RANKS, Channel, IngestRequest, SampleSet, get_domain, labelled_samples

SPLITS = ("train", "val", "test")
SHARD_SAMPLES = 2048
FORMAT_VERSION = 2
LABEL_DTYPES = {"multilabel": np.int8, "segmentation": np.int16}


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


def write_dataset(samples: SampleSet, domain: str, task_type: str, out_dir: Path, params: SplitParams) -> DatasetInfo:
    """Split ``samples`` by leakage group and write manifest, shards and metadata to ``out_dir``.

    Only labelled samples are split for training; an unlabelled sample set is written entirely as
    the ``test`` split with label -1, so prediction-only datasets keep the same format. The task is
    the sample set's own when it names one, else ``task_type`` (the domain's default).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    task_type = samples.task or task_type
    if len(samples.images) == 0:
        raise DatasetError(f"{samples.source}: no samples left after filtering (dropped: {samples.dropped})")
    if LABEL_RANKS.get(task_type) != samples.labels.ndim:
        raise DatasetError(f"{samples.source}: labels of shape {samples.labels.shape} do not fit task {task_type!r}")
    labelled = labelled_samples(samples.labels)
    if labelled.any():
        split_of = assign_splits(samples.groups[labelled], params)
        splits = np.array([split_of.get(g, "unlabelled") for g in samples.groups.tolist()])
        splits[~labelled] = "unlabelled"
    else:
        splits = np.full(len(samples.labels), "test")
    check_no_group_leak(samples.groups[splits != "unlabelled"], splits[splits != "unlabelled"], str(out_dir))
    if labelled.any() and not all((splits == s).any() for s in SPLITS if s != "val" or params.val_fraction > 0):
        raise DatasetError(f"{samples.source}: a split came out empty; add data or lower the block size")

    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    rows = {k: [] for k in ("sample_id", "shard", "index", "label_shard", "source", "row", "col", "label", "group",
                            "split")}
    shard_digests: list[str] = []

    def save_block(block: np.ndarray) -> str:
        digest = _sha256(block.tobytes() + str(block.shape).encode())
        np.save(shard_dir / f"{digest}.npy", block)
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
                rows["sample_id"].append(str(samples.sample_ids[sample]) if samples.sample_ids is not None
                                         else f"{samples.source}#{row},{col}")
                rows["shard"].append(digest)
                rows["index"].append(index)
                rows["label_shard"].append(label_digest)
                rows["source"].append(samples.source)
                rows["row"].append(row)
                rows["col"].append(col)
                rows["label"].append(int(samples.labels[sample]) if task_type == "classification"
                                     else 1 if labelled[sample] else -1)
                rows["group"].append(str(samples.groups[sample]))
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
        sources=(samples.source,),
        split_counts={s: int((splits == s).sum()) for s in (*SPLITS, "unlabelled")},
        class_counts=class_counts,
        dropped=dict(samples.dropped),
        channel_mean=mean,
        channel_std=std,
        provenance=dict(samples.provenance),
    )
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
    samples = domain.read_samples(request)
    info = write_dataset(samples, domain.name, domain.task, out_dir, params)
    if domain.write_ingest_reports is not None:
        domain.write_ingest_reports(samples, Path(out_dir))
    return info


build_dataset_task = task(build_dataset, name="build-dataset", cache_policy=NONE)
