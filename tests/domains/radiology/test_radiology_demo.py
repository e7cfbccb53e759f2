"""The synthetic demo: deterministic, labelled as synthetic, balanced findings, readable by the domain."""

from __future__ import annotations

import numpy as np

from domains import IngestRequest
from domains.radiology import SPEC
from domains.radiology.demo import DEMO_FINDINGS, draw_phantom, write_demo_source
from sample_batches import collect_batches  # tests/domains is on sys.path through its conftest.py


def test_demo_is_read_with_study_keyed_labels_and_patient_groups(tmp_path):
    source, labels = write_demo_source(tmp_path, patients=12)
    assert "SYNTHETIC PHANTOMS" in (source / "README.txt").read_text()
    samples = collect_batches(SPEC.read_samples(IngestRequest(source=source, labels=labels, tile_size=32)))
    assert samples.images.shape == (48, 1, 32, 32) and samples.class_names == DEMO_FINDINGS
    assert (samples.labels >= 0).all() and len(set(samples.groups.tolist())) == 12
    # MONOCHROME1 and MONOCHROME2 studies end up with the same polarity: lungs darker than the body.
    centre = samples.images[:, 0, 12:20, 8:12].mean(axis=(1, 2))
    body = samples.images[:, 0, 14:18, 2:4].mean(axis=(1, 2))
    assert (centre < body + 0.3).all() and np.isfinite(samples.images).all()


def test_demo_generation_is_deterministic(tmp_path):
    a_source, a_labels = write_demo_source(tmp_path / "a", patients=4)
    b_source, b_labels = write_demo_source(tmp_path / "b", patients=4)
    assert a_labels.read_text() == b_labels.read_text()
    a = collect_batches(SPEC.read_samples(IngestRequest(source=a_source, tile_size=16))).images
    b = collect_batches(SPEC.read_samples(IngestRequest(source=b_source, tile_size=16))).images
    np.testing.assert_array_equal(a, b)


def test_findings_change_the_picture_where_they_should():
    def draw(**findings):
        flags = {name: findings.get(name, False) for name in DEMO_FINDINGS}
        return draw_phantom(np.random.default_rng(3), flags)

    plain = draw()
    nodule = draw(nodule=True) - plain
    assert 10 <= (nodule > 0.2).sum() <= 60 and (nodule >= -1e-6).all()  # a small bright disk, nothing else
    effusion = draw(effusion=True) - plain
    rows = np.flatnonzero((effusion > 0.1).any(axis=1))
    assert rows.size and rows.min() > 32  # only below the middle: a lung base
    heart = draw(cardiomegaly=True) - plain
    assert (heart > 0.1).sum() > 100 and (np.abs(heart[:20]) < 1e-6).all()
