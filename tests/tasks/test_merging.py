"""Merging algorithms: exact invariants of each method and contract tests over the whole family."""

from __future__ import annotations

import pytest
import torch

from tasks.merging import METHODS, MergeParams, merge_states
from tasks.merging.opcm import covered_rank, fold, load_state, merged_state, project_out_covered, save_state, start
from tasks.merging.task_vectors import apply_task_vector, task_vector, vector_norm, weights_digest
from tasks.request_errors import RequestError


def _state(seed: int, scale: float = 1.0, base: dict | None = None) -> dict[str, torch.Tensor]:
    """A small network's tensors: matrices, a bias, a conv kernel, a head, and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"net.blocks.0.attn.qkv.weight": (12, 8), "net.blocks.0.attn.qkv.bias": (12,),
              "net.blocks.0.mlp.fc1.weight": (16, 8), "net.patch_embed.proj.weight": (8, 3, 2, 2),
              "net.head.weight": (3, 8), "net.head.bias": (3,)}
    state = {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}
    if base is not None:
        state = {k: base[k] + v for k, v in state.items()}
    state["net.steps"] = torch.tensor(7)
    return state


BASE = _state(0)
MODELS = [_state(seed, 0.1, BASE) for seed in (1, 2, 3)]


def _score(state: dict[str, torch.Tensor]) -> float:
    """A validation stand-in: closeness to a target halfway between the first two models."""
    target = {k: (MODELS[0][k].float() + MODELS[1][k].float()) / 2 for k in BASE if BASE[k].is_floating_point()}
    return -float(sum(((state[k].float() - t) ** 2).sum() for k, t in target.items()))


def _assert_states_equal(a, b, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("method", ["uniform-soup", "greedy-soup"])
def test_soup_of_identical_models_is_that_model(method):
    result = merge_states(BASE, [MODELS[0]] * 3, MergeParams(method=method), _score)
    _assert_states_equal(result.state, MODELS[0], rtol=1e-6, atol=1e-7)  # three equal terms /3: one rounding


def test_uniform_soup_is_the_mean():
    result = merge_states(BASE, MODELS[:2], MergeParams(method="uniform-soup"))
    key = "net.blocks.0.mlp.fc1.weight"
    torch.testing.assert_close(result.state[key], (MODELS[0][key] + MODELS[1][key]) / 2)
    assert result.coefficients == [0.5, 0.5]


def test_greedy_soup_keeps_only_models_that_help():
    far = _state(9, 5.0, BASE)  # far from the validation target: adding it must lower the score
    result = merge_states(BASE, [far, MODELS[0], MODELS[1]], MergeParams(method="greedy-soup"), _score)
    assert result.coefficients == [0.0, 0.5, 0.5]
    assert _score(result.state) >= max(_score(m) for m in [far, MODELS[0], MODELS[1]])


def test_task_arithmetic_with_zero_coefficient_is_the_base():
    result = merge_states(BASE, MODELS, MergeParams(method="task-arithmetic", scaling=0.0))
    _assert_states_equal(result.state, BASE)


def test_task_arithmetic_adds_scaled_task_vectors():
    result = merge_states(BASE, MODELS[:2], MergeParams(method="task-arithmetic", scaling=0.5))
    key = "net.blocks.0.attn.qkv.weight"
    expected = BASE[key] + 0.5 * ((MODELS[0][key] - BASE[key]) + (MODELS[1][key] - BASE[key]))
    torch.testing.assert_close(result.state[key], expected)


def test_dare_with_drop_rate_zero_equals_task_arithmetic():
    dare = merge_states(BASE, MODELS, MergeParams(method="dare", drop_rate=0.0, scaling=0.4))
    arithmetic = merge_states(BASE, MODELS, MergeParams(method="task-arithmetic", scaling=0.4))
    _assert_states_equal(dare.state, arithmetic.state)


def test_dare_drops_about_its_rate_and_depends_on_the_seed():
    params = MergeParams(method="dare", drop_rate=0.5, scaling=1.0, seed=3)
    one = merge_states(BASE, [MODELS[0]], params)
    key = "net.blocks.0.mlp.fc1.weight"
    kept = (one.state[key] != BASE[key]).float().mean().item()
    assert 0.3 < kept < 0.7
    other = merge_states(BASE, [MODELS[0]], params.model_copy(update={"seed": 4}))
    assert not torch.equal(one.state[key], other.state[key])


def test_ties_keeps_density_and_elects_signs():
    up = {k: v.clone() for k, v in BASE.items()}
    down = {k: v.clone() for k, v in BASE.items()}
    key = "net.blocks.0.attn.qkv.bias"
    up[key] = BASE[key] + 1.0
    down[key] = BASE[key] - 0.25
    result = merge_states(BASE, [up, up, down], MergeParams(method="ties", density=1.0, ties_scaling=1.0))
    # sign elected +, the disagreeing -0.25 entries are left out of the mean
    torch.testing.assert_close(result.state[key], BASE[key] + 1.0)
    trimmed = merge_states(BASE, [MODELS[0]], MergeParams(method="ties", density=0.25))
    changed = (trimmed.state["net.blocks.0.mlp.fc1.weight"] != BASE["net.blocks.0.mlp.fc1.weight"]).sum().item()
    assert changed == int(0.25 * 16 * 8)


def test_opcm_of_one_model_is_that_model():
    result = merge_states(BASE, [MODELS[1]], MergeParams(method="opcm"))
    _assert_states_equal(result.state, MODELS[1], rtol=1e-6, atol=1e-6)


def test_opcm_update_inside_the_covered_subspace_changes_nothing():
    state = start(BASE, MODELS[0])
    key = "net.blocks.0.mlp.fc1.weight"
    merged = state.vector[key]
    u, s, vh = torch.linalg.svd(merged.double(), full_matrices=False)
    k = covered_rank(s, 0.5)
    assert k >= 1
    # any mixture of the covered singular directions, plus each singular pair's own direction
    mix = torch.randn(k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    inside = u[:, :k] @ mix @ vh[:k] + u[:, -1:] @ vh[-1:] * 0.3  # the last singular pair
    assert torch.count_nonzero(project_out_covered(merged, inside.float(), 0.5).abs() > 1e-5) == 0
    # a whole arriving model whose update lies in covered directions only, with the same norm as the merged one
    update = {name: torch.zeros_like(v) for name, v in state.vector.items()}
    update[key] = inside.float()
    update = {name: v * (vector_norm(state.vector) / vector_norm(update)) for name, v in update.items()}
    after = fold(state, BASE, apply_task_vector(BASE, update), alpha=0.5)
    _assert_states_equal(merged_state(after, BASE), merged_state(state, BASE), rtol=1e-5, atol=1e-6)


def test_opcm_keeps_an_orthogonal_update_whole():
    state = start(BASE, MODELS[0])
    key = "net.blocks.0.mlp.fc1.weight"
    u, s, vh = torch.linalg.svd(state.vector[key].double(), full_matrices=True)
    # rows beyond the rank of an 16x8 matrix: directions the merged update does not touch
    outside = (u[:, 10:11] @ vh[:1]).float()
    torch.testing.assert_close(project_out_covered(state.vector[key], outside, 0.5), outside, rtol=1e-5, atol=1e-6)


def test_opcm_memory_is_one_model_whatever_the_count(tmp_path):
    state = start(BASE, MODELS[0], "a")
    sizes = []
    for i, model in enumerate(MODELS[1:] + [_state(11, 0.1, BASE), _state(12, 0.1, BASE)]):
        state = fold(state, BASE, model, 0.5, name=f"m{i}")
        sizes.append(sum(v.numel() for v in state.vector.values()))
    assert len(set(sizes)) == 1
    save_state(state, tmp_path)
    again = load_state(tmp_path)
    assert again.count == 5 and again.constituents == state.constituents
    _assert_states_equal(again.vector, state.vector)


def test_opcm_folding_one_at_a_time_equals_the_batch():
    params = MergeParams(method="opcm", opcm_alpha=0.5)
    batch = merge_states(BASE, MODELS, params)
    state = start(BASE, MODELS[0])
    for model in MODELS[1:]:
        state = fold(state, BASE, model, 0.5)
    _assert_states_equal(batch.state, merged_state(state, BASE))
    # the merged task vector keeps the arrivals' mean norm (the adaptive scaling)
    norms = [vector_norm(task_vector(BASE, m)) for m in MODELS]
    assert vector_norm(state.vector) == pytest.approx(sum(norms) / len(norms), rel=1e-5)


def test_frank_wolfe_moves_towards_helpful_models_and_ignores_irrelevant_ones():
    noisy = [_state(20 + i, 0.3, BASE) for i in range(3)]  # irrelevant to the target
    result = merge_states(BASE, [MODELS[0], MODELS[1], *noisy], MergeParams(method="fw", fw_steps=10), _score)
    assert result.coefficients[0] > 0 and result.coefficients[1] > 0
    assert sum(result.coefficients[2:]) < 0.1 * sum(result.coefficients[:2])
    assert _score(result.state) > _score(BASE)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_is_deterministic(method):
    params = MergeParams(method=method, fw_steps=3)
    one = merge_states(BASE, MODELS, params, _score)
    two = merge_states(BASE, MODELS, params, _score)
    _assert_states_equal(one.state, two.state)
    assert one.coefficients == two.coefficients


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_returns_the_base_when_no_model_moved(method):
    copies = [{k: v.clone() for k, v in BASE.items()} for _ in range(3)]
    result = merge_states(BASE, copies, MergeParams(method=method, fw_steps=2), _score)
    _assert_states_equal(result.state, BASE, rtol=1e-6, atol=1e-7)
    assert result.state["net.steps"].dtype == torch.int64 and int(result.state["net.steps"]) == 7


def test_mismatched_models_are_refused():
    other = dict(MODELS[0])
    other["net.head.weight"] = torch.zeros(5, 8)
    with pytest.raises(RequestError, match="net.head.weight"):
        merge_states(BASE, [MODELS[0], other], MergeParams(method="uniform-soup"))


def test_base_digest_ignores_the_task_heads():
    moved_head = dict(BASE)
    moved_head["net.head.weight"] = BASE["net.head.weight"] + 1
    assert weights_digest(moved_head) == weights_digest(BASE)
    assert weights_digest(MODELS[0]) != weights_digest(BASE)
