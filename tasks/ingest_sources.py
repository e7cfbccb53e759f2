"""Many sources, one dataset: each source read into a checkpointed part by its own task, then combined.

The ingest stage takes a list of sources (scenes, study folders, cubes). With one source the reader
streams straight into the dataset, as it always has: there is nothing to fan out, and a second pass
would only cost time. With several:

1. :func:`plan_ingest` gives each source a content-addressed key: domain, the source's identity (its
   resolved path and the size and modification time of every file in it), its labels' identity,
   every field of the request a reader sees, the ``VITRAIL_*`` settings readers consult (pseudonym
   salt, size limits: values hashed, never stored) and the storage format versions. Size plus
   modification time is what ``make`` and ``rsync`` trust: a content hash would mean reading every
   scene twice. A changed file, label, setting or option gives a new key, so a stale part is never
   reused.
2. :func:`ingest_source` (one mapped Prefect task per source) writes the source's samples as a part
   under ``.<dataset name>.parts/<key>/`` beside the dataset (a folder, or a prefix of the same
   bucket); ``part.json``, written last, marks it finished. A rerun after a crash finds the finished
   parts and reads only the rest. A source that cannot be read (a :class:`DomainInputError`, a
   missing file, a label raster of the wrong shape) is reported, not fatal: the others go on.
3. :func:`assemble_dataset` streams every part back, chunk by chunk, into the one dataset writer,
   which assigns splits over the groups of all sources at once, so no group is in two splits whichever
   source it came from. Sources that failed or kept no sample become entries of ``quarantine.json``;
   the ingest fails only when no source gave a sample. Parts are deleted once the dataset is written
   (they are a second full copy of the data) unless ``keep_parts`` asks to keep them, which makes a
   later ingest with added sources read only the new ones.

Leakage groups keep the ids their reader gives them, across sources too. Radiology's patient
pseudonyms must be shared (a patient's studies from two sources belong in one split). Spatial block ids
(``<scene name>:block-<row>-<col>``) of two sources only coincide when the scenes have the same name
(one granule copied twice, or ``site1/scene.tif`` beside ``site2/scene.tif``); sharing the id then keeps
those blocks in one split, which can never leak, whereas prefixing each source's ids would let the
same place, seen twice, land in training and test. The one cost is a coarser split in the rare case of
two different places with the same name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Literal

from prefect import task
from prefect.cache_policies import NONE

from domains import DomainInputError, DomainSpec, IngestRequest, get_domain
from domains.spec import printable_path
from tasks.dataset import FORMAT_VERSION, DatasetInfo, SplitParams, build_dataset, write_dataset
from tasks.dataset_parts import PART_FORMAT, PartInfo, part_batches, read_part_info, write_part
from tasks.dataset_store import DatasetError, DatasetFiles, as_location, is_url
from tasks.request_errors import RequestError

PARTS_SUFFIX = ".parts"
# Settings readers take from the environment (VITRAIL_DEID_SALT, VITRAIL_MAX_SOURCE_SAMPLES, ...).
SETTINGS_PREFIX = "VITRAIL_"
# What makes one source unusable without making the others so: its files, its labels, its options.
SOURCE_ERRORS = (DomainInputError, DatasetError, RequestError, FileNotFoundError, NotADirectoryError)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceJob:
    """One source to read into its part."""

    domain: str
    request: IngestRequest
    key: str
    part: str


@dataclass(frozen=True)
class IngestPlan:
    """What an ingest will do: its sources' jobs, or (one source) the request written straight."""

    domain: str
    dataset: str
    parts_root: str
    jobs: tuple[SourceJob, ...]
    resumed: int
    """Sources whose part was already finished by an earlier run."""
    direct: IngestRequest | None = None


@dataclass(frozen=True)
class SourceOutcome:
    """What happened to one source: its part written or found finished, or the reason it was left out."""

    source: str
    key: str
    part: str
    status: Literal["written", "resumed", "failed"]
    samples: int = 0
    problem: str = ""


def parts_root(dataset: str) -> str:
    """Where the parts of the dataset at ``dataset`` live: the hidden sibling ``.<name>.parts``."""
    location = as_location(dataset).rstrip("/") if is_url(dataset) else os.path.abspath(dataset)
    parent, _, name = location.rpartition("/")
    return f"{parent}/.{name}{PARTS_SUFFIX}"


def _file_identity(path: Path) -> list:
    """Resolved path, size and modification time of ``path``, or of every file below it (a folder source)."""
    path = Path(os.path.realpath(path))
    try:
        if not path.is_dir():
            stat = path.stat()
            return [str(path), stat.st_size, stat.st_mtime_ns]
        files = []
        for folder, subfolders, names in os.walk(path):
            subfolders.sort()
            for name in sorted(names):
                stat = os.stat(os.path.join(folder, name))
                files.append([os.path.relpath(os.path.join(folder, name), path), stat.st_size, stat.st_mtime_ns])
        return [str(path), files]
    except OSError as error:  # the reader names the problem; the key only has to differ from a readable source's
        return [str(path), f"unreadable: {type(error).__name__}"]


def _reader_settings() -> dict[str, str]:
    # Values hashed although only the key's own hash is kept: the pseudonym salt is a secret, and an identity
    # printed while debugging must not show it.
    return {name: hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
            for name, value in sorted(os.environ.items()) if name.startswith(SETTINGS_PREFIX)}


def part_key(domain: str, request: IngestRequest) -> str:
    """The content address of one source's part (see the module docstring for what goes in)."""
    options = {name: value for name, value in asdict(request).items() if name not in ("source", "labels")}
    identity = {
        "domain": domain, "source": _file_identity(request.source),
        "labels": _file_identity(request.labels) if request.labels is not None else None,
        "request": options, "settings": _reader_settings(),
        "part_format": PART_FORMAT, "dataset_format": FORMAT_VERSION,
    }
    text = json.dumps(identity, sort_keys=True, default=str).encode("utf-8", "surrogateescape")
    return hashlib.sha256(text).hexdigest()[:32]


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def plan_ingest(domain_name: str, request: IngestRequest, sources: list[str], labels: list[str | None],
                dataset: str) -> IngestPlan:
    """One job per source (``request`` with that source and its labels), noting which parts are finished.

    ``labels[i]`` belongs to ``sources[i]``. One source is written straight into the dataset (no part);
    several are given absolute paths (so the dataset names them so too) for workers started elsewhere.

    Raises:
        RequestError: no source, labels not aligned with the sources, or a source listed twice.
    """
    domain = get_domain(domain_name)
    if not sources or len(labels) != len(sources):
        raise RequestError(f"{len(sources)} sources and {len(labels)} label entries: give at least one source "
                           "and one label entry (or none) per source")
    if request.block_size is None:
        request = replace(request, block_size=domain.default_block_size)
    requests = [replace(request, source=Path(source), labels=Path(label) if label else None)
                for source, label in zip(sources, labels)]
    root = parts_root(dataset)
    if len(requests) == 1:
        return IngestPlan(domain=domain.name, dataset=dataset, parts_root=root, jobs=(), resumed=0, direct=requests[0])
    seen: dict[str, str] = {}
    for source in sources:
        resolved = os.path.realpath(source)
        if resolved in seen:
            raise RequestError(f"{printable_path(source)}: listed twice among the sources (as "
                               f"{printable_path(seen[resolved])} too); each source is read once")
        seen[resolved] = source
    jobs = []
    for item in requests:
        # Absolute paths: a Dask worker may run in another folder (the files must be where it looks, too).
        item = replace(item, source=Path(os.path.abspath(item.source)),
                       labels=Path(os.path.abspath(item.labels)) if item.labels is not None else None)
        key = part_key(domain.name, item)
        jobs.append(SourceJob(domain=domain.name, request=item, key=key, part=f"{root}/{key}"))
    resumed = sum(read_part_info(job.part) is not None for job in jobs)
    _run_logger().info("resumed: %d of %d sources already ingested (parts in %s)", resumed, len(jobs), root)
    return IngestPlan(domain=domain.name, dataset=dataset, parts_root=root, jobs=tuple(jobs), resumed=resumed)


def _source_name(domain: DomainSpec, path: Path) -> str:
    """How reports name a source: its path, or the domain's pseudonym where names may identify people."""
    return domain.name_prediction(path) if domain.name_prediction is not None else printable_path(path)


def ingest_source(job: SourceJob) -> SourceOutcome:
    """Read one source into its part, unless a finished part is already there; a bad source is reported.

    Errors about the source itself (unreadable files, labels that do not fit, no usable sample layout)
    come back as a ``failed`` outcome with the one-line reason; anything else (a full disk, a bug)
    raises and fails the run.
    """
    domain = get_domain(job.domain)
    source = _source_name(domain, job.request.source)
    finished = read_part_info(job.part)
    if finished is not None:
        return SourceOutcome(source=source, key=job.key, part=job.part, status="resumed", samples=finished.samples)
    try:
        # Coarse channels are stored as patches: read them so, without upsampling them first.
        info = write_part(domain.read_samples(replace(job.request, coarse_as_patches=True)), domain.task, job.part,
                          job.key, source)
    except SOURCE_ERRORS as error:
        DatasetFiles(job.part).clear()
        problem = printable_path(str(error)).replace(printable_path(job.request.source), source)
        _run_logger().warning("source left out: %s", problem)
        return SourceOutcome(source=source, key=job.key, part=job.part, status="failed", problem=problem)
    _run_logger().info("ingested %s: %d samples", source, info.samples)
    return SourceOutcome(source=source, key=job.key, part=job.part, status="written", samples=info.samples)


def _usable_parts(outcomes: list[SourceOutcome]) -> tuple[list[PartInfo], list[dict[str, str]]]:
    parts, quarantine = [], []
    for outcome in outcomes:
        info = read_part_info(outcome.part) if outcome.status != "failed" else None
        if outcome.status == "failed":
            quarantine.append({"item": outcome.source, "reason": "unreadable_source", "problem": outcome.problem})
        elif info is None:
            raise DatasetError(f"{outcome.part}: the part of {outcome.source} vanished before it was combined; "
                               "rerun the ingest")
        elif info.samples == 0:
            quarantine.append({"item": outcome.source, "reason": "no_samples",
                               "problem": f"no samples left after filtering (dropped: {info.dropped})"})
        else:
            parts.append(info)
    return parts, quarantine


def _warn_repeated_samples(dataset: str) -> None:
    """Say when sources overlap (one series in two exports): the copies are kept, in one group and split."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids = pq.read_table(pa.BufferReader(DatasetFiles(dataset).read_bytes("manifest.parquet")),
                        columns=["sample_id"]).column("sample_id")
    repeated = len(ids) - len(pc.unique(ids))
    if repeated:
        _run_logger().warning("%d samples repeat a sample of another source (the same series or scene given "
                              "twice?); they are kept", repeated)


def assemble_dataset(plan: IngestPlan, outcomes: list[SourceOutcome], params: SplitParams,
                     keep_parts: bool = False) -> DatasetInfo:
    """Write the dataset: straight from the one source, or by combining the finished parts in source order.

    Raises:
        DatasetError: no source gave a sample (every reason is in the message), sources disagree on
            channels, classes, task or scaling (both are named), or the splits cannot be filled.
    """
    domain = get_domain(plan.domain)
    if plan.direct is not None:
        return build_dataset(plan.domain, plan.direct, plan.dataset, params)
    parts, quarantine = _usable_parts(outcomes)
    if not parts:
        reasons = "; ".join(f"{entry['item']}: {entry['problem']}" for entry in quarantine)
        raise DatasetError(f"{plan.dataset}: no source yielded samples ({reasons})")
    batches = chain.from_iterable(part_batches(part) for part in parts)
    info = write_dataset(batches, domain.name, domain.task, plan.dataset, params, reports=domain.write_ingest_reports,
                         several_sources=True, quarantine=quarantine)
    _warn_repeated_samples(plan.dataset)
    if not keep_parts:
        DatasetFiles(plan.parts_root).clear()  # finished, stale and empty parts alike: the dataset holds it all
    _run_logger().info("combined %d of %d sources into %s (%d left out)", len(parts), len(outcomes), plan.dataset,
                       len(quarantine))
    return info


def _source_provenance(info: DatasetInfo, source: str) -> dict[str, str]:
    """One source's own facts out of a several-source dataset's merged provenance (a fact on which the
    sources differ was stored as a JSON object by source)."""
    facts = {}
    for key, value in info.provenance.items():
        try:
            by_source = json.loads(value)
        except ValueError:
            by_source = None
        if isinstance(by_source, dict) and by_source and set(by_source) <= set(info.sources):
            if source in by_source:
                facts[key] = by_source[source]
        else:
            facts[key] = value
    return facts


def ingest_table_rows(domain_name: str, info: DatasetInfo, dataset: str) -> list[dict]:
    """The domain's per-input rows of a written dataset (empty when it has none), their report paths made
    full: beside ``dataset.json`` for one source, under ``sources/<i>/`` for source ``i`` of several."""
    table = get_domain(domain_name).ingest_table
    if table is None:
        return []
    if len(info.sources) <= 1:
        located = [(info.provenance, f"{dataset}/")]
    else:
        located = [(_source_provenance(info, source), f"{dataset}/sources/{i:03d}/")
                   for i, source in enumerate(info.sources)]
    rows = []
    for provenance, prefix in located:
        for row in table(provenance):
            rows.append({key: prefix + value if key.endswith("_png") and value else value
                         for key, value in row.items()})
    return rows


def publish_ingest_table(domain_name: str, rows: list[dict]) -> None:
    """One line per row on the run logger and the rows as a Prefect table artifact (e.g. each slide's tissue
    fraction, kept tiles and mask PNG), where a user of the UI or the logs looks."""
    if not rows:
        return
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    logger = _run_logger()
    for row in rows:
        logger.info("ingest %s", "  ".join(f"{key} {value}" for key, value in row.items()))
    if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
        create_table_artifact(table=rows, key=f"{domain_name}-ingest-inputs",
                              description=f"{domain_name} ingest: one row per input read")


def _assemble_and_publish(plan: IngestPlan, outcomes: list[SourceOutcome], params: SplitParams,
                          keep_parts: bool = False) -> DatasetInfo:
    info = assemble_dataset(plan, outcomes, params, keep_parts)
    publish_ingest_table(plan.domain, ingest_table_rows(plan.domain, info, plan.dataset))
    return info


plan_ingest_task = task(plan_ingest, name="plan-ingest", cache_policy=NONE)
ingest_source_task = task(ingest_source, name="ingest-source", cache_policy=NONE,
                          task_run_name="ingest-source-{job.key}")
assemble_dataset_task = task(_assemble_and_publish, name="assemble-dataset", cache_policy=NONE)
