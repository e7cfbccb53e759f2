"""Fixtures of the radiology tests: the example written through the domain's own writer, and file helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from domains.radiology.dicom_writer import ImageGeometry, synthetic_uid, write_dicom_image
from domains.radiology.examples import write_example


@pytest.fixture(scope="session")
def example(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example written once per session; tests must not modify these files."""
    return write_example(tmp_path_factory.mktemp("radiology-example"), seed=0)


@pytest.fixture
def example_copy(example: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of the example, for tests that add or damage files."""
    shutil.copytree(example["source"], tmp_path / "source")
    shutil.copy(example["labels"], tmp_path / "labels.csv")
    return {"source": tmp_path / "source", "labels": tmp_path / "labels.csv"}


@pytest.fixture
def testdata():
    """Return ``find(name)``: a file shipped with pydicom's test data (site-packages; no download)."""
    import pydicom.data

    def find(name: str) -> Path:
        path = Path(pydicom.data.get_testdata_file(name, download=False) or "")
        if not path.is_file():
            pytest.skip(f"pydicom test file {name} is not installed")
        return path

    return find


@pytest.fixture
def write_ct_series():
    """Return ``write(folder, positions, shape=(12, 12), spacing=(1, 1), patient='P-T')`` writing a CT series."""

    def write(folder: Path, positions, shape=(12, 12), spacing=(1.0, 1.0), patient="P-T", names=None, shapes=None):
        study, series = synthetic_uid("t-study", patient), synthetic_uid("t-series", patient, str(folder))
        paths = []
        for i, z in enumerate(positions):
            rows_cols = shapes[i] if shapes else shape
            hu = np.full(rows_cols, 1024 + int(z), dtype=np.uint16)  # HU = slice position, to check order
            name = names[i] if names else f"{i:03d}.dcm"
            paths.append(write_dicom_image(
                folder / name, hu, modality="CT", patient_id=patient, study_uid=study, series_uid=series,
                sop_uid=synthetic_uid("t-sop", patient, str(folder), i), instance=i + 1,
                geometry=ImageGeometry(position=(0.0, 0.0, float(z)), spacing=spacing[i] if isinstance(spacing, list) else spacing),
                rescale=(1.0, -1024.0)))
        return paths

    return write
