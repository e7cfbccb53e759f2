"""Site splits: with ``group_by="site"`` every slide of a site lands in one split; bad site data is refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from domains import IngestRequest
from domains.histopathology.examples import tissue_texture, write_example, write_pyramid_tiff
from domains.histopathology.reader import read_samples, slide_pseudonym
from domains.pseudonyms import pseudonym
from domains.spec import DomainInputError

# Six patients at three sites, two patients per site, one slide each; labels alternate within a site.
COHORT = [("a1.tif", "PAT-1", "SITE-NORTH", "normal"), ("a2.tif", "PAT-2", "SITE-NORTH", "tumor"),
          ("b1.tif", "PAT-3", "SITE-SOUTH", "normal"), ("b2.tif", "PAT-4", "SITE-SOUTH", "tumor"),
          ("c1.tif", "PAT-5", "SITE-EAST", "normal"), ("c2.tif", "PAT-6", "SITE-EAST", "tumor")]
SIDE = 384


def write_cohort(directory: Path, rows: list[tuple[str, ...]], header=("slide", "patient", "site", "label")) -> dict:
    """Small real pyramidal TIFF slides (tissue on glass, 0.5 um/px) and a manifest CSV with ``rows``."""
    rng = np.random.default_rng(3)
    slides = directory / "slides"
    for name in dict.fromkeys(row[0] for row in rows):
        image = np.ones((SIDE, SIDE, 3), np.float32)
        image[32:SIDE - 32, 32:SIDE - 32] = tissue_texture(rng, SIDE - 64, SIDE - 64)
        write_pyramid_tiff(slides / name, (image * 255).round().astype(np.uint8), 0.5, tile=64, min_level_side=64)
    manifest = directory / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return {"source": slides, "labels": manifest}


def _request(files: dict, **options) -> IngestRequest:
    return IngestRequest(source=files["source"], labels=files["labels"], tile_size=32, stride=32, **options)


def _manifest_rows(dataset: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    return pq.read_table(dataset / "manifest.parquet").to_pydict()


def test_site_grouping_keeps_every_slide_of_a_site_in_one_split(tmp_path):
    from tasks.dataset import SplitParams, build_dataset, load_dataset

    files = write_cohort(tmp_path, COHORT)
    info = build_dataset("histopathology", _request(files, group_by="site"), tmp_path / "dataset", SplitParams())
    assert info.provenance["leakage_group"] == "site"
    rows = _manifest_rows(tmp_path / "dataset")
    split_of_slide: dict[str, set] = {}
    for sample_id, group, split in zip(rows["sample_id"], rows["group"], rows["split"]):
        split_of_slide.setdefault(sample_id.split("/")[0], set()).add((group, split))
    sites = {}
    for name, _, site, _ in COHORT:
        [(group, split)] = split_of_slide[slide_pseudonym(name)]  # every tile of a slide: one group, one split
        assert group == pseudonym("site", site)
        sites.setdefault(site, set()).add(split)
    # Both slides of each site (two different patients) share a split; the three sites fill the three splits.
    assert all(len(splits) == 1 for splits in sites.values())
    assert sorted(s for splits in sites.values() for s in splits) == ["test", "train", "val"]
    loaded = load_dataset(tmp_path / "dataset")  # the loader re-asserts "no group in two splits"
    assert {g for split in loaded.splits.values() for g in split.groups.tolist()} == \
        {pseudonym("site", site) for _, _, site, _ in COHORT}
    # Per-patient scoring still knows each slide's patient.
    assert sorted(json.loads(info.provenance["slide_patients"]).values()) == \
        sorted(pseudonym("patient", patient) for _, patient, _, _ in COHORT)


def test_patient_grouping_stays_the_default_and_is_recorded(tmp_path):
    files = write_cohort(tmp_path, COHORT[:3])
    batches = list(read_samples(_request(files)))
    groups = set(np.concatenate([b.groups for b in batches]).tolist())
    assert groups == {pseudonym("patient", patient) for _, patient, _, _ in COHORT[:3]}
    assert batches[-1].provenance["leakage_group"] == "patient"


def test_a_patient_at_two_sites_is_refused_naming_the_patient_and_both_sites(tmp_path):
    files = write_example(tmp_path)  # patient CASE-B has slide B1 at SITE-1 and B2 at SITE-0
    with pytest.raises(DomainInputError) as caught:
        list(read_samples(_request(files, group_by="site")))
    message = str(caught.value)
    assert pseudonym("patient", "CASE-B") in message
    assert pseudonym("site", "SITE-1") in message and pseudonym("site", "SITE-0") in message
    assert "CASE-B" not in message and "SITE-0" not in message  # pseudonyms only, never the identifiers
    # Grouped by patient the same cohort reads fine.
    assert len(list(read_samples(_request(files)))) >= 1


def test_site_grouping_without_a_site_column_or_with_an_empty_site_is_refused(tmp_path):
    no_column = write_cohort(tmp_path / "no-column", [(n, p, label) for n, p, _, label in COHORT[:3]],
                             header=("slide", "patient", "label"))
    with pytest.raises(DomainInputError, match="site column"):
        list(read_samples(_request(no_column, group_by="site")))
    empty = write_cohort(tmp_path / "empty", [COHORT[0], (COHORT[1][0], COHORT[1][1], "", "tumor"), COHORT[2]])
    with pytest.raises(DomainInputError, match=r"site cell is empty on line\(s\) 3"):
        list(read_samples(_request(empty, group_by="site")))
    unlabelled = IngestRequest(source=empty["source"], tile_size=32, stride=32, group_by="site")
    with pytest.raises(DomainInputError, match="needs a slide manifest"):
        list(read_samples(unlabelled))
    with pytest.raises(DomainInputError, match="'scanner' is not"):
        list(read_samples(_request(empty, group_by="scanner")))


def test_the_ingest_flow_and_cli_pass_group_by_site(tmp_path):
    from flows.cli import build_parser, pipeline_payload
    from flows.ingest import IngestParams, TilingParams, ingest_dataset
    from flows.pipeline import PipelineParams
    from tasks.dataset import read_dataset_info

    args = build_parser().parse_args(["pipeline", "--domain", "histopathology", "--source", "slides",
                                      "--labels", "manifest.csv", "--group-by", "site"])
    assert PipelineParams(**pipeline_payload(args)).tiling.group_by == "site"
    files = write_cohort(tmp_path, COHORT)
    receipt = ingest_dataset(IngestParams(domain="histopathology", source=str(files["source"]),
                                          labels=str(files["labels"]), out=str(tmp_path / "dataset"),
                                          tiling=TilingParams(tile_size=32, stride=32, group_by="site")))
    assert read_dataset_info(receipt.dataset).provenance["leakage_group"] == "site"
    assert set(_manifest_rows(tmp_path / "dataset")["group"]) == {pseudonym("site", s) for _, _, s, _ in COHORT}
