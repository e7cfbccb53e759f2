"""End-to-end merge flow: fine-tunes registered in a temporary MLflow store, merged at once and one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from domains import Channel, SampleSet

CHANNELS = (Channel("B04", 664.6, 10.0), Channel("B03", 559.8, 10.0), Channel("B02", 492.7, 10.0))
TINY = {"name": "vit_tiny_patch16_224", "patch_size": 4, "depth": 1}
TRAIN = {"epochs": 1, "batch_size": 16, "learning_rate": 3e-3, "warmup_epochs": 0.0}
CHEAP_COMPRESSION = {"latency_repeats": 5, "throughput_batch": 4, "quantization": {"calibration_samples": 8}}

pytestmark = pytest.mark.slow


def _write(out: Path, rule: str) -> Path:
    """The same tiles under two label rules: which band is brightest (3 classes), or is red bright (2)."""
    from tasks.dataset import SplitParams, write_dataset

    rng = np.random.default_rng(0)
    n, size = 96, 16
    bright = rng.integers(0, 3, n)
    means = np.full((n, 3), 0.1, dtype=np.float32)
    means[np.arange(n), bright] = 0.6
    images = (means[:, :, None, None] + rng.normal(0, 0.03, (n, 3, size, size))).astype(np.float32)
    labels, classes = (bright, ("red", "green", "blue")) if rule == "brightest" else \
        ((bright == 0).astype(np.int64), ("other", "red"))
    samples = SampleSet(images=images, labels=labels.astype(np.int64),
                        groups=np.array([f"blk-{i // 8}" for i in range(n)]),
                        locations=np.stack([np.arange(n) * size, np.zeros(n)], axis=1).astype(np.int64),
                        source="synthetic-scene", channels=CHANNELS, class_names=classes)
    write_dataset(samples, "satellite", "classification", out, SplitParams(seed=0))
    return out


def _foundation(path: Path, seed: int) -> Path:
    """A foundation checkpoint (what `vitrail pretrain` or a hub download provides): the tiny ViT's weights."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, in_chans=3, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Three fine-tunes registered: two tasks of one base, and one of another base (another seed)."""
    import os

    from flows.finetune import FinetuneParams, finetune_backbone
    from tasks import tracking

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path_factory.mktemp("merge")
    workdir = root / "work"
    data = {rule: _write(root / rule, rule) for rule in ("brightest", "red")}
    bases = {seed: _foundation(root / f"base-{seed}.safetensors", seed) for seed in (0, 7)}
    names = {}
    for name, rule, seed in (("satellite-brightest", "brightest", 0), ("satellite-red", "red", 0),
                             ("satellite-other-base", "red", 7)):
        backbone = {**TINY, "weights": "file", "weights_file": str(bases[seed])}
        receipt = finetune_backbone(FinetuneParams(domain="satellite", dataset=str(data[rule]), workdir=str(workdir),
                                                   backbone=backbone, train=TRAIN))
        tracking.configure_tracking(workdir)
        names[name] = tracking.register_version(receipt.model_uri, name, {"vitrail.merge_pool": "test"
                                                                         if seed == 0 else "other"})
    return workdir, data


def test_merge_refuses_fine_tunes_of_another_base(registry):
    from flows.merge import MergeFlowParams, merge
    from tasks.request_errors import RequestError

    workdir, _ = registry
    with pytest.raises(RequestError, match="satellite-brightest/1 and satellite-other-base/1 were fine-tuned from "
                                           "different bases"):
        merge(MergeFlowParams(workdir=str(workdir), compress=False,
                              selection={"models": ["satellite-brightest", "models:/satellite-other-base/1"]}))


def test_batch_merge_keeps_heads_per_task_gates_and_registers_lineage(registry):
    from mlflow import MlflowClient

    from flows.merge import MergeFlowParams, merge

    workdir, _ = registry
    receipt = merge(MergeFlowParams(workdir=str(workdir), compress=False, selection={"tag": "vitrail.merge_pool=test"},
                                    merge={"method": "ties", "density": 0.5}, gate={"min_share": 0.5}))
    assert receipt.mode == "batch" and receipt.method == "ties"
    assert receipt.constituents == ["satellite-brightest/1", "satellite-red/1"]
    assert {m.name for m in receipt.models} == {"satellite-brightest-merged", "satellite-red-merged"}
    assert len(receipt.gate_reasons) == 2 and all("merged macro_f1" in r for r in receipt.gate_reasons)
    version = MlflowClient().get_model_version("satellite-red-merged", receipt.models[1].version)
    assert json.loads(version.tags["vitrail.merge.constituents"]) == receipt.constituents
    assert version.tags["vitrail.merge.method"] == "ties" and version.tags["vitrail.merge.heads"] == "per-task"
    assert version.tags["vitrail.merge.gate"] == ("passed" if receipt.gate_passed else "failed")

    # each merged model keeps its own task's head (3 classes vs 2) on one merged backbone
    from tasks.tracking import load_reference_model

    brightest, red = (load_reference_model(m.model_uri) for m in receipt.models)
    assert brightest.net.head.out_features == 3 and red.net.head.out_features == 2
    shared = [k for k in brightest.state_dict() if ".head." not in k and k.startswith("net.")]
    assert all(np.array_equal(brightest.state_dict()[k], red.state_dict()[k]) for k in shared)


def test_sequential_merge_folds_one_arriving_model_at_a_time(registry):
    from mlflow import MlflowClient

    from flows.merge import MergeFlowParams, merge

    workdir, data = registry
    params = MergeFlowParams(workdir=str(workdir), running="satellite-seq", gate={"min_share": 0.0},
                             compress=False)
    first = merge(params, arriving="models:/satellite-brightest/1")
    assert first.mode == "sequential" and first.constituents == ["satellite-brightest/1"]
    second = merge(MergeFlowParams(**{**params.model_dump(), "compress": True, "compression": CHEAP_COMPRESSION}),
                   arriving="models:/satellite-red/1")
    assert second.constituents == ["satellite-brightest/1", "satellite-red/1"]
    assert second.method == "opcm" and len(second.coefficients) == 2
    client = MlflowClient()
    states = [client.get_model_version("satellite-seq-state", v) for v in (first.state_version, second.state_version)]
    assert [s.tags["vitrail.merge.count"] for s in states] == ["1", "2"]
    # the state holds one merged task vector whatever the count: same files, same tensor sizes
    from tasks.tracking import download_model

    sizes = [(download_model(f"models:/satellite-seq-state/{s.version}", workdir / f"state-{s.version}")
              / "opcm-task-vector.safetensors").stat().st_size for s in states]
    assert sizes[0] == sizes[1]
    assert second.gate_passed  # min_share 0: the fold becomes the running state
    assert str(client.get_model_version_by_alias("satellite-seq-state", "current").version) == second.state_version
    # compressed and validated on each constituent's own test split
    assert all(m.edge_model_uri and len(m.validate_run_ids) == 1 for m in second.models)
    with pytest.raises(Exception, match="already merged"):
        merge(params, arriving="models:/satellite-red/1")
