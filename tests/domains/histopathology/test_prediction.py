"""Per-slide predictions: JSON report, pyramidal OME-TIFF heatmap aligned with the slide, QuPath GeoJSON."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from domains import PredictionRequest, get_domain
from domains.histopathology.examples import tissue_texture, write_example, write_pyramid_tiff
from domains.histopathology.prediction import THRESHOLD, tile_features, write_heatmap
from domains.spec import DomainInputError

SPEC = get_domain("histopathology")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example(tmp_path_factory.mktemp("histo-predict"), seed=0)


def red_is_normal(batch: np.ndarray) -> np.ndarray:
    """A stand-in model: 'tumor' probability grows as the tile gets darker (dense nuclei are dark)."""
    brightness = batch.mean(axis=(1, 2, 3))
    tumour = np.clip((0.8 - brightness) * 5, 0, 1)
    return np.stack([1 - tumour, tumour], axis=1).astype(np.float32)


def _predict(slide, output, **kwargs):
    options = dict(input=slide, output=output, channels=SPEC.default_channels, class_names=("normal", "tumor"),
                   tile_size=32, stride=32, infer=red_is_normal)
    options.update(kwargs)
    return SPEC.predict(PredictionRequest(**options))


def test_prediction_writes_report_heatmap_and_geojson(example, tmp_path):
    import tifffile

    slide = example["source"] / "A1.tif"
    name = SPEC.name_prediction(slide)
    assert name.startswith("slide-") and "A1" not in name
    summary = _predict(slide, tmp_path / f"{name}.json")
    report = json.loads((tmp_path / f"{name}.json").read_text())
    assert report["slide"].startswith("sl-") and "A1" not in json.dumps(report)
    assert report["tiles"]["scored"] == summary.samples > 0
    scores = report["slide_score"]["per_class"]
    assert scores["tumor"]["max"] >= scores["tumor"]["top_k_mean"] >= scores["tumor"]["mean"]
    assert report["slide_score"]["k"] == 16
    assert report["slide_score"]["present"] == [n for n in ("normal", "tumor") if scores[n]["top_k_mean"] >= 0.5]
    assert len(report["top_tiles"]["tumor"]) == 8

    # Heatmap: one pixel per 32 px tile step over the 384 px slide, pixel size = 16 um, NaN on glass.
    heat_path = tmp_path / report["outputs"]["heatmap"]
    with tifffile.TiffFile(heat_path) as tif:
        assert tif.is_ome and "PhysicalSizeX=\"16.0\"" in tif.ome_metadata
        heat = tif.series[0].asarray()
    assert heat.shape == (2, 12, 12) and heat.dtype == np.float32
    assert np.isnan(heat[:, 0, 0]).all() and np.isfinite(heat[:, 6, 6]).all()
    np.testing.assert_allclose(np.nansum(heat, axis=0)[np.isfinite(heat[0])], 1.0, rtol=1e-5)
    # The dark "tumor" half of the example (right) scores higher than the "normal" half (left).
    assert np.nanmean(heat[1, :, 6:]) > np.nanmean(heat[1, :, :6])

    features = json.loads((tmp_path / report["outputs"]["geojson"]).read_text())["features"]
    assert len(features) == report["outputs"]["geojson_tiles"] > 0
    assert all(max(f["properties"]["measurements"].values()) >= THRESHOLD for f in features)


def test_heatmap_is_a_pyramid_when_large(tmp_path):
    import tifffile

    heat = np.random.default_rng(0).random((2, 300, 260)).astype(np.float32)
    heat[:, :10] = np.nan
    path = write_heatmap(tmp_path / "h.ome.tif", heat, (112.0, 112.0), ("a", "b"))
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [lvl.shape for lvl in levels] == [(2, 300, 260), (2, 150, 130), (2, 75, 65)]
        np.testing.assert_array_equal(levels[0].asarray(), heat)
        assert np.isnan(levels[1].asarray()[:, :5]).all()


def test_geojson_tiles_are_in_qupath_coordinates(tmp_path):
    origins = np.array([[1000, 500], [1224, 500]])
    scores = np.array([[0.2, 0.8], [0.55, 0.45]], np.float32)
    collection = tile_features(origins, scores, (224.0, 224.0), bounds=(1000, 500), class_names=("normal", "tumor"),
                               threshold=0.6)
    [feature] = collection["features"]
    assert feature["geometry"]["coordinates"][0][0] == [0.0, 0.0]
    assert feature["geometry"]["coordinates"][0][2] == [224.0, 224.0]
    assert feature["properties"]["classification"]["name"] == "tumor"


def test_a_folder_lists_slides_only_and_a_broken_slide_fails_alone(example, tmp_path):
    drop = tmp_path / "drop"
    shutil.copytree(example["source"], drop)
    (drop / "notes.csv").write_text("a,b\n")
    (drop / "broken.svs").write_bytes(b"")
    inputs = SPEC.list_prediction_inputs(drop)
    assert [p.name for p in inputs] == ["A1.tif", "B1.tif", "B2.tif", "C1.tif", "broken.svs"]
    with pytest.raises(DomainInputError, match="empty file"):
        _predict(drop / "broken.svs", tmp_path / "out" / "broken.json")
    assert _predict(drop / "B1.tif", tmp_path / "out" / "b1.json").samples > 0


def _tissue_on_glass(side: int, seed: int = 0) -> np.ndarray:
    image = np.ones((side, side, 3), np.float32)
    margin = side // 8
    image[margin:side - margin, margin:side - margin] = tissue_texture(np.random.default_rng(seed), side - 2 * margin,
                                                                        side - 2 * margin)
    return (image * 255).astype(np.uint8)


def test_a_slide_without_mpp_needs_one(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "nompp.tif", _tissue_on_glass(1024), photometric="rgb", tile=(64, 64))
    with pytest.raises(DomainInputError, match="--mpp"):
        _predict(tmp_path / "nompp.tif", tmp_path / "out.json")
    _predict(tmp_path / "nompp.tif", tmp_path / "out.json", mpp=0.25)
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["resolution"]["mpp_source"] == "user --mpp"
    # 32 px tiles at 0.5 um/px on a 0.25 um/px slide span 64 slide pixels: a 16 x 16 grid over 1024 px.
    assert report["tiles"]["scored"] + sum(report["tiles"]["dropped"].values()) == 16 * 16
    assert report["tiles"]["scored"] > 100


def test_tiles_come_at_the_model_mpp_whatever_the_slide_resolution(tmp_path):
    write_pyramid_tiff(tmp_path / "fine.tif", _tissue_on_glass(1024, seed=3), 0.25, tile=64)
    seen = []

    def record(batch):
        seen.append(batch.shape)
        return red_is_normal(batch)

    _predict(tmp_path / "fine.tif", tmp_path / "fine.json", infer=record)
    report = json.loads((tmp_path / "fine.json").read_text())
    assert seen and all(shape[1:] == (3, 32, 32) for shape in seen)
    assert report["outputs"]["heatmap_pixel_um"] == [16.0, 16.0]
    assert report["tiles"]["scored"] + sum(report["tiles"]["dropped"].values()) == 16 * 16


def test_heatmap_grid_starts_at_the_bounds_offset():
    from domains.histopathology.prediction import _heatmap
    from domains.histopathology.slide import SlideGeometry

    geometry = SlideGeometry(width=1100, height=600, mpp_x=0.25, mpp_y=0.25, mpp_source="test",
                             levels=((1100, 600, 1.0),), bounds_x=100, bounds_y=88, format="test")
    # 64 level-0 px per step (32 px tiles at 0.5 um/px on a 0.25 um/px slide), grid from (100, 88).
    origins = np.array([[100, 88], [164, 88], [100 + 64 * 15, 88 + 64 * 7]])
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], np.float32)
    heat = _heatmap(geometry, origins, scores, (64.0, 64.0))
    assert heat.shape == (2, 8, 16)  # ceil(512 / 64) rows, ceil(1000 / 64) cols
    assert heat[1, 0, 0] == pytest.approx(0.1) and heat[1, 0, 1] == pytest.approx(0.8)
    assert heat[0, 7, 15] == pytest.approx(0.5) and np.isnan(heat[0, 3, 3])


def test_a_slide_without_tissue_gets_a_report_without_a_score(tmp_path):
    blank = np.full((512, 512, 3), 245, np.uint8)  # empty glass
    write_pyramid_tiff(tmp_path / "blank.tif", blank, 0.5, tile=64)
    summary = _predict(tmp_path / "blank.tif", tmp_path / "blank.json")
    report = json.loads((tmp_path / "blank.json").read_text())
    assert summary.samples == 0 and report["tiles"]["scored"] == 0
    assert report["slide_score"]["per_class"] is None and report["slide_score"]["present"] == []
    assert json.loads((tmp_path / report["outputs"]["geojson"]).read_text())["features"] == []


def darkest_tiles_decide(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in slide model: attention on the darkest tiles; the slide is 'tumor' as far as they are dark."""
    darkness = 1.0 - tiles.mean(axis=(1, 2, 3))
    weights = np.exp(20 * darkness)
    weights /= weights.sum()
    tumour = float(np.clip((weights * darkness).sum() * 4, 0, 1))
    return np.array([1 - tumour, tumour], dtype=np.float32), weights.astype(np.float32)


def test_slide_model_prediction_reports_the_slide_score_and_attention(example, tmp_path):
    import tifffile

    slide = example["source"] / "A1.tif"
    seen = []

    def slide_model(tiles):
        seen.append(tiles.shape)
        return darkest_tiles_decide(tiles)

    summary = _predict(slide, tmp_path / "slide.json", infer_bag=slide_model)
    report = json.loads((tmp_path / "slide.json").read_text())
    assert len(seen) == 1 and seen[0][1:] == (3, 32, 32)  # every kept tile in one bag
    assert report["task"] == "slide-classification"
    assert report["tiles"]["scored"] == summary.samples == seen[0][0]
    per_class = report["slide_score"]["per_class"]
    assert per_class["normal"] + per_class["tumor"] == pytest.approx(1.0, abs=1e-5)
    assert report["slide_score"]["predicted"] == max(per_class, key=per_class.get)
    top = report["top_tiles"]["by_attention"]
    assert len(top) == 8 and [t["attention"] for t in top] == sorted((t["attention"] for t in top), reverse=True)
    with tifffile.TiffFile(tmp_path / report["outputs"]["heatmap"]) as tif:
        heat = tif.series[0].asarray()
        assert 'Name="attention"' in tif.ome_metadata
    heat = heat.reshape((-1, *heat.shape[-2:]))
    assert heat.shape[0] == 1  # one channel: attention relative to an average tile
    assert np.nanmean(heat) == pytest.approx(1.0, rel=1e-4)
    geojson = json.loads((tmp_path / report["outputs"]["geojson"]).read_text())
    relative = [f["properties"]["measurements"]["relative attention"] for f in geojson["features"]]
    assert relative and min(relative) >= 2.0
    assert sum(np.asarray(heat[0][np.isfinite(heat[0])]) >= 2.0) == len(relative)


def test_slide_model_scores_at_most_its_tile_budget(example, tmp_path):
    slide = example["source"] / "A1.tif"
    seen = []

    def slide_model(tiles):
        seen.append(len(tiles))
        return darkest_tiles_decide(tiles)

    _predict(slide, tmp_path / "slide.json", infer_bag=slide_model, bag_max_tiles=10)
    report = json.loads((tmp_path / "slide.json").read_text())
    assert seen[0] <= 10 < report["tiles"]["tissue_tiles"]
    assert report["tiles"]["bag_max_tiles"] == 10
