"""The domain spec, its light import, the example writer and the real demo scene with its label rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import rasterio

import domains
from domains.satellite import SPEC
from domains.satellite.demo import DEMO_CLASS_NAMES, demo_scene_dir, make_demo_labels, write_demo_labels
from domains.satellite.examples import write_example
from domains.satellite.labels import read_label_raster
from domains.satellite.scene import read_scene
from domains.satellite.sensors import SENTINEL2


def test_spec_is_registered() -> None:
    assert domains.get_domain("satellite") is SPEC
    assert SPEC.default_channels == SENTINEL2.channels
    assert SPEC.default_class_names == DEMO_CLASS_NAMES == ("water", "vegetation", "bare_or_built")
    assert SPEC.task == "classification" and SPEC.group_kind == "spatial-block"


def test_import_does_not_load_rasterio() -> None:
    code = (
        "import sys, domains, domains.satellite; domains.registry(); "
        "heavy = [m for m in ('rasterio', 'torch', 'prefect', 'mlflow') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_example_is_reproducible(tmp_path: Path) -> None:
    first = write_example(tmp_path / "a", seed=3)
    second = write_example(tmp_path / "b", seed=3)
    other = write_example(tmp_path / "c", seed=4)
    assert sorted(first) == ["labels", "labels_wgs84", "multiband", "scene_dir", "source"]
    a, b, c = (read_scene(p["scene_dir"]) for p in (first, second, other))
    np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data)
    names = sorted(p.name for p in first["scene_dir"].iterdir())
    assert len(names) == 13 and all(n.startswith("T18SUJ_20230615T155821_B") for n in names)
    with rasterio.open(first["labels_wgs84"]) as ds:
        assert ds.crs.to_epsg() == 4326 and ds.nodata == 255
    total = sum(f.stat().st_size for f in (tmp_path / "a").rglob("*") if f.is_file())
    assert total < 150_000


def test_example_native_resolutions(example: dict[str, Path]) -> None:
    sizes = {}
    for path in example["scene_dir"].iterdir():
        with rasterio.open(path) as ds:
            assert ds.crs.to_epsg() == 32618 and ds.dtypes == ("uint16",) and ds.nodata == 0
            sizes[path.stem.rsplit("_", 1)[1]] = (ds.shape, ds.res)
    assert sizes["B02"] == ((60, 60), (10.0, 10.0))
    assert sizes["B8A"] == ((30, 30), (20.0, 20.0))
    assert sizes["B10"] == ((10, 10), (60.0, 60.0))


def test_demo_rule_recovers_the_example_truth(example: dict[str, Path]) -> None:
    scene = read_scene(example["scene_dir"])
    truth = read_label_raster(example["labels"], scene)
    assert (make_demo_labels(scene) == truth).mean() > 0.99


def test_demo_labels_on_the_real_crop(tmp_path: Path) -> None:
    folder = demo_scene_dir()
    assert (folder / "ATTRIBUTION.md").is_file()
    assert len(list(folder.glob("S2_T18_B*.tif"))) == 13
    scene = read_scene(folder)
    assert scene.shape == (720, 720) and scene.data.shape[0] == 13
    labels = make_demo_labels(scene)
    valid = labels[labels >= 0]
    shares = {name: float((valid == i).mean()) for i, name in enumerate(DEMO_CLASS_NAMES)}
    print("demo label shares:", {k: round(v, 4) for k, v in shares.items()})
    assert all(share >= 0.05 for share in shares.values()), shares
    assert (labels == -1).sum() == (~scene.valid).sum()
    written = write_demo_labels(tmp_path / "demo_labels.tif")
    np.testing.assert_array_equal(read_label_raster(written, scene), labels)


def test_prepare_demo_writes_labels_for_the_bundled_scene(tmp_path: Path) -> None:
    inputs = SPEC.prepare_demo(tmp_path / "demo")
    assert inputs["source"] == demo_scene_dir()
    assert inputs["labels"].is_file() and inputs["labels"].parent == tmp_path / "demo"
    with rasterio.open(inputs["labels"]) as ds:
        assert ds.crs.to_epsg() == 32618 and ds.shape == (720, 720) and ds.nodata == 255
    assert "NDWI" in SPEC.demo_notes and "Copernicus" in SPEC.demo_notes
