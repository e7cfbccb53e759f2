"""Ingest: sources (scenes, studies, slides) and their labels become one versioned, leakage-free dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from prefect import flow
from pydantic import BaseModel, Field, field_validator, model_validator

from domains import IngestRequest
from flows.error_reporting import report_input_errors
from flows.parameters import DomainName
from tasks.dataset import QUARANTINE_FILE, SplitParams, dataset_location, require_utf8_path
from tasks.ingest_sources import assemble_dataset_task, ingest_source_task, plan_ingest_task
from tasks.task_runners import TaskRunnerParams, open_task_runner

MAX_SOURCES = 10000
SourcePath = Annotated[str, Field(min_length=1, max_length=1000)]
LabelPath = Annotated[str, Field(max_length=1000)]


class TilingParams(BaseModel):
    """How a source is cut into samples and grouped against leakage."""

    tile_size: int = Field(32, ge=8, le=1024, description="Side of each square tile in pixels (also the model input size)")
    stride: int = Field(32, ge=1, le=1024, description="Step between tiles in pixels; smaller than tile_size overlaps")
    block_size: int | None = Field(None, ge=8, le=100000,
                                   description="Side of the spatial blocks that are kept whole within one split "
                                               "(pixels); empty uses the domain's default (satellite 128, "
                                               "hyperspectral 64)")
    max_nodata_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Tiles with more nodata than this are dropped")
    tile_mpp: float | None = Field(None, gt=0.02, lt=100.0,
                                   description="Resolution tiles are cut at, in microns per pixel (whole-slide "
                                               "images: a 224 px tile at 0.5 covers 112 um whatever the scanner); "
                                               "empty uses the domain's default (histopathology 0.5)")
    group_by: Literal["patient", "site"] | None = Field(
        None, description="Leakage group of whole-slide images: 'patient' keeps each patient's slides in one "
                          "split; 'site' keeps each site's slides in one split (needs a site column in the "
                          "slide manifest; a patient seen at two sites is refused). Empty: patient. Other "
                          "domains ignore it")
    cloud_mask: Literal["none", "qa", "model", "auto"] = Field(
        "none", description="Satellite: how clouds and their shadows are found: the sensor's quality band "
                            "(QA_PIXEL, BQA, SCL, Fmask), the offline ukis-csmask model, or either ('auto': the "
                            "quality band where the scene has one). Other domains ignore it")
    task: Literal["classification", "segmentation"] | None = Field(
        None, description="Satellite: 'segmentation' learns a class per pixel from the label raster (predict then "
                          "writes a pixel class map), 'classification' one class per tile; empty: the domain's task")
    max_cloud_fraction: float = Field(1.0, ge=0.0, le=1.0,
                                      description="Satellite: tiles with a larger share of cloud/shadow pixels are "
                                                  "dropped and counted (1 keeps every tile)")


class IngestParams(BaseModel):
    """Turn one or several sources and their labels into one dataset (manifest + shards + digest).

    Give ``source`` for one source, or ``sources`` for several: each is then read by its own task
    (in parallel, on this machine or a Dask cluster), checkpointed, and a rerun after a crash reads only
    the sources not finished yet. A source that cannot be read is listed in the dataset's quarantine
    file and the others are kept.
    """

    domain: DomainName = "satellite"
    source: str | None = Field(None, min_length=1, max_length=1000,
                               description="One source, the domain's input: scene folder or multi-band GeoTIFF "
                                           "(satellite), folder of DICOM/NIfTI studies (radiology), ENVI cube "
                                           "(hyperspectral), slide or folder of slides (histopathology). Leave "
                                           "empty when using 'sources'")
    sources: list[SourcePath] = Field(default_factory=list, max_length=MAX_SOURCES,
                                      description="Several sources (scenes, study folders, cubes) that become one "
                                                  "dataset; each is read and checkpointed on its own. Leave empty "
                                                  "when using 'source'")
    labels: str | None = Field(None, max_length=1000, description="Labels: class raster (satellite), findings CSV "
                                                                  "(radiology), plume mask (hyperspectral), slide "
                                                                  "manifest CSV (histopathology) for "
                                                                  "'source', or one file shared by all 'sources' "
                                                                  "(e.g. a findings CSV keyed by patient); empty "
                                                                  "for an unlabelled dataset")
    source_labels: list[LabelPath] = Field(default_factory=list, max_length=MAX_SOURCES,
                                           description="One label file per entry of 'sources', in the same order "
                                                       "(e.g. a class raster per scene); an empty entry leaves "
                                                       "that source unlabelled")
    out: str = Field(..., min_length=1, max_length=1000,
                     description="Folder or fsspec URL (e.g. s3://bucket/prefix) the dataset is written to")
    tiling: TilingParams = Field(default_factory=TilingParams, description="Tiling and blocking")
    split: SplitParams = Field(default_factory=SplitParams, description="Split fractions and seed")
    bands: list[str] | None = Field(None, max_length=512,
                                    description="Input channels: band names in file order (satellite multi-band "
                                                "file), CT window presets (radiology), band selection (hyperspectral)")
    sensor: str | None = Field(None, max_length=64, description="Sensor band table (sentinel2, landsat4, "
                                                                "landsat5, landsat7, landsat8, landsat9, hls, "
                                                                "sentinel1); empty to infer from file names. Given, "
                                                                "band files are matched by their band suffix "
                                                                "whatever their prefix")
    class_names: list[str] | None = Field(None, max_length=1000, description="Names of label values 0..K-1")
    mpp: float | None = Field(None, gt=0.02, lt=100.0,
                              description="Resolution of the sources in microns per pixel, for whole-slide images whose metadata states none "
                                                 "(never guessed from objective power); empty reads it from each slide")
    runner: TaskRunnerParams = Field(default_factory=TaskRunnerParams,
                                     description="Where the sources are read: threads here, or a Dask cluster")
    keep_parts: bool = Field(False, description="Keep each source's checkpoint after the dataset is written, so a "
                                                "later ingest that adds sources reads only the new ones (they take "
                                                "as much space as the dataset)")

    @field_validator("source", "labels", "out", mode="before")
    @classmethod
    def _text_paths(cls, value: object) -> object:
        return require_utf8_path(value)

    @field_validator("sources", "source_labels", mode="before")
    @classmethod
    def _text_path_lists(cls, value: object) -> object:
        return [require_utf8_path(item) for item in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_way_to_name_sources(self) -> IngestParams:
        if (self.source is None) == (not self.sources):
            raise ValueError("give either 'source' (one) or 'sources' (several)")
        if self.source_labels and (len(self.source_labels) != len(self.sources) or self.labels):
            raise ValueError(f"'source_labels' needs one entry per source ({len(self.sources)}) and no 'labels'; "
                             f"got {len(self.source_labels)}")
        return self

    def source_paths(self) -> list[str]:
        """Every source, in order."""
        return [self.source] if self.source is not None else list(self.sources)

    def label_paths(self) -> list[str | None]:
        """The label file of each source (None: unlabelled), aligned with :meth:`source_paths`."""
        if self.source_labels:
            return [label or None for label in self.source_labels]
        return [self.labels or None] * len(self.source_paths())


class IngestReceipt(BaseModel):
    """Where the dataset is, what it holds, and how many input files, series or sources were left out."""

    dataset: str
    digest: str
    split_counts: dict[str, int]
    dropped: dict[str, int]
    quarantined: int = 0
    quarantine_file: str | None = None
    sources: int = 1
    resumed: int = 0
    """Sources whose checkpoint an earlier, interrupted run had already finished."""


@flow(name="ingest-dataset", flow_run_name="ingest-{params.domain}", log_prints=True)
@report_input_errors
def ingest_dataset(params: IngestParams) -> IngestReceipt:
    """Read each source with its domain's reader, tile it, split by leakage group and write one dataset."""
    request = IngestRequest(
        source=Path(params.source_paths()[0]), tile_size=params.tiling.tile_size, stride=params.tiling.stride,
        block_size=params.tiling.block_size, max_nodata_fraction=params.tiling.max_nodata_fraction,
        channels=tuple(params.bands) if params.bands else None, sensor=params.sensor,
        class_names=tuple(params.class_names) if params.class_names else None,
        mpp=params.mpp, tile_mpp=params.tiling.tile_mpp, group_by=params.tiling.group_by,
        cloud_mask=params.tiling.cloud_mask, max_cloud_fraction=params.tiling.max_cloud_fraction,
        task=params.tiling.task,
    )
    dataset = dataset_location(params.out)
    plan = plan_ingest_task(params.domain, request, params.source_paths(), params.label_paths(), dataset)
    with open_task_runner(params.runner) as runner:
        parts = runner.map(ingest_source_task, {"job": plan.jobs})
        info = assemble_dataset_task(plan, parts, params.split, params.keep_parts)
    return IngestReceipt(dataset=dataset, digest=info.digest, split_counts=info.split_counts,
                         dropped=info.dropped, quarantined=info.quarantined,
                         quarantine_file=f"{dataset}/{QUARANTINE_FILE}", sources=len(info.sources),
                         resumed=plan.resumed)
