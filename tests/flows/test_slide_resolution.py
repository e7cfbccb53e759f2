"""Slide resolution options reach the reader from the CLI and the flows; a model keeps the mpp it was cut at."""

from __future__ import annotations

import numpy as np
import pytest

from flows.cli import build_parser, pipeline_payload
from flows.ingest import IngestParams, TilingParams, ingest_dataset
from flows.pipeline import PipelineParams
from tasks.dataset import read_dataset_info
from tasks.finetune import model_metadata
from tasks.models import BackboneParams


def _slide_without_mpp(folder) -> None:
    """A tiled RGB TIFF, tissue on glass, with no resolution tags (no mpp in its metadata)."""
    import tifffile

    from domains.histopathology.examples import tissue_texture

    folder.mkdir(parents=True)
    image = np.ones((384, 384, 3), np.float32)
    image[32:352, 32:352] = tissue_texture(np.random.default_rng(0), 320, 320)
    pixels = (image * 255).astype(np.uint8)
    tifffile.imwrite(folder / "nompp.tif", pixels, photometric="rgb", tile=(64, 64))


def test_cli_passes_the_slide_mpp_and_the_tile_mpp():
    args = build_parser().parse_args(["pipeline", "--domain", "histopathology", "--source", "slides",
                                      "--labels", "manifest.csv", "--mpp", "0.25", "--tile-mpp", "1.0"])
    params = PipelineParams(**pipeline_payload(args))
    assert params.mpp == 0.25 and params.tiling.tile_mpp == 1.0
    predict = build_parser().parse_args(["predict", "--domain", "histopathology", "--input", "s", "--output", "o",
                                         "--mpp", "0.25"])
    assert predict.mpp == 0.25


def test_ingest_flow_refuses_a_slide_without_mpp_then_reads_it_at_the_given_mpp(tmp_path):
    _slide_without_mpp(tmp_path / "slides")
    tiling = TilingParams(tile_size=32, stride=32, tile_mpp=1.0)
    with pytest.raises(Exception, match="--mpp"):
        ingest_dataset(IngestParams(domain="histopathology", source=str(tmp_path / "slides"),
                                    out=str(tmp_path / "refused"), tiling=tiling))
    receipt = ingest_dataset(IngestParams(domain="histopathology", source=str(tmp_path / "slides"),
                                          out=str(tmp_path / "dataset"), tiling=tiling, mpp=0.5))
    info = read_dataset_info(receipt.dataset)
    assert float(info.provenance["tile_mpp"]) == 1.0
    # 384 px at 0.5 um/px is 192 um a side: 32 px tiles at 1.0 um/px give at most a 6 x 6 grid.
    assert 0 < sum(info.split_counts.values()) <= 36
    assert model_metadata(info, BackboneParams())["tile_mpp"] == 1.0
