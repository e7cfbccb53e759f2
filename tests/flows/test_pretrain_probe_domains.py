"""End-to-end on every domain: ingest the domain's tiny real-format example, pretrain (smoke preset), then probe.

The pretrain and probe flows run as their deployments run them (`pretrain/<domain>-mae-smoke`, then
`probe/<domain>-foundation-probe` on the encoder it registered), in process under Prefect's test harness,
shrunk to the example's size. Each domain's mask ratio is its own: 0.9 for radiographs, else 0.75.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from domains import domain_names, get_domain

ROOT = Path(__file__).resolve().parents[2]
TILING = {"tile_size": 8, "stride": 8, "block_size": 16}
# The histopathology example's slides give 6400 tiles of 8 px at 0.5 um/px; at 2 um/px, 400.
TILING_BY_DOMAIN = {"histopathology": {**TILING, "tile_mpp": 2.0}}
SPLIT = {"val_fraction": 0.2, "test_fraction": 0.25, "seed": 0}
# The deployments' protocols, fewer resamples and draws (the intervals still come out).
FAST_SETTINGS = {"bootstrap": 100, "shots": [1], "few_shot_draws": 1, "label_fractions": [0.5, 1.0], "threads": 1}
MASK_RATIOS = {"radiology": 0.9}


def _deployment_params(name: str) -> dict:
    [deployment] = [d for d in yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
                    if d["name"] == name]
    return deployment["parameters"]["params"]


@pytest.mark.slow
@pytest.mark.parametrize("name", domain_names())
def test_pretrain_and_probe_deployments_run_on_the_domains_example(name, tmp_path, local_mlflow):
    from flows.ingest import IngestParams, ingest_dataset
    from flows.pretrain import PretrainParams, pretrain
    from flows.probe import ProbeParams, probe

    spec = get_domain(name)
    # A multilabel example of 4 patients cannot give both outcomes of "any finding" to train and test; the
    # synthetic demo studies (80 patients, about a second to write) can.
    example = (spec.prepare_demo if spec.task == "multilabel" else spec.write_example)(tmp_path / "example")
    dataset = str(tmp_path / "dataset")
    ingest_dataset(IngestParams(domain=name, source=str(example["source"]), labels=str(example["labels"]),
                                out=dataset, tiling=TILING_BY_DOMAIN.get(name, TILING), split=SPLIT))
    workdir = str(tmp_path / "work")

    params = {**_deployment_params(f"{name}-mae-smoke"), "dataset": dataset, "workdir": workdir}
    params["mae"] = {**params["mae"], "max_tiles": 64}
    params["train"] = {**params["train"], "batch_size": 16, "threads": 1}
    params["probe_gate"] = {"settings": {**FAST_SETTINGS, "knn_k": [5]}}
    receipt = pretrain(PretrainParams(**params))
    assert receipt.registered_model == f"foundation-{name}" and receipt.alias == "candidate"
    assert receipt.probe_gate in ("passed", "failed")
    description = json.loads(Path(receipt.description_file).read_text())
    assert description["domain"] == name and description["mask_ratio"] == MASK_RATIOS.get(name, 0.75)

    params = {**_deployment_params(f"{name}-foundation-probe"), "dataset": dataset, "workdir": workdir}
    params["settings"] = {**params["settings"], **FAST_SETTINGS}
    probed = probe(ProbeParams(**params))
    with open(probed.table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["backbone"] for r in rows} == {"foundation", "random-init", "random-conv", "channel-stats"}
    assert {r["protocol"] for r in rows} >= {"knn", "linear", "few-shot", "label-fraction", "gate-vs-random-init"}
    assert {r["dataset_digest"] for r in rows if r["dataset_digest"]} == {description["dataset_digest"]}
    assert set(probed.gate) == {"foundation"}
