"""Per-source parts: one source's samples stored as read, before any split, so a many-source ingest can resume.

A part lives in a folder or under an fsspec URL prefix, in the dataset's own storage format::

    zarr.json, images/, labels/   the samples, chunked and compressed exactly as in a dataset (coarse
                                  channels at their own resolution too, see :mod:`tasks.coarse_bands`)
    manifest.parquet              the dataset manifest's columns except ``split`` (nothing is split yet)
    part.json                     what a combine step needs: source, channels, classes, scaling, dtype,
                                  chunk digests, dropped counts, provenance, quarantine (written last)

``part.json`` is written last, so a part is finished exactly when it exists: a writer killed before
that leaves a folder that the next run clears and writes again. Reading a part back
(:func:`part_batches`) yields the stored chunks as :class:`domains.SampleSet` batches, one chunk at a
time, each checked against its digest, so a part damaged on disk is named rather than combined.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from domains import Channel, CoarseGrid, SampleSet, WindowChannel
from tasks.dataset import FORMAT_VERSION, MANIFEST_COLUMNS, _StreamingWriter, coarse_from_json, samples_source
from tasks.dataset_store import ChunkSource, DatasetError, DatasetFiles

PART_FORMAT = 1
PART_FILE = "part.json"
PART_COLUMNS = tuple(column for column in MANIFEST_COLUMNS if column != "split")


@dataclass(frozen=True)
class PartInfo:
    """The content of ``part.json``: one source's samples, stored and not yet split."""

    key: str
    location: str
    source: str
    samples: int
    task: str
    channels: tuple[Channel, ...] = ()
    class_names: tuple[str, ...] = ()
    scaling: tuple[tuple[float, float], ...] | None = None
    stored_dtype: str | None = None
    windows: tuple[WindowChannel, ...] | None = None
    chunk_samples: int = 0
    chunks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    named_samples: bool = False
    dropped: dict[str, int] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    part_format: int = PART_FORMAT
    dataset_format: int = FORMAT_VERSION
    coarse_grids: tuple[CoarseGrid, ...] = ()
    coarse_fill: tuple[float, ...] = ()

    @classmethod
    def from_json(cls, payload: dict, location: str) -> PartInfo:
        payload = dict(payload, location=location)
        payload["channels"] = tuple(Channel(**c) for c in payload.get("channels", ()))
        payload["class_names"] = tuple(payload.get("class_names", ()))
        if payload.get("scaling") is not None:
            payload["scaling"] = tuple((float(s), float(o)) for s, o in payload["scaling"])
        payload["chunks"] = {name: tuple(values) for name, values in payload.get("chunks", {}).items()}
        if payload.get("windows") is not None:
            payload["windows"] = tuple(WindowChannel(**w) for w in payload["windows"])
        payload["coarse_grids"], payload["coarse_fill"] = coarse_from_json(payload)
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in payload.items() if key in known})


def read_part_info(location: str) -> PartInfo | None:
    """The metadata of the finished part at ``location``, or None while it is missing or unfinished.

    A part of another format is treated as unfinished (it is written again rather than misread).

    Raises:
        DatasetError: ``part.json`` exists but cannot be parsed.
    """
    files = DatasetFiles(location)
    if not files.exists(PART_FILE):
        return None
    try:
        info = PartInfo.from_json(json.loads(files.read_bytes(PART_FILE)), files.location)
    except (ValueError, TypeError, KeyError) as error:
        raise DatasetError(f"{files.describe(PART_FILE)}: unreadable part metadata ({error}); remove the folder "
                           "and rerun the ingest") from error
    if info.part_format != PART_FORMAT or info.dataset_format != FORMAT_VERSION:
        return None
    return info


def write_part(samples: SampleSet | Iterable[SampleSet], task_type: str, location: str, key: str,
               source: str) -> PartInfo:
    """Store a reader's batches for one source at ``location``, ``part.json`` last.

    Whatever an earlier, unfinished attempt left there is removed first. The batches are checked as a
    dataset's are (one source, same channels, classes, task, scaling and dtype; labels of the task's
    shape); a source whose reader yields no sample still gets a finished part (with ``samples`` 0 and
    its dropped counts), so it is not read again.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = DatasetFiles(location)
    files.clear()
    writer = _StreamingWriter(files, task_type, statistics=False)
    try:
        for batch in [samples] if isinstance(samples, SampleSet) else samples:
            writer.add(batch)
    except BaseException:
        writer.abandon()
        raise
    written = writer.finish_unsplit()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({column: written.rows[column] for column in PART_COLUMNS},
                            schema=_manifest_schema()), sink)
    files.write_bytes("manifest.parquet", sink.getvalue().to_pybytes())
    info = PartInfo(key=key, location=files.location, source=_part_source(written.rows, source),
                    samples=len(written.rows["index"]), task=written.task, channels=written.channels,
                    class_names=written.class_names, scaling=written.scaling, windows=written.windows,
                    stored_dtype=written.stored_dtype,
                    chunk_samples=written.chunk_samples, chunks=written.chunks, named_samples=written.named_samples,
                    dropped=written.dropped, provenance=written.provenance, quarantine=written.quarantine,
                    coarse_grids=written.coarse_grids, coarse_fill=written.coarse_fill)
    payload = asdict(info)
    payload.pop("location")  # where it lies is where it is found, not part of what it holds
    files.write_bytes(PART_FILE, json.dumps(payload, indent=2).encode())
    return info


def _part_source(rows: dict[str, list], requested: str) -> str:
    # The reader's own name for the source (what a dataset records), else the path that was asked for.
    return rows["source"][0] if rows["source"] else requested


def _manifest_schema():
    import pyarrow as pa

    return pa.schema([("sample_id", pa.string()), ("index", pa.int64()), ("source", pa.string()),
                      ("row", pa.int64()), ("col", pa.int64()), ("label", pa.int64()), ("group", pa.string())])


def part_batches(info: PartInfo) -> Iterator[SampleSet]:
    """The samples of a finished part as SampleSet batches, one stored chunk each (never the whole part).

    The first batch carries the part's dropped counts, provenance and quarantine entries.

    Raises:
        DatasetError: a chunk or the manifest is missing, damaged or does not match ``part.json``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if info.samples == 0:
        return
    files = DatasetFiles(info.location)
    try:
        manifest = pq.read_table(pa.BufferReader(files.read_bytes("manifest.parquet"))).to_pydict()
        group = files.zarr_group("r")
        stored = {name: ChunkSource(files, group[name], name, digests) for name, digests in info.chunks.items()}
        images = samples_source(stored, info.coarse_grids, info.coarse_fill, len(info.channels))
        labels = stored.get("labels")
    except (OSError, KeyError, ValueError, pa.ArrowException) as error:
        raise DatasetError(f"{files.location}: unreadable part of {info.source} ({type(error).__name__}: {error}); "
                           "remove the folder and rerun the ingest") from error
    if len(manifest.get("index", ())) != info.samples or int(images.array.shape[0]) != info.samples:
        raise DatasetError(f"{files.location}: part of {info.source} holds {int(images.array.shape[0])} samples "
                           f"and {len(manifest.get('index', ()))} manifest rows, part.json says {info.samples}; "
                           "remove the folder and rerun the ingest")
    for index in range(images.num_chunks):
        start = index * images.chunk_samples
        stop = min(start + images.chunk_samples, info.samples)
        first = index == 0
        yield SampleSet(
            images=images.chunk(index),
            labels=(labels.chunk(index) if labels is not None
                    else np.asarray(manifest["label"][start:stop], dtype=np.int64)),
            groups=np.array(manifest["group"][start:stop], dtype=str),
            locations=np.stack([np.asarray(manifest["row"][start:stop], dtype=np.int64),
                                np.asarray(manifest["col"][start:stop], dtype=np.int64)], axis=1),
            source=info.source, channels=info.channels, class_names=info.class_names, task=info.task,
            scaling=info.scaling, windows=info.windows,
            coarse=images.coarse_patches(index) if info.coarse_grids else None,
            sample_ids=np.array(manifest["sample_id"][start:stop], dtype=str) if info.named_samples else None,
            dropped=dict(info.dropped) if first else {}, provenance=dict(info.provenance) if first else {},
            quarantine=list(info.quarantine) if first else [])


def remove_part(location: str) -> None:
    """Delete a part (after its samples are in a dataset)."""
    DatasetFiles(location).clear()
