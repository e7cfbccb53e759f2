"""Cloud and shadow masking (quality layers and the offline model), and the radiometric contract at predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from domains.satellite.clouds import decode_quality
from domains.satellite.prediction import PREDICTION_NODATA, predict_scene
from domains.satellite.sensor_examples import cloud_map, cover_with_clouds, write_sensor_example
from domains.satellite.sensors import get_sensor
from domains.satellite.tiling import read_samples
from domains.spec import DomainInputError, IngestRequest, PredictionRequest

SIZE, TILE = 60, 12
CLOUDS = cloud_map(SIZE, seed=1)


def expected_cloudy_tiles(max_fraction: float) -> int:
    """Tiles whose cloud+shadow share exceeds ``max_fraction``, counted on the generated map itself."""
    covered = CLOUDS > 0
    return sum(
        covered[r : r + TILE, c : c + TILE].mean() > max_fraction
        for r in range(0, SIZE, TILE) for c in range(0, SIZE, TILE)
    )


@pytest.fixture(scope="module")
def cloudy(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cloudy")
    return {name: cover_with_clouds(write_sensor_example(root / name, name, size=SIZE), CLOUDS)
            for name in ("landsat8-c2-l2", "sentinel2-l2a-safe", "hls-l30", "landsat5-c1-l1")}


@pytest.mark.parametrize(
    ("kind", "values", "cloud", "shadow"),
    [
        # QA_PIXEL: clear 21824, high-confidence cloud 55052, shadow 23888, cirrus 56706, dilated 21890, fill 1.
        ("landsat-qa-pixel", [21824, 55052, 23888, 56706, 21890, 1], [0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]),
        # BQA: clear 2720, cloud 2800, high shadow confidence 3008, high cirrus confidence 6816.
        ("landsat-bqa", [2720, 2800, 3008, 6816], [0, 1, 0, 1], [0, 0, 1, 0]),
        ("sentinel2-scl", [4, 8, 9, 10, 3, 2, 0], [0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0]),
        ("hls-fmask", [0, 2, 1, 4, 8, 64, 255], [0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0]),
    ],
)
def test_quality_layers_decode(kind: str, values, cloud, shadow) -> None:
    found_cloud, found_shadow = decode_quality(kind, np.array(values, dtype=np.uint16))
    assert found_cloud.astype(int).tolist() == cloud
    assert found_shadow.astype(int).tolist() == shadow


def _ingest(source: Path, **kw) -> tuple[int, dict[str, int], dict[str, str]]:
    batches = list(read_samples(IngestRequest(source=source, tile_size=TILE, stride=TILE, block_size=TILE, **kw)))
    dropped: dict[str, int] = {}
    for batch in batches:
        for reason, count in batch.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    return sum(len(b.images) for b in batches), dropped, batches[-1].provenance


@pytest.mark.parametrize("name", ["landsat8-c2-l2", "sentinel2-l2a-safe", "hls-l30", "landsat5-c1-l1"])
def test_cloudy_tiles_are_dropped_and_counted_from_the_quality_layer(cloudy, name: str) -> None:
    source = cloudy[name].path
    kept_all, dropped_none, provenance = _ingest(source)
    assert kept_all == 25 and dropped_none.get("cloudy", 0) == 0 and provenance["cloud_mask"] == "none"
    kept, dropped, provenance = _ingest(source, cloud_mask="auto", max_cloud_fraction=0.2)
    assert dropped["cloudy"] == expected_cloudy_tiles(0.2) > 0
    assert kept == 25 - dropped["cloudy"]
    assert provenance["cloud_mask"].startswith("qa:")
    assert provenance["cloud_policy"] == "auto"
    assert float(provenance["cloud_fraction"]) == pytest.approx((CLOUDS > 0).mean(), abs=0.03)
    if name == "landsat5-c1-l1":
        # Rewriting the cloudy bands kept the MTL file (GDAL deletes it when a band is overwritten in place).
        assert "landsat-l1-toa-mtl" in provenance["scaling"]


def test_qa_mask_without_a_quality_layer_is_a_clear_error(tmp_path: Path) -> None:
    example = write_sensor_example(tmp_path, "sentinel2-l1c-flat", size=36)
    with pytest.raises(DomainInputError, match="cloud mask 'qa' needs the sensor's quality layer"):
        read_samples(IngestRequest(source=example.path, cloud_mask="qa", tile_size=12, stride=12, block_size=12))
    # The model needs blue, green, red and NIR among the bands read.
    with pytest.raises(DomainInputError, match="cloud model needs blue, nir"):
        read_samples(IngestRequest(source=example.path, cloud_mask="model", channels=("B03", "B04"),
                                   tile_size=12, stride=12, block_size=12))


@pytest.mark.slow
def test_cloud_model_runs_offline_and_is_recorded(cloudy) -> None:
    """ukis-csmask's ONNX weights ship in its wheel: no download, and model and version land in provenance."""
    kept, dropped, provenance = _ingest(cloudy["sentinel2-l2a-safe"].path, cloud_mask="model", max_cloud_fraction=0.5)
    assert provenance["cloud_mask"].startswith("ukis-csmask ") and "6B" in provenance["cloud_mask"]
    assert kept + dropped.get("cloudy", 0) == 25
    assert 0.0 <= float(provenance["cloud_fraction"]) <= 1.0


@pytest.mark.slow
def test_cloud_model_finds_no_cloud_in_the_cloud_free_demo_scene() -> None:
    """The bundled real Sentinel-2 crop is cloud-free; read at 10 m without averaging to the models' 30 m,
    ukis-csmask called half of it cloud or shadow."""
    from domains.satellite.demo import demo_scene_dir

    kept, dropped, provenance = _ingest(demo_scene_dir(), cloud_mask="model", max_cloud_fraction=0.2)
    assert float(provenance["cloud_fraction"]) < 0.02
    assert dropped.get("cloudy", 0) <= 0.02 * (kept + dropped.get("cloudy", 0))


def _constant_infer(batch: np.ndarray) -> np.ndarray:
    probs = np.zeros((len(batch), 3), dtype=np.float32)
    probs[:, 1] = 1.0
    return probs


def _request(source: Path, output: Path, sensor: str, bands: tuple[str, ...], contract: dict) -> PredictionRequest:
    table = get_sensor(sensor)
    return PredictionRequest(input=source, output=output, channels=tuple(table.channel(b) for b in bands),
                             class_names=("water", "vegetation", "bare_or_built"), tile_size=TILE, stride=TILE,
                             infer=_constant_infer, input_contract=contract)


CONTRACT = {"sensor": "landsat8", "level": "l2sr", "channels": "B2,B3,B4,B5", "scaling_units":
            "reflectance,reflectance,reflectance,reflectance", "cloud_policy": "qa"}


def test_predict_marks_cloud_pixels_nodata(cloudy, tmp_path: Path) -> None:
    out = tmp_path / "classes.tif"
    summary = predict_scene(_request(cloudy["landsat8-c2-l2"].path, out, "landsat8", ("B2", "B3", "B4", "B5"),
                                     CONTRACT))
    with rasterio.open(out) as ds:
        classes = ds.read(1)
        tags = ds.tags()
    assert ((classes == PREDICTION_NODATA) == (CLOUDS > 0)).all()
    assert summary.class_counts["vegetation"] == int((CLOUDS == 0).sum())
    assert tags["cloud_mask"] == "qa:landsat-qa-pixel" and int(tags["cloud_pixels"]) == int((CLOUDS > 0).sum())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sensor": "sentinel2"}, "sensor landsat8 .*trained on sentinel2"),
        ({"level": "l1"}, "processing level l2sr .*trained on l1"),
        ({"scaling_units": "DN,DN,DN,DN"}, "band B2 in reflectance .*trained on DN"),
    ],
)
def test_predict_refuses_a_scene_outside_the_contract(cloudy, tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(DomainInputError, match="radiometric contract: " + message):
        predict_scene(_request(cloudy["landsat8-c2-l2"].path, tmp_path / "x.tif", "landsat8",
                               ("B2", "B3", "B4", "B5"), {**CONTRACT, **change}))
    assert not (tmp_path / "x.tif").exists()
