"""Slide manifest CSV and QuPath GeoJSON regions: parsing, clear errors, point labelling with the bounds offset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from domains.histopathology.manifest import label_points, points_in_ring, read_annotations, read_manifest
from domains.spec import DomainInputError


@pytest.fixture
def slides(tmp_path):
    folder = tmp_path / "slides"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.svs", "b.tif", "sub/c.ndpi"):
        (folder / name).write_bytes(b"x")
    return folder


def _write(path, text):
    path.write_text(text)
    return path


def test_manifest_reads_rows_with_aliases_and_optional_columns(slides, tmp_path):
    _write(tmp_path / "a.geojson", "{}")
    manifest = read_manifest(_write(tmp_path / "m.csv", "Slide File,Patient ID,Centre,Slide Label,GeoJSON\n"
                                    "a.svs,P1,S1,tumor,a.geojson\nsub/c.ndpi,P1,,,\n\nb.tif,P2,S2,normal,\n"), slides)
    assert [e.key for e in manifest.entries] == ["a.svs", "sub/c.ndpi", "b.tif"]
    assert [e.row for e in manifest.entries] == [2, 3, 5]
    first, second, third = manifest.entries
    assert (first.patient, first.site, first.label, first.annotations) == ("P1", "S1", "tumor", tmp_path / "a.geojson")
    assert (second.site, second.label, second.annotations) == (None, None, None)
    assert manifest.has_labels and manifest.has_annotations and manifest.has_sites


@pytest.mark.parametrize("text, message", [
    ("file,label\na.svs,x\n", "missing: patient"),
    ("slide,patient\na.svs,\n", "line 2: the patient cell is empty"),
    ("slide,patient\n,P1\n", "line 2: the slide cell is empty"),
    ("slide,patient\na.svs,P1\nb.tif,P2\na.svs,P3\n", "line 4: slide 'a.svs' is already listed on line 2"),
    ("slide,patient\nmissing.svs,P1\n", "line 2: slide file 'missing.svs' not found"),
    ("slide,patient,annotations\na.svs,P1,none.geojson\n", "line 2: annotation file 'none.geojson' not found"),
    ("slide,patient\n", "lists no slides"),
    ("", "empty"),
    ("slide,file,patient\na.svs,a.svs,P\n", "both give the slide"),
])
def test_manifest_errors_name_the_file_and_the_row(slides, tmp_path, text, message):
    path = _write(tmp_path / "m.csv", text)
    with pytest.raises(DomainInputError, match=message) as error:
        read_manifest(path, slides)
    assert str(path) in str(error.value)


def _feature(geometry, name="Tumor"):
    properties = {"objectType": "annotation"}
    if name is not None:
        properties["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def test_qupath_geojson_polygons_holes_multipolygons_and_skips(tmp_path):
    square = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    hole = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]
    features = [
        _feature({"type": "Polygon", "coordinates": [square, hole]}, "Stroma"),
        _feature({"type": "MultiPolygon", "coordinates": [[[[200, 0], [220, 0], [220, 20], [200, 0]]],
                                                          [[[300, 0], [320, 0], [320, 20], [300, 0]]]]}),
        _feature({"type": "Point", "coordinates": [5, 5]}),
        _feature({"type": "Polygon", "coordinates": [square]}, name=None),
    ]
    # Older QuPath exports a bare list of features.
    annotations = read_annotations(_write(tmp_path / "a.geojson", json.dumps(features)))
    assert [r.name for r in annotations.regions] == ["Stroma", "Tumor", "Tumor"]
    assert annotations.regions[0].area == pytest.approx(100 * 100 - 20 * 20)
    assert annotations.skipped == {"not_a_polygon": 1, "unclassified": 1}
    collection = read_annotations(_write(tmp_path / "b.geojson", json.dumps(
        {"type": "FeatureCollection", "features": features[:1]})))
    assert len(collection.regions) == 1 and collection.class_names == {"Stroma"}


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read the GeoJSON"),
    ('{"type": "Topology"}', "not a GeoJSON"),
    (json.dumps([_feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]})]), "feature 0: a polygon ring"),
])
def test_bad_geojson_is_a_clear_error(tmp_path, text, message):
    path = _write(tmp_path / "bad.geojson", text)
    with pytest.raises(DomainInputError, match=message) as error:
        read_annotations(path)
    assert str(path) in str(error.value)


def test_points_in_ring_agrees_with_matplotlib_on_a_concave_polygon():
    from matplotlib.path import Path as MplPath

    rng = np.random.default_rng(0)
    angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    radius = 50 * (1 + 0.5 * np.sin(5 * angles))  # a star: strongly concave
    ring = np.stack([100 + radius * np.cos(angles), 100 + radius * np.sin(angles)], axis=1)
    points = rng.uniform(0, 200, (5000, 2))
    expected = MplPath(ring).contains_points(points)
    assert (points_in_ring(points, ring) == expected).all()
    assert expected.sum() > 500  # the test is not vacuous


def test_label_points_smallest_region_wins_holes_are_outside_and_bounds_shift(tmp_path):
    tissue = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    tumour = [[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]]
    hole = [[60, 60], [80, 60], [80, 80], [60, 80], [60, 60]]
    annotations = read_annotations(_write(tmp_path / "a.geojson", json.dumps({"type": "FeatureCollection", "features": [
        _feature({"type": "Polygon", "coordinates": [tumour]}, "tumor"),
        _feature({"type": "Polygon", "coordinates": [tissue, hole]}, "normal")]})))
    classes = {"normal": 0, "tumor": 1}
    points = np.array([[20, 20], [50, 50], [70, 70], [150, 150]])
    assert label_points(annotations.regions, points, classes).tolist() == [1, 0, -1, -1]
    # A slide whose scanned area starts at (1000, 500): QuPath coordinates are relative to that corner.
    shifted = points + np.array([1000, 500])
    assert label_points(annotations.regions, shifted, classes, bounds=(1000, 500)).tolist() == [1, 0, -1, -1]
    assert label_points(annotations.regions, points, classes, bounds=(1000, 500)).tolist() == [-1, -1, -1, -1]
