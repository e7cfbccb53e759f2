"""End-to-end: `vitrail pretrain`, smoke preset, tiny dataset, temporary MLflow store, Prefect test harness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from domains import Channel, SampleSet

ROOT = Path(__file__).resolve().parents[2]
CHANNELS = (Channel("B04", 664.6, 10.0), Channel("B03", 559.8, 10.0), Channel("B02", 492.7, 10.0),
            Channel("B08", 832.8, 10.0))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """96 tiles of 16 px in 12 spatial blocks: textured enough that a reconstruction has something to learn."""
    from tasks.dataset import SplitParams, write_dataset

    rng = np.random.default_rng(0)
    n, size = 96, 16
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1, 1))
    waves = np.sin(xs / 3.0 + phase) * np.cos(ys / 4.0 + phase)
    images = 0.2 + 0.1 * waves * rng.uniform(0.5, 1.5, size=(n, len(CHANNELS), 1, 1))
    images = (images + rng.normal(0, 0.01, size=images.shape)).astype(np.float32)
    samples = SampleSet(images=images, labels=(np.arange(n) % 2).astype(np.int64),
                        groups=np.array([f"blk-{i // 8}" for i in range(n)]),
                        locations=np.stack([np.arange(n) * size, np.zeros(n)], axis=1).astype(np.int64),
                        source="synthetic-scene", channels=CHANNELS, class_names=("water", "land"))
    out = tmp_path_factory.mktemp("dataset")
    write_dataset(samples, "satellite", "classification", out, SplitParams(seed=0))
    return out


def test_pretrain_cli_registers_the_encoder_as_a_candidate(tmp_path, tiny_dataset, local_mlflow, capsys):
    import mlflow
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from flows.cli import main
    from tasks.dataset import load_dataset
    from tasks.tracking import configure_tracking

    workdir = tmp_path / "work"
    code = main(["pretrain", "--domain", "satellite", "--dataset", str(tiny_dataset), "--workdir", str(workdir),
                 "--preset", "smoke", "--set", "train.batch_size=16"])
    assert code == 0
    out = capsys.readouterr().out
    receipt = json.loads(out[out.index("{"):])
    assert receipt["registered_model"] == "foundation-satellite" and receipt["alias"] == "candidate"
    assert receipt["model_uri"] == "models:/foundation-satellite@candidate"

    # The encoder's files stay in the work folder, described.
    description = json.loads(Path(receipt["description_file"]).read_text())
    info = load_dataset(tiny_dataset).info
    assert description["dataset_digest"] == info.digest and description["mask_ratio"] == 0.75
    assert description["architecture"]["depth"] == 2 and description["epochs"] == 2
    assert description["samples_seen"] == receipt["samples_seen"] == 2 * info.split_counts["train"]

    configure_tracking(workdir)
    client = MlflowClient()
    version = client.get_model_version_by_alias("foundation-satellite", "candidate")
    assert str(version.version) == receipt["version"] == "1"
    assert version.tags["vitrail.dataset_digest"] == info.digest
    # The probe gate ran after registration (pending until then) and left its verdict on the version.
    assert version.tags["vitrail.probe_gate"] == receipt["probe_gate"] in ("passed", "failed")
    test_groups = description["excluded_splits"]["test"]["groups_digest"]
    assert version.tags["vitrail.excluded_test_groups_digest"] == test_groups
    # The registered version holds the exported encoder, bitwise.
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=receipt["model_uri"], dst_path=str(tmp_path / "dl")))
    registered = load_file(str(folder / "encoder.safetensors"))
    exported = load_file(receipt["encoder_file"])
    assert registered.keys() == exported.keys() and all((registered[k] == exported[k]).all() for k in exported)

    run = client.get_run(receipt["run_id"])
    assert run.data.tags["vitrail.stage"] == "pretrain"
    assert [m.step for m in client.get_metric_history(receipt["run_id"], "val_loss")] == [1, 2]
    images = [a.path for a in client.list_artifacts(receipt["run_id"], "reconstructions")]
    assert images == ["reconstructions/reconstruction-epoch-001.png", "reconstructions/reconstruction-epoch-002.png"]


def test_every_domain_has_a_smoke_pretrain_and_a_probe_deployment():
    from domains import domain_names
    from flows.presets import PRETRAIN_PRESETS

    deployments = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
    smoke = {d["parameters"]["params"]["domain"]: d for d in deployments
             if d["entrypoint"] == "flows/pretrain.py:pretrain" and d["name"].endswith("-mae-smoke")}
    probes = {d["parameters"]["params"]["domain"]: d for d in deployments
              if d["entrypoint"] == "flows/probe.py:probe" and d["name"].endswith("-foundation-probe")}
    assert set(smoke) == set(probes) == set(domain_names())
    for domain, deployment in smoke.items():
        params = deployment["parameters"]["params"]
        assert deployment["name"] == f"{domain}-mae-smoke" and domain in deployment["tags"]
        assert {k: v for k, v in params.items() if k not in ("domain", "dataset", "workdir")} == \
            PRETRAIN_PRESETS["smoke"].params, domain
        # The probe scores what this pretraining registered: same dataset, same work folder (MLflow store).
        probe = probes[domain]["parameters"]["params"]
        assert (probe["dataset"], probe["workdir"]) == (params["dataset"], params["workdir"]), domain
        assert [b["model_uri"] for b in probe["backbones"]] == [f"models:/foundation-{domain}@candidate"], domain


def test_pretrain_form_fields_are_documented():
    from flows.pretrain import PretrainParams

    schema = PretrainParams.model_json_schema()
    defs = schema.get("$defs", {})
    for model in [schema, defs["MaeParams"], defs["TrainParams"], defs["BackboneParams"]]:
        for name, field in model["properties"].items():
            assert field.get("description"), name
