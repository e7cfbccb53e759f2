"""Ingest: a source (scene, study, slide) and its labels become a versioned, leakage-free dataset."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel, Field, field_validator

from domains import IngestRequest
from flows.error_reporting import report_input_errors
from flows.parameters import DomainName
from tasks.dataset import (
    QUARANTINE_FILE,
    SplitParams,
    build_dataset_task,
    dataset_location,
    require_utf8_path,
)


class TilingParams(BaseModel):
    """How a source is cut into samples and grouped against leakage."""

    tile_size: int = Field(32, ge=8, le=1024, description="Side of each square tile in pixels (also the model input size)")
    stride: int = Field(32, ge=1, le=1024, description="Step between tiles in pixels; smaller than tile_size overlaps")
    block_size: int | None = Field(None, ge=8, le=100000,
                                   description="Side of the spatial blocks that are kept whole within one split "
                                               "(pixels); empty uses the domain's default (satellite 128, "
                                               "hyperspectral 64)")
    max_nodata_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Tiles with more nodata than this are dropped")


class IngestParams(BaseModel):
    """Turn a source and its labels into a dataset (manifest + shards + digest)."""

    domain: DomainName = "satellite"
    source: str = Field(..., min_length=1, max_length=1000,
                        description="The domain's input: scene folder or multi-band GeoTIFF (satellite), folder of "
                                    "DICOM/NIfTI studies (radiology), ENVI cube (hyperspectral)")
    labels: str | None = Field(None, max_length=1000, description="Labels: class raster (satellite), findings CSV "
                                                                  "(radiology), plume mask (hyperspectral); empty "
                                                                  "for an unlabelled dataset")
    out: str = Field(..., min_length=1, max_length=1000,
                     description="Folder or fsspec URL (e.g. s3://bucket/prefix) the dataset is written to")
    tiling: TilingParams = Field(default_factory=TilingParams, description="Tiling and blocking")
    split: SplitParams = Field(default_factory=SplitParams, description="Split fractions and seed")
    bands: list[str] | None = Field(None, max_length=512,
                                    description="Input channels: band names in file order (satellite multi-band "
                                                "file), CT window presets (radiology), band selection (hyperspectral)")
    sensor: str | None = Field(None, max_length=64, description="Sensor band table (sentinel2, landsat8, landsat9); "
                                                                "empty to infer from file names")
    class_names: list[str] | None = Field(None, max_length=1000, description="Names of label values 0..K-1")

    @field_validator("source", "labels", "out", mode="before")
    @classmethod
    def _text_paths(cls, value: object) -> object:
        return require_utf8_path(value)


class IngestReceipt(BaseModel):
    """Where the dataset is, what it holds, and how many input files or series were left out (quarantined)."""

    dataset: str
    digest: str
    split_counts: dict[str, int]
    dropped: dict[str, int]
    quarantined: int = 0
    quarantine_file: str | None = None


@flow(name="ingest-dataset", flow_run_name="ingest-{params.domain}", log_prints=True)
@report_input_errors
def ingest_dataset(params: IngestParams) -> IngestReceipt:
    """Read a source with its domain's reader, tile it, split by leakage group and write a dataset."""
    request = IngestRequest(
        source=Path(params.source), labels=Path(params.labels) if params.labels else None,
        tile_size=params.tiling.tile_size, stride=params.tiling.stride, block_size=params.tiling.block_size,
        max_nodata_fraction=params.tiling.max_nodata_fraction,
        channels=tuple(params.bands) if params.bands else None, sensor=params.sensor,
        class_names=tuple(params.class_names) if params.class_names else None,
    )
    dataset = dataset_location(params.out)
    info = build_dataset_task(params.domain, request, dataset, params.split)
    return IngestReceipt(dataset=dataset, digest=info.digest, split_counts=info.split_counts,
                         dropped=info.dropped, quarantined=info.quarantined,
                         quarantine_file=f"{dataset}/{QUARANTINE_FILE}")
