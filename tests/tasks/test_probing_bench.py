"""bench pretraining: the labelled view, the paired summary, and a miniature run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.benchmarks import pretraining as bench


def test_labelled_view_keeps_a_stratified_share_of_training_labels_and_every_test_tile(dataset):
    view, keep = bench.labelled_view(dataset, 0.25, seed=1)
    train = np.asarray(dataset.splits["train"].labels)
    assert len(view.splits["train"]) == len(keep) < len(train)
    assert set(np.asarray(view.splits["train"].labels)) == set(train)
    assert len(view.splits["test"]) == len(dataset.splits["test"])


def test_summary_gains_are_paired_and_in_points():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    rows = []
    for seed in range(3):
        right = lambda p: np.where(rng.random(300) < p, labels, (labels + 1) % 4)  # noqa: E731
        predictions = {"mae+lora": right(0.8), "random+lora": right(0.5), "random+full": right(0.55),
                       "random-conv": right(0.6), "channel-stats": right(0.25), "mae-linear": right(0.7)}
        rows.append({"predictions": {k: v.tolist() for k, v in predictions.items()},
                     "accuracy": {k: float(np.mean(v == labels)) for k, v in predictions.items()}})
    summary = bench.summarise(rows, labels)
    gain = summary["gains"]["random+lora"]
    assert 25 < gain["mean_points"] < 35 and gain["ci95_low_points"] > 15
    assert gain["ci95_low_points"] == min(gain["ci95_tiles_points"][0], gain["ci95_seeds_points"][0])


@pytest.mark.slow
def test_a_miniature_benchmark_writes_the_headline_keys(tmp_path):
    from flows.cli import main

    code = main(["bench", "pretraining", "--workdir", str(tmp_path), "--set", "samples=160", "--set", "seeds=2",
                 "--set", "mae_epochs=1", "--set", "finetune_epochs=1", "--set", "depth=1", "--set", "threads=1"])
    assert code == 0
    result = json.loads((tmp_path / "bench" / "pretraining.json").read_text())
    assert {"task", "seeds", "label_fraction", "gain_vs_random_lora_points", "gain_ci95_low_points",
            "min_gain_vs_others_points", "rows"} <= result.keys()
    assert result["seeds"] == 2 and len(result["rows"]) == 2
    # The test blocks were never pretrained on: their digest is recorded per seed.
    assert all("test" in row["excluded_from_pretraining"] for row in result["rows"])
