"""Tiling a scene into samples: geometry, drop counts, labels and spatial-block groups."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from domains.satellite import SPEC
from domains.satellite.labels import read_label_raster
from domains.satellite.scene import read_scene
from domains.satellite.tiling import read_samples, tile_scene
from domains.spec import DomainInputError, IngestRequest, SampleSet

SIZE, CORNER = 60, 12


@pytest.fixture(scope="module")
def scene(example: dict[str, Path]):
    return read_scene(example["scene_dir"])


@pytest.fixture(scope="module")
def labels(example: dict[str, Path], scene) -> np.ndarray:
    return read_label_raster(example["labels"], scene)


def request_for(example: dict[str, Path], **kwargs) -> IngestRequest:
    return IngestRequest(source=example["scene_dir"], **kwargs)


def expected_counts(valid: np.ndarray, tile: int, stride: int, block: int, max_nodata: float) -> tuple[int, int, int]:
    """Kept, straddling and nodata tile counts by brute force over the mask."""
    kept = straddles = nodata = 0
    for r in range(0, SIZE - tile + 1, stride):
        for c in range(0, SIZE - tile + 1, stride):
            cells = {(y // block, x // block) for y in range(r, r + tile) for x in range(c, c + tile)}
            if len(cells) > 1:
                straddles += 1
            elif 1 - valid[r : r + tile, c : c + tile].mean() > max_nodata:
                nodata += 1
            else:
                kept += 1
    return kept, straddles, nodata


def test_aligned_tiles_without_labels(example: dict[str, Path], scene) -> None:
    samples = tile_scene(scene, None, request_for(example, tile_size=10, stride=10, block_size=30))
    # 6 x 6 tiles; only the one inside the 12 x 12 nodata corner is more than half empty.
    assert len(samples.images) == 35
    assert samples.dropped == {"straddles_block": 0, "nodata": 1, "unlabelled": 0}
    assert samples.images.shape == (35, 13, 10, 10) and samples.images.dtype == np.float32
    assert (samples.labels == -1).all()
    assert samples.locations.shape == (35, 2) and np.issubdtype(samples.locations.dtype, np.integer)
    assert [0, 50] not in samples.locations.tolist()
    assert set(samples.groups) == {f"{scene.scene_id}:block-{by}-{bx}" for by in (0, 1) for bx in (0, 1)}
    assert samples.class_names == SPEC.default_class_names
    assert samples.channels == scene.channels


def test_images_match_the_scene_and_nodata_is_zero(example: dict[str, Path], scene) -> None:
    samples = tile_scene(scene, None, request_for(example, tile_size=10, stride=10, block_size=30))
    index = samples.locations.tolist().index([0, 40])
    tile = samples.images[index]
    np.testing.assert_array_equal(tile[:, :, :8], scene.data[:, 0:10, 40:48])
    assert (tile[:, :, 8:] == 0).all()  # columns 48-49 lie in the nodata corner


def test_stricter_nodata_threshold_drops_more(example: dict[str, Path], scene) -> None:
    samples = tile_scene(
        scene, None, request_for(example, tile_size=10, stride=10, block_size=30, max_nodata_fraction=0.1)
    )
    assert samples.dropped["nodata"] == 3  # the corner tile and its two 20 %-empty neighbours


def test_overlapping_tiles_that_straddle_blocks_are_dropped(example: dict[str, Path], scene) -> None:
    request = request_for(example, tile_size=10, stride=5, block_size=30)
    samples = tile_scene(scene, None, request)
    kept, straddles, nodata = expected_counts(scene.valid, 10, 5, 30, 0.5)
    assert straddles == 21  # starts at 25 cross the block border at 30, in rows or columns
    assert len(samples.images) == kept
    assert samples.dropped == {"straddles_block": straddles, "nodata": nodata, "unlabelled": 0}


def test_no_pixel_belongs_to_two_groups(example: dict[str, Path], scene) -> None:
    samples = tile_scene(scene, None, request_for(example, tile_size=12, stride=4, block_size=24))
    owner = np.full(scene.shape, "", dtype=object)
    for (row, col), group in zip(samples.locations, samples.groups):
        window = owner[row : row + 12, col : col + 12]
        assert set(window[window != ""]) <= {group}
        window[...] = group
    assert len(set(samples.groups)) > 1


def test_tile_label_is_the_majority_class(example: dict[str, Path], scene, labels) -> None:
    samples = tile_scene(scene, labels, request_for(example, tile_size=10, stride=10, block_size=30))
    assert len(samples.images) == 35 and samples.dropped["unlabelled"] == 0
    for (row, col), label in zip(samples.locations, samples.labels):
        window = labels[row : row + 10, col : col + 10]
        assert label == np.bincount(window[window >= 0]).argmax()
    assert set(samples.labels.tolist()) == {0, 1, 2}


def test_any_negative_label_counts_as_unlabelled(example: dict[str, Path], scene, labels) -> None:
    marked = labels.copy()
    marked[:, :15] = -1
    other_marks = labels.copy()
    other_marks[:, :15] = -7  # a caller's own "no label" value: unlabelled as -1 is
    expected = tile_scene(scene, marked, request_for(example, tile_size=10, stride=10, block_size=30))
    samples = tile_scene(scene, other_marks, request_for(example, tile_size=10, stride=10, block_size=30))
    assert samples.dropped == expected.dropped and samples.dropped["unlabelled"] == 6
    np.testing.assert_array_equal(samples.labels, expected.labels)


def test_tiles_without_a_labelled_majority_are_dropped(example: dict[str, Path], scene, labels) -> None:
    sparse = labels.copy()
    sparse[:, :15] = -1  # tiles at columns 0-9 are unlabelled, at 10-19 exactly half labelled
    samples = tile_scene(scene, sparse, request_for(example, tile_size=10, stride=10, block_size=30))
    assert samples.dropped == {"straddles_block": 0, "nodata": 1, "unlabelled": 6}
    assert len(samples.images) == 29
    assert samples.locations[:, 1].min() == 10


def test_provenance_records_the_grid(example: dict[str, Path], scene) -> None:
    samples = tile_scene(scene, None, request_for(example, tile_size=10, stride=10, block_size=30))
    p = samples.provenance
    assert p["crs"] == "EPSG:32618"
    assert p["transform"] == "10.0, 0.0, 438120.0, 0.0, -10.0, 4177080.0"
    assert p["sensor"] == "sentinel2"
    assert p["scaling"].startswith("sentinel2-l1c")
    assert p["grid_shape"] == "60x60" and p["resolution"] == "10x10"
    assert all(isinstance(v, str) for v in p.values())


def test_class_names_come_from_the_request(example: dict[str, Path], scene, labels) -> None:
    request = request_for(example, tile_size=10, stride=10, block_size=30, class_names=("wet", "green", "grey"))
    assert tile_scene(scene, labels, request).class_names == ("wet", "green", "grey")
    with pytest.raises(DomainInputError, match="label value 2 is outside 0..1"):
        tile_scene(scene, labels, replace(request, class_names=("wet", "dry"), labels=example["labels"]))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"tile_size": 61}, "tile_size 61"),
        ({"tile_size": 0}, "tile_size 0"),
        ({"stride": 0}, "stride 0"),
        ({"tile_size": 16, "block_size": 8}, "block_size 8"),
        ({"max_nodata_fraction": 1.5}, "max_nodata_fraction"),
    ],
)
def test_bad_geometry_is_refused(example: dict[str, Path], scene, change: dict, problem: str) -> None:
    with pytest.raises(DomainInputError) as error:
        tile_scene(scene, None, request_for(example, **change))
    assert problem in error.value.problem and example["scene_dir"].name in str(error.value)


def read_all(request: IngestRequest) -> SampleSet:
    """Every batch the streaming reader yields, merged into one physical float32 SampleSet."""
    batches = list(read_samples(request))
    first, provenance, dropped = batches[0], {}, {}
    for batch in batches:
        provenance.update(batch.provenance)
        for reason, count in batch.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    return SampleSet(
        images=np.concatenate([b.physical() for b in batches]),
        labels=np.concatenate([b.labels for b in batches]),
        groups=np.concatenate([b.groups for b in batches]),
        locations=np.concatenate([b.locations for b in batches]),
        source=first.source, channels=first.channels, class_names=first.class_names, dropped=dropped,
        provenance=provenance,
    )


def test_read_samples_reads_scene_and_labels(example: dict[str, Path]) -> None:
    request = IngestRequest(
        source=example["scene_dir"], labels=example["labels_wgs84"], tile_size=10, stride=10, block_size=20,
        channels=("B02", "B03", "B04", "B08"),
    )
    samples = read_all(request)
    assert samples.images.shape[1:] == (4, 10, 10)
    assert [c.name for c in samples.channels] == ["B02", "B03", "B04", "B08"]
    assert samples.provenance["labels"] == str(example["labels_wgs84"])
    assert set(samples.labels.tolist()) == {0, 1, 2}
    assert len(set(samples.groups)) == 9


def test_read_samples_multiband(example: dict[str, Path]) -> None:
    folder = read_all(IngestRequest(source=example["scene_dir"], tile_size=20, stride=20, block_size=20))
    stack = read_all(IngestRequest(source=example["multiband"], tile_size=20, stride=20, block_size=20))
    np.testing.assert_allclose(stack.images, folder.images, atol=1e-4)
    assert stack.groups[0].startswith(example["multiband"].stem + ":block-")
