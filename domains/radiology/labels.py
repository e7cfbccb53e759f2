"""Findings labels from a CSV keyed by patient, study, series or file, matched on pseudonymous keys.

CSV schema (UTF-8, header row, comma-separated):

* key columns, any subset of ``patient_id``, ``study_uid``, ``series_uid``, ``file``; each row fills
  exactly one of them. ``patient_id`` is the DICOM PatientID (for NIfTI: the BIDS ``sub-<label>`` folder,
  else the first folder under the source, else the file name without suffix); ``study_uid`` and
  ``series_uid`` the original StudyInstanceUID/SeriesInstanceUID; ``file`` a path relative to the
  source folder, with ``/`` separators;
* every other column is one finding, 0 or 1 per row, empty for unknown (stored as -1).

An image takes the labels of its most specific row: file, then series, then study, then patient. Images
no row names stay unlabelled (all -1). The CSV's identifiers are hashed with the same keyed hash as the
images as soon as they are read, so raw IDs are compared to nothing and stored nowhere; errors name CSV
row numbers, never the values.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domains.radiology.deidentify import pseudonym
from domains.spec import DomainInputError

KEY_COLUMNS = {"file": "file", "series_uid": "series", "study_uid": "study", "patient_id": "patient"}
"""CSV key column -> pseudonym kind, most specific first."""


@dataclass(frozen=True)
class FindingsTable:
    """Labels of a findings CSV, keyed by pseudonymous key, with the CSV row each came from."""

    class_names: tuple[str, ...]
    rows: dict[str, tuple[np.ndarray, int]]
    """pseudonymous key -> (labels (K,) int8, CSV row number)."""

    def labels_for(self, keys_most_specific_first: list[str]) -> tuple[np.ndarray | None, int | None]:
        for key in keys_most_specific_first:
            if key in self.rows:
                return self.rows[key]
        return None, None


def read_findings_csv(path: Path, class_names: tuple[str, ...] | None = None) -> FindingsTable:
    """Parse a findings CSV (see the module docstring) and hash its keys.

    Args:
        path: the CSV.
        class_names: findings to keep, in this order; None keeps every finding column in CSV order.

    Raises:
        DomainInputError: naming the CSV, for a missing file, no key or finding column, a row without
            exactly one key, a repeated key, a value other than 0/1/empty, or a requested finding absent.
    """
    path = Path(path)
    if not path.is_file():
        raise DomainInputError(path, "labels CSV not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        raw_rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    keys = [h for h in header if h in KEY_COLUMNS]
    findings = [h for h in header if h not in KEY_COLUMNS and h]
    if not keys:
        raise DomainInputError(path, f"no key column; expected one of {', '.join(KEY_COLUMNS)}")
    if class_names:
        missing = [c for c in class_names if c not in findings]
        if missing:
            raise DomainInputError(path, f"findings {missing} are not columns of the CSV (columns: {findings})")
        findings = list(class_names)
    if len(findings) < 1:
        raise DomainInputError(path, "no finding column besides the key columns")
    rows: dict[str, tuple[np.ndarray, int]] = {}
    for number, row in enumerate(raw_rows, start=2):  # row 1 is the header
        filled = [k for k in keys if row.get(k)]
        if len(filled) != 1:
            raise DomainInputError(path, f"row {number} must fill exactly one of {keys}, fills {len(filled)}")
        column = filled[0]
        value = row[column]
        key = pseudonym(KEY_COLUMNS[column], value.replace("\\", "/") if column == "file" else value)
        if key in rows:
            raise DomainInputError(path, f"row {number} repeats the {column} of row {rows[key][1]}")
        labels = np.full(len(findings), -1, dtype=np.int8)
        for i, finding in enumerate(findings):
            cell = row.get(finding, "")
            if cell in ("0", "1"):
                labels[i] = int(cell)
            elif cell not in ("", "-1"):
                raise DomainInputError(path, f"row {number}, column {finding!r}: expected 0, 1 or empty")
        rows[key] = (labels, number)
    if not rows:
        raise DomainInputError(path, "the CSV has no rows")
    return FindingsTable(tuple(findings), rows)


def unmatched_rows(table: FindingsTable, known_keys: set[str]) -> list[int]:
    """CSV row numbers whose key names no patient, study, series or file of the source."""
    return sorted(number for key, (_, number) in table.rows.items() if key not in known_keys)
