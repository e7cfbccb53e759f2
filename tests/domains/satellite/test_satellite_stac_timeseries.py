"""Scenes as STAC items (item file or static catalogue), prediction STAC items, and time-series stacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from domains.satellite.prediction import list_prediction_inputs, predict_scene
from domains.satellite.scene import inspect_scene, read_scene
from domains.satellite.sensor_examples import write_raster, write_sensor_example
from domains.satellite.sensors import LANDSAT8
from domains.satellite.tiling import read_samples
from domains.spec import Channel, DomainInputError, IngestRequest, PredictionRequest

BANDS = {"coastal": "SR_B1", "blue": "SR_B2", "green": "SR_B3", "red": "SR_B4", "nir08": "SR_B5"}


def write_item(folder: Path, scene: Path, item_id: str = "LC08_L2SP_014034_20230615_02_T1") -> Path:
    """A STAC item as the USGS/Planetary Computer catalogues publish Landsat C2 L2: assets by common name."""
    import pystac
    from datetime import datetime, timezone

    item = pystac.Item(id=item_id, geometry=None, bbox=None, datetime=datetime(2023, 6, 15, tzinfo=timezone.utc),
                       properties={"platform": "landsat-8", "processing:level": "L2SP"})
    for key, band in BANDS.items():
        href = next(scene.glob(f"*_{band}.TIF"))
        item.add_asset(key, pystac.Asset(href=str(href), media_type=pystac.MediaType.COG, roles=["data"], extra_fields={
            "eo:bands": [{"name": band, "common_name": key}],
            "raster:bands": [{"scale": 2.75e-05, "offset": -0.2, "nodata": 0}]}))
    item.add_asset("qa_pixel", pystac.Asset(href=str(next(scene.glob("*_QA_PIXEL.TIF"))), roles=["cloud"]))
    item.add_asset("thumbnail", pystac.Asset(href="https://example.invalid/thumb.jpg", roles=["thumbnail"]))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{item_id}.json"
    path.write_text(json.dumps(item.to_dict(include_self_link=False)))
    return path


@pytest.fixture(scope="module")
def landsat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sensor_example(tmp_path_factory.mktemp("l8"), "landsat8-c2-l2", size=36).path


def test_stac_item_resolves_bands_from_assets(landsat: Path, tmp_path: Path) -> None:
    item = write_item(tmp_path, landsat)
    layout = inspect_scene(item, None, None, None)
    assert layout.sensor.name == "landsat8" and layout.level == "l2sr"
    assert [b.name for b in layout.bands] == ["B1", "B2", "B3", "B4", "B5"]
    assert layout.quality is not None and layout.quality.kind == "landsat-qa-pixel"
    assert {b.scale.name for b in layout.bands} == {"stac-raster-bands"}
    scene = read_scene(item)
    assert scene.select(("B4",)).data[0][18, 2] == pytest.approx(0.065, abs=0.01)
    batches = list(read_samples(IngestRequest(source=item, tile_size=12, stride=12, block_size=12,
                                              cloud_mask="qa")))
    assert sum(len(b.images) for b in batches) == 9
    assert batches[-1].provenance["cloud_mask"] == "qa:landsat-qa-pixel"


def test_static_catalogue_folder_is_a_scene(landsat: Path, tmp_path: Path) -> None:
    import pystac

    catalog = pystac.Catalog(id="demo", description="one Landsat scene")
    catalog.add_item(pystac.Item.from_file(str(write_item(tmp_path / "src", landsat))))
    catalog.normalize_and_save(str(tmp_path / "catalog"), catalog_type=pystac.CatalogType.SELF_CONTAINED)
    assert list_prediction_inputs(tmp_path / "catalog") == [tmp_path / "catalog"]
    assert inspect_scene(tmp_path / "catalog", ("B4",), None, None).bands[0].name == "B4"


def test_stac_item_with_a_missing_asset_is_a_clear_error(landsat: Path, tmp_path: Path) -> None:
    scene = tmp_path / "scene"
    shutil.copytree(landsat, scene)
    item = write_item(tmp_path, scene)
    next(scene.glob("*_SR_B4.TIF")).unlink()
    with pytest.raises(DomainInputError, match=r"\.json: asset file\(s\) missing: red \(.*SR_B4.TIF\)"):
        inspect_scene(item, None, None, None)


def _infer(batch: np.ndarray) -> np.ndarray:
    probs = np.zeros((len(batch), 3), dtype=np.float32)
    probs[np.arange(len(batch)), (batch[:, 0].mean(axis=(1, 2)) > 0.1).astype(int)] = 1.0
    return probs


def test_prediction_of_a_stac_item_is_written_with_a_stac_item(landsat: Path, tmp_path: Path) -> None:
    item = write_item(tmp_path, landsat)
    out = tmp_path / "pred" / "map.tif"
    predict_scene(PredictionRequest(input=item, output=out, channels=tuple(LANDSAT8.channel(b) for b in ("B4", "B5")),
                                    class_names=("water", "vegetation", "bare_or_built"), tile_size=12, stride=12,
                                    infer=_infer))
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["type"] == "Feature" and written["id"] == "map"
    assert written["properties"]["datetime"].startswith("2023-06-15")
    assert written["assets"]["classes"]["href"] == "./map.tif"
    assert [c["name"] for c in written["assets"]["classes"]["classification:classes"]] == ["water", "vegetation",
                                                                                          "bare_or_built"]
    west, south, east, north = written["bbox"]
    assert -78 < west < east < -75 and 37 < south < north < 38.5  # UTM 18N near the example origin
    assert any(link["rel"] == "derived_from" for link in written["links"])


def make_stack(root: Path, landsat: Path, dates=("20230615", "20230817")) -> Path:
    stack = root / "stack"
    for date in dates:
        target = stack / landsat.name.replace("20230615", date, 1)
        shutil.copytree(landsat, target)
        for path in target.iterdir():
            path.rename(target / path.name.replace("20230615", date, 1))
    return stack


def test_two_dates_stack_as_time_indexed_channels(landsat: Path, tmp_path: Path) -> None:
    stack = make_stack(tmp_path, landsat)
    batches = list(read_samples(IngestRequest(source=stack, channels=("B4", "B5"), tile_size=12, stride=12,
                                              block_size=12)))
    names = tuple(c.name for c in batches[0].channels)
    assert names == ("t0:B4", "t0:B5", "t1:B4", "t1:B5")
    provenance = batches[-1].provenance
    assert provenance["dates"] == "2023-06-15,2023-08-17" and provenance["time_steps"] == "2"
    images = np.concatenate([b.images for b in batches])
    # Both dates of a location live in one sample, so a split by spatial block keeps them together.
    assert len(images) == 9 and np.array_equal(images[:, :2], images[:, 2:])
    assert list_prediction_inputs(stack) == [stack]
    out = tmp_path / "stack.tif"
    channels = tuple(Channel(n, 0.0, 30.0) for n in names)
    summary = predict_scene(PredictionRequest(input=stack, output=out, channels=channels,
                                              class_names=("water", "vegetation", "bare_or_built"), tile_size=12,
                                              stride=12, infer=_infer,
                                              input_contract={"sensor": "landsat8", "level": "l2sr"}))
    assert summary.samples == 9
    with rasterio.open(out) as ds:
        assert ds.tags()["channels"] == ",".join(names)
    with pytest.raises(DomainInputError, match="is a time series .* but the model takes one date"):
        predict_scene(PredictionRequest(input=stack, output=tmp_path / "x.tif",
                                        channels=(LANDSAT8.channel("B4"),), class_names=("a", "b"), tile_size=12,
                                        stride=12, infer=_infer))


def test_dates_on_different_grids_are_a_clear_error(landsat: Path, tmp_path: Path) -> None:
    stack = make_stack(tmp_path, landsat)
    moved = sorted(stack.iterdir())[1]
    for path in moved.glob("*.TIF"):
        with rasterio.open(path) as ds:
            values, nodata = ds.read(1), ds.nodata
        write_raster(path, values, 30.0, nodata, origin=(438150.0, 4177080.0))
    with pytest.raises(DomainInputError, match="date 2023-08-17 is on another grid than date 2023-06-15"):
        inspect_scene(stack, None, None, None)


def test_a_band_folder_described_as_a_stac_item_reads_the_same(example, tmp_path: Path) -> None:
    from domains.satellite.stac import write_scene_item

    item = write_scene_item(example["scene_dir"], tmp_path / "catalogue" / "scene.json")
    written = json.loads(item.read_text())
    assert written["assets"]["B8A"]["eo:bands"][0]["name"] == "B8A"
    assert not Path(written["assets"]["B04"]["href"]).is_absolute()
    np.testing.assert_array_equal(read_scene(item).data, read_scene(example["scene_dir"]).data)
