"""The histopathology ingest reports each slide's tissue mask where a user looks: run log and a table artifact."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from domains.histopathology.examples import EXAMPLE_PATIENTS, write_example
from flows.ingest import IngestParams, TilingParams, ingest_dataset
from tasks.dataset import read_dataset_info

ARTIFACT_KEY = "histopathology-ingest-inputs"


def test_ingest_logs_and_tables_one_row_per_slide_with_its_mask_png(tmp_path: Path, caplog) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    example = write_example(tmp_path / "example", seed=0)
    with open(example["labels"], newline="") as handle:
        manifest = list(csv.DictReader(handle))
    with caplog.at_level(logging.INFO):
        state = ingest_dataset(IngestParams(domain="histopathology", source=str(example["source"]),
                                            labels=str(example["labels"]), out=str(tmp_path / "dataset"),
                                            tiling=TilingParams(tile_size=32, stride=32)), return_state=True)
    receipt = state.result()
    info = read_dataset_info(receipt.dataset)

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[ARTIFACT_KEY]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert len(artifacts) == 1 and artifacts[0].type == "table"
    data = artifacts[0].data
    rows = json.loads(data) if isinstance(data, str) else data
    assert len(rows) == len(manifest) == int(info.provenance["slides_read"])
    assert len({row["slide"] for row in rows}) == len(rows) and all(row["slide"].startswith("sl-") for row in rows)
    assert all(row["kept_tiles"] > 0 for row in rows)
    assert sum(row["kept_tiles"] for row in rows) == sum(info.split_counts.values())
    for row in rows:
        mask = Path(row["mask_png"])
        assert mask.is_file() and mask.parent == Path(receipt.dataset) / "tissue_masks"
        assert row["tissue_fraction"] == round(float((np.asarray(Image.open(mask)) > 0).mean()), 4)
    # Pseudonyms only: no patient id or slide file name from the manifest in the table or the log.
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ingest slide ")]
    assert len(logged) == len(rows)
    assert all(row["slide"] in line and row["mask_png"] in line for row, line in zip(rows, logged))
    shown = json.dumps(rows) + "\n".join(logged)
    for value in (*EXAMPLE_PATIENTS, *(Path(entry["slide"]).stem for entry in manifest)):
        assert value not in shown


def test_several_sources_each_list_their_own_slides_and_masks(tmp_path: Path) -> None:
    from tasks.ingest_sources import ingest_table_rows

    examples = [write_example(tmp_path / f"site{i}", seed=i) for i in range(2)]
    # Slide folders of different names: the reader names a source after its folder.
    sources = [e["source"].rename(e["source"].with_name(f"slides-{i}")) for i, e in enumerate(examples)]
    receipt = ingest_dataset(IngestParams(domain="histopathology", sources=[str(s) for s in sources],
                                          source_labels=[str(e["labels"]) for e in examples],
                                          out=str(tmp_path / "dataset"), tiling=TilingParams(tile_size=32, stride=32)))
    info = read_dataset_info(receipt.dataset)
    rows = ingest_table_rows("histopathology", info, receipt.dataset)
    assert len(info.sources) == 2 and len(rows) == 8  # four slides a source
    for i in range(2):
        folder = Path(receipt.dataset) / "sources" / f"{i:03d}" / "tissue_masks"
        listed = {Path(row["mask_png"]) for row in rows if Path(row["mask_png"]).parent == folder}
        assert len(listed) == 4 and listed == set(folder.glob("*.png"))
    assert sum(row["kept_tiles"] for row in rows) == sum(info.split_counts.values())
