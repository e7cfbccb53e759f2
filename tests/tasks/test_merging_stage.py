"""The merge stage's checks and gate, on in-memory constituents (no registry): refusals name both models."""

from __future__ import annotations

import copy

import pytest
import torch
from tasks_support import CHANNELS, tiny_backbone

from tasks.merging.registry import ModelRef
from tasks.merging.stage import (
    Constituent,
    MergeGateParams,
    TaskScore,
    build_task_models,
    check_compatible,
    decide_heads,
    decide_merge_gate,
)
from tasks.models import NormalizedClassifier, build_backbone
from tasks.request_errors import RequestError


def _constituent(label: str, classes=("a", "b"), digest="d" * 64, mean=0.1, **metadata) -> Constituent:
    torch.manual_seed(0)
    net = build_backbone(tiny_backbone(), CHANNELS, len(classes), 16)
    model = NormalizedClassifier(net, (mean,) * 3, (1.0,) * 3).eval()
    meta = {"domain": "satellite", "task": "classification", "channels": [{"name": c.name} for c in CHANNELS],
            "class_names": list(classes), "tile_size": 16, "backbone": "vit_tiny_patch16_224", "base_digest": digest,
            **metadata}
    ref = ModelRef(label=label, uri=f"models:/{label}", registered_name=label.split("/")[0])
    return Constituent(ref=ref, model=model, metadata=meta, dataset="d")


def test_fine_tunes_of_different_bases_are_refused_naming_both():
    with pytest.raises(RequestError, match=r"sat-a/1 and sat-b/2 were fine-tuned from different bases \(base "
                                           r"digests aaaaaaaaaaaa and bbbbbbbbbbbb\)"):
        check_compatible([_constituent("sat-a/1", digest="a" * 64), _constituent("sat-b/2", digest="b" * 64)])


@pytest.mark.parametrize("key, value, what", [("tile_size", 32, "tile size"),
                                              ("channels", [{"name": "B08"}], "bands"),
                                              ("input_normalisation", {"method": "macenko"}, "input normalisation")])
def test_a_different_input_contract_is_refused_naming_both(key, value, what):
    with pytest.raises(RequestError, match=f"sat-a/1 and sat-b/1 have different {what}"):
        check_compatible([_constituent("sat-a/1"), _constituent("sat-b/1", **{key: value})])


def test_different_normalisation_statistics_are_refused():
    with pytest.raises(RequestError, match="normalise inputs differently"):
        check_compatible([_constituent("sat-a/1"), _constituent("sat-b/1", mean=0.5)])


def test_different_input_units_are_refused():
    """Same buffers, other raw units (e.g. DN of another processing baseline): the same numbers mean other pixels."""
    other = _constituent("sat-b/1")
    other.model.input_scaling = ((1e-4, -0.1),) * 3
    with pytest.raises(RequestError, match="take inputs in different units"):
        check_compatible([_constituent("sat-a/1"), other])


def test_a_fine_tune_without_a_base_digest_is_refused():
    with pytest.raises(RequestError, match="sat-b/1: no base digest recorded"):
        check_compatible([_constituent("sat-a/1"), _constituent("sat-b/1", digest="")])


def test_heads_are_shared_only_where_label_spaces_agree():
    same = [_constituent("a/1"), _constituent("b/1")]
    mixed = [_constituent("a/1"), _constituent("c/1", classes=("x", "y", "z"))]
    assert decide_heads(same, "auto") is True
    assert decide_heads(mixed, "auto") is False
    assert decide_heads(same, "per-task") is False
    with pytest.raises(RequestError, match="heads=shared needs one label space"):
        decide_heads(mixed, "shared")


def test_per_task_models_keep_their_own_heads_on_the_merged_backbone():
    a, c = _constituent("a/1"), _constituent("c/1", classes=("x", "y", "z"))
    merged = {k: v + 1.0 for k, v in a.model.state_dict().items() if ".head." not in k}
    models = build_task_models(merged, [a, c], shared_head=False, lineage={"method": "ties"})
    assert [m.name for m in models] == ["a-merged", "c-merged"]
    for task_model, owner in zip(models, (a, c)):
        state = task_model.model.state_dict()
        assert torch.equal(state["net.head.weight"], owner.model.state_dict()["net.head.weight"])
        assert torch.equal(state["net.blocks.0.attn.qkv.weight"], merged["net.blocks.0.attn.qkv.weight"])
        assert task_model.metadata["merge"]["head_from"] == owner.ref.label
    assert copy.deepcopy(models[1].model).net.head.out_features == 3


def test_the_gate_needs_every_constituent_to_keep_its_share():
    scores = [TaskScore("a/1", "a-merged", "macro_f1", 0.90, 0.95), TaskScore("b/1", "b-merged", "macro_f1", 0.80, 0.95)]
    gate = decide_merge_gate(scores, MergeGateParams(min_share=0.9))
    assert not gate.passed
    assert gate.reasons[0].startswith("a/1: merged macro_f1 0.9000 is 94.7% of its own 0.9500 (>= 90%)")
    assert "b/1: merged macro_f1 0.8000 is 84.2% of its own 0.9500 (< 90%)" in gate.reasons[1]
    assert decide_merge_gate(scores, MergeGateParams(min_share=0.8)).passed
    assert not decide_merge_gate([], MergeGateParams()).passed


def _fine_tunes_of_one_base(tmp_path, classes_per_task=((2,), (3,))):
    """Constituents as the fine-tune stage leaves them: a base checkpoint file, its digest recorded, each model
    the base moved a little, with its own head."""
    import timm
    from safetensors.torch import save_file

    from domains import Channel  # noqa: F401
    from tasks.merging.task_vectors import weights_digest

    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, in_chans=3, num_classes=0)
    file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(file))
    backbone = tiny_backbone(weights="file", weights_file=str(file))
    constituents = []
    for i, (classes,) in enumerate(classes_per_task):
        net = build_backbone(backbone, CHANNELS, classes, 16)
        digest = weights_digest(net.state_dict())
        with torch.no_grad():
            for name, p in net.named_parameters():
                if not name.startswith("head."):
                    p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i * 100 + len(name))))
        model = NormalizedClassifier(net, (0.1,) * 3, (1.0,) * 3).eval()
        meta = {"domain": "satellite", "task": "classification",
                "channels": [{"name": c.name, "wavelength_nm": c.wavelength_nm, "resolution_m": c.resolution_m}
                             for c in CHANNELS],
                "class_names": [f"c{k}" for k in range(classes)], "tile_size": 16, "backbone": backbone.name,
                "base_digest": digest, "base_seed": 0, "base_backbone": backbone.model_dump(mode="json")}
        ref = ModelRef(label=f"sat-{i}/1", uri=f"models:/sat-{i}/1", registered_name=f"sat-{i}", version="1")
        constituents.append(Constituent(ref=ref, model=model, metadata=meta, dataset="d"))
    return constituents


def test_sequential_fold_reads_only_the_saved_state_and_the_arriving_model(tmp_path):
    from tasks.merging.stage import constituents_of, fold_arriving, rebuild_base, save_running_state

    first, second = _fine_tunes_of_one_base(tmp_path)
    base = rebuild_base(first)  # the recorded digest matches the checkpoint's, or this raises
    assert not torch.equal(base["net.blocks.0.attn.qkv.weight"], first.model.state_dict()["net.blocks.0.attn.qkv.weight"])
    one = fold_arriving(None, first, alpha=0.5)
    assert one.shared_head is False and one.opcm_state.count == 1
    # OPCM of one model is that model
    for key, value in first.model.state_dict().items():
        torch.testing.assert_close(one.task_models[0].model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    saved = save_running_state(one, constituents_of(one), tmp_path / "state-1")
    two = fold_arriving(saved, second, alpha=0.5)
    assert two.opcm_state.count == 2 and [m.name for m in two.task_models] == ["sat-0-merged", "sat-1-merged"]
    assert two.task_models[0].model.net.head.out_features == 2 and two.task_models[1].model.net.head.out_features == 3
    # the first task's head came back from the state file, not from its model
    torch.testing.assert_close(two.task_models[0].model.state_dict()["net.head.weight"],
                               first.model.state_dict()["net.head.weight"])
    assert {k: v.shape for k, v in two.opcm_state.vector.items()} == {k: v.shape for k, v in one.opcm_state.vector.items()}
    saved_two = save_running_state(two, constituents_of(two), tmp_path / "state-2")
    with pytest.raises(RequestError, match="sat-1/1 is already merged"):
        fold_arriving(saved_two, second, alpha=0.5)


def test_a_different_base_is_refused_when_rebuilt(tmp_path):
    from tasks.merging.stage import rebuild_base

    first, _ = _fine_tunes_of_one_base(tmp_path)
    first.metadata["base_digest"] = "0" * 64
    with pytest.raises(RequestError, match="has digest .* not the recorded 000000000000"):
        rebuild_base(first)
