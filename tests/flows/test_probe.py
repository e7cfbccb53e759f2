"""End-to-end: `vitrail pretrain` with its probe gate, then `vitrail probe` on the registered candidate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from domains import Channel, SampleSet

CHANNELS = (Channel("B04", 664.6, 10.0), Channel("B03", 559.8, 10.0), Channel("B02", 492.7, 10.0))
FAST_PROBE = ["--set", "settings.bootstrap=200", "--set", "settings.shots=[1]", "--set", "settings.few_shot_draws=2",
              "--set", "settings.label_fractions=[0.2,1.0]", "--set", "settings.threads=1"]


@pytest.fixture(scope="module")
def texture_dataset(tmp_path_factory) -> Path:
    """144 tiles of 16 px, two classes told apart by stripe orientation only (per-band statistics match)."""
    from tasks.dataset import SplitParams, write_dataset

    rng = np.random.default_rng(0)
    n, size = 144, 16
    labels = (np.arange(n) % 2).astype(np.int64)
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    along = np.where(labels[:, None, None] == 0, xs[None], ys[None])
    pattern = np.sin(along / 1.5 + phase)
    images = 0.3 + 0.1 * pattern[:, None] + rng.normal(0, 0.02, size=(n, len(CHANNELS), size, size))
    samples = SampleSet(images=images.astype(np.float32), labels=labels,
                        groups=np.array([f"blk-{i // 8}" for i in range(n)]),
                        locations=np.stack([np.arange(n) * size, np.zeros(n)], axis=1).astype(np.int64),
                        source="synthetic-stripes", channels=CHANNELS, class_names=("across", "along"))
    out = tmp_path_factory.mktemp("dataset")
    write_dataset(samples, "satellite", "classification", out, SplitParams(seed=0))
    return out


@pytest.mark.slow
def test_pretrain_gates_the_candidate_and_probe_scores_it(tmp_path, texture_dataset, local_mlflow, capsys):
    from mlflow import MlflowClient

    from flows.cli import main
    from tasks.tracking import configure_tracking

    workdir = tmp_path / "work"
    code = main(["pretrain", "--domain", "satellite", "--dataset", str(texture_dataset), "--workdir", str(workdir),
                 "--preset", "smoke", "--set", "train.batch_size=16", "--set", "probe_gate.settings.bootstrap=200"])
    assert code == 0
    out = capsys.readouterr().out
    receipt = json.loads(out[out.index("{"):])
    assert receipt["probe_gate"] in ("passed", "failed") and Path(receipt["probe_table"]).is_file()
    configure_tracking(workdir)
    client = MlflowClient()
    version = client.get_model_version("foundation-satellite", receipt["version"])
    assert version.tags["vitrail.probe_gate"] == receipt["probe_gate"]
    assert "vitrail.probe_macro_f1_vs_random_init_ci95_low" in version.tags
    # Champion moves only when the gate passed; the candidate alias stays either way.
    champion = [a for a in client.get_registered_model("foundation-satellite").aliases if a == "champion"]
    assert bool(champion) == receipt["champion"] == (receipt["probe_gate"] == "passed")
    metrics = client.get_run(receipt["run_id"]).data.metrics
    assert "gate.candidate.ci95_low" in metrics

    code = main(["probe", "--domain", "satellite", "--dataset", str(texture_dataset), "--workdir", str(workdir),
                 "--model", "mae=models:/foundation-satellite@candidate", *FAST_PROBE])
    assert code == 0
    out = capsys.readouterr().out
    probed = json.loads(out[out.index("{"):])
    with open(probed["table"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["backbone"] for r in rows} == {"mae", "random-init", "random-conv", "channel-stats"}
    assert {r["protocol"] for r in rows} >= {"knn", "linear", "few-shot", "label-fraction", "gate-vs-random-init"}
    assert Path(probed["plot"]).read_bytes()[:4] == b"\x89PNG"
    # Stripe orientation is invisible to per-band statistics: chance, while random convolutions see it.
    stats = [float(r["value"]) for r in rows if r["backbone"] == "channel-stats" and r["protocol"] == "linear"
             and r["metric"] == "accuracy"][0]
    assert stats < 0.8
    run = client.get_run(probed["run_id"])
    assert run.data.tags["vitrail.stage"] == "probe"
    assert "mae.linear.full.macro_f1" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(probed["run_id"], "probe")}
    assert {"probe/probe-table.csv", "probe/label-fraction.png", "probe/probe-gate.json"} <= artifacts


@pytest.mark.parametrize("domain", ["satellite", "radiology", "hyperspectral"])
def test_probe_scores_the_chosen_domains_candidate_by_default(domain):
    from flows.probe import ProbeParams

    params = ProbeParams(domain=domain, dataset="d")
    assert [(b.label, b.model_uri) for b in params.backbones] == [("foundation", f"models:/foundation-{domain}@candidate")]
    # Given backbones (an empty list included: baselines only) are kept.
    assert ProbeParams(domain=domain, dataset="d", backbones=[]).backbones == []
    # The CLI without --model/--backbone leaves the choice to the flow.
    from flows.cli import build_parser, probe_payload

    args = build_parser().parse_args(["probe", "--domain", domain, "--dataset", "d"])
    assert ProbeParams(**probe_payload(args)).backbones == params.backbones
