"""Fixtures of the satellite domain tests: one tiny example scene written through the domain's own writer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from domains.satellite.examples import write_example


@pytest.fixture(scope="session")
def example(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example written once per session; tests must not modify these files."""
    return write_example(tmp_path_factory.mktemp("satellite-example"), seed=0)


@pytest.fixture
def scene_copy(example: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the example's band folder, for tests that damage files."""
    target = tmp_path / example["scene_dir"].name
    shutil.copytree(example["scene_dir"], target)
    return target


@pytest.fixture
def write_tif():
    """Return a function writing a small GeoTIFF: ``write_tif(path, bands, resolution=10, crs=..., nodata=0)``."""

    def write(
        path: Path,
        bands,
        resolution: float = 10.0,
        crs: str | None = "EPSG:32618",
        nodata: float | None = 0,
        origin: tuple[float, float] = (438120.0, 4177080.0),
        descriptions: tuple[str, ...] = (),
    ) -> Path:
        import numpy as np
        import rasterio
        from affine import Affine

        bands = np.asarray(bands)
        if bands.ndim == 2:
            bands = bands[None]
        profile = dict(
            driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
            dtype=bands.dtype.name, nodata=nodata,
            transform=Affine(resolution, 0.0, origin[0], 0.0, -resolution, origin[1]),
        )
        if crs is not None:
            profile["crs"] = crs
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(bands)
            for i, d in enumerate(descriptions):
                ds.set_band_description(i + 1, d)
        return path

    return write
