"""bench merging's own arithmetic: normalised scores and the printed table, on a result written by hand."""

from __future__ import annotations

import pytest

from tasks.benchmarks.merging import _normalise, format_table, task_labels


def _result() -> dict:
    rows = [{"method": "individual", "task_scores": {"a": 0.8, "b": 0.5}, "seconds": None, "peak_rss_mb": None},
            {"method": "ties", "task_scores": {"a": 0.72, "b": 0.5}, "seconds": 1.5, "peak_rss_mb": 900.0},
            {"method": "opcm", "task_scores": {"a": 0.4, "b": 0.25}, "seconds": 2.0, "peak_rss_mb": 880.0,
             "memory_per_arrival": [{"arrived": 1, "task": "a", "rss_mb": 870.0, "state_vector_bytes": 4_000_000,
                                     "heads_file_bytes": 1700}]},
            {"method": "fw", "error": "boom"}]
    _normalise(rows, {"a": 0.8, "b": 0.5})
    return {"cpu": "test cpu", "threads": 2, "tasks": ["a", "b"], "metric": "test macro_f1", "rows": rows,
            "base": {"kind": "seeded"}, "notes": {"x": "y"},
            "options": {"tile": "16", "backbone": "vit", "depth": "2", "adapter": "lora", "epochs": "1"}}


def test_average_normalised_score_divides_by_each_tasks_own_model():
    rows = _result()["rows"]
    assert rows[0]["avg_normalised_score"] == 1.0
    assert rows[1]["avg_normalised_score"] == pytest.approx((0.9 + 1.0) / 2)
    assert rows[2]["avg_normalised_score"] == pytest.approx(0.5)
    assert "avg_normalised_score" not in rows[3]


def test_the_table_shows_every_row_and_opcm_memory():
    table = format_table(_result())
    assert "ties" in table and "0.950" in table and "fw                     failed: boom" in table
    assert "opcm after arrival 1 (a): RSS 870 MB, state vector 4.00 MB, heads file 1.7 kB" in table


def test_unknown_task_rule_is_refused():
    from tasks.request_errors import RequestError

    with pytest.raises(RequestError, match="unknown task 'clouds'"):
        task_labels(None, "clouds")


def test_unknown_head_protocol_is_refused(tmp_path):
    from tasks.benchmarks.merging import DEFAULTS, fine_tune
    from tasks.request_errors import RequestError

    with pytest.raises(RequestError, match="head='free'"):
        fine_tune(tmp_path, {**DEFAULTS, "head": "free"}, tmp_path / "base.safetensors", tmp_path / "out")


@pytest.mark.slow
def test_a_frozen_head_stays_as_given_while_the_adapter_trains(tmp_path, dataset_dir):
    """LP-FT with a frozen head (the bench's protocol): the linear probe's head comes back unchanged from the
    adapter's fine-tune, whose backbone did move; without the option the head trains."""
    import torch
    from tasks_support import FAST_TRAIN, tiny_backbone

    from tasks.adapters import AdapterParams
    from tasks.finetune import fit_adapter
    from tasks.training import TrainParams

    train = TrainParams(**{**FAST_TRAIN, "epochs": 1})
    probe = fit_adapter(dataset_dir, tiny_backbone(), AdapterParams(method="linear-probe"), train, tmp_path / "lp")
    head = {k.removeprefix("net.head."): v.clone() for k, v in probe.model.state_dict().items()
            if k.startswith("net.head.")}
    lora = AdapterParams(method="lora", rank=4, targets=["qkv"], train_patch_embed=False)
    frozen = fit_adapter(dataset_dir, tiny_backbone(), lora, train, tmp_path / "ft", frozen_head=head)
    state = frozen.model.state_dict()
    for key, value in head.items():
        assert torch.equal(state[f"net.head.{key}"], value)
    moved = [k for k, v in state.items() if "qkv.weight" in k and not torch.equal(v, probe.model.state_dict()[k])]
    assert moved, "the adapter did not change the backbone"
    joint = fit_adapter(dataset_dir, tiny_backbone(), lora, train, tmp_path / "joint")
    assert not torch.equal(joint.model.state_dict()["net.head.weight"], probe.model.state_dict()["net.head.weight"])


def test_the_scaling_is_chosen_by_the_validation_score(tmp_path, dataset_dir):
    """scaling_grid: every value is merged and scored on the validation split (the stage's score), the best
    one kept; only the method's own scaling changes."""
    import dataclasses

    from test_merging_stage import _fine_tunes_of_one_base

    from tasks.benchmarks.merging import select_scaling
    from tasks.merging import MergeParams
    from tasks.merging.stage import merge_constituents, validation_score

    constituents = [dataclasses.replace(c, dataset=str(dataset_dir))
                    for c in _fine_tunes_of_one_base(tmp_path, ((3,), (3,)))]
    grid = [0.0, 0.5, 4.0]
    chosen, trials = select_scaling(constituents, MergeParams(method="ties"), grid)
    assert list(trials) == grid
    assert chosen.ties_scaling == max(grid, key=trials.get) and chosen.scaling == MergeParams().scaling
    score = validation_score(constituents, shared_head=False)
    for value in (0.0, 4.0):
        merged = merge_constituents(constituents, MergeParams(method="ties", ties_scaling=value), heads="per-task")
        assert trials[value] == pytest.approx(score(merged.result.state), abs=1e-4)
    assert trials[0.0] != trials[4.0]
