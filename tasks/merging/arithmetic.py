"""Task-vector merges: task arithmetic (Ilharco et al. 2023), TIES (Yadav et al. 2023) and DARE (Yu et al.
2024), computed tensor by tensor with peft's merge utilities, so the arithmetic is the one peft's users get."""

from __future__ import annotations

import warnings
import zlib

import torch
from peft.utils import merge_utils

from tasks.merging.family import MergeParams, MergeResult, Score, StateDict
from tasks.merging.task_vectors import apply_task_vector, task_vector


def _merge_vectors(base: StateDict, models: list[StateDict], combine) -> StateDict:
    vectors = [task_vector(base, m) for m in models]
    with warnings.catch_warnings():
        # peft warns once per tensor that a density of 1 prunes nothing (DARE at drop rate 0, TIES at density 1)
        warnings.filterwarnings("ignore", message="The density .* no pruning")
        merged = {key: combine(key, [v[key] for v in vectors]) for key in vectors[0]} if vectors else {}
    return apply_task_vector(base, merged)


def task_arithmetic(base: StateDict, models: list[StateDict], params: MergeParams,
                    score: Score | None = None) -> MergeResult:
    """``base + scaling * sum(task vectors)``."""
    weights = torch.full((len(models),), params.scaling)
    state = _merge_vectors(base, models, lambda key, tensors: merge_utils.task_arithmetic(tensors, weights))
    return MergeResult(state=state, coefficients=[params.scaling] * len(models))


def ties(base: StateDict, models: list[StateDict], params: MergeParams, score: Score | None = None) -> MergeResult:
    """Trim each task vector to its ``density`` largest entries, elect each entry's sign, average the entries
    that agree with it (disjoint mean), scale by ``ties_scaling``."""
    weights = torch.full((len(models),), params.ties_scaling)
    state = _merge_vectors(base, models, lambda key, tensors: merge_utils.ties(
        tensors, weights, params.density, majority_sign_method=params.majority_sign))
    return MergeResult(state=state, coefficients=[params.ties_scaling] * len(models),
                       notes={"density": params.density, "majority_sign": params.majority_sign})


def dare(base: StateDict, models: list[StateDict], params: MergeParams, score: Score | None = None) -> MergeResult:
    """Drop each task-vector entry with probability ``drop_rate``, rescale the rest by 1/(1-rate), then task
    arithmetic. Each tensor's masks come from a generator seeded by (seed, tensor name): the same seed gives
    the same merge, whatever else runs in the process."""
    weights = torch.full((len(models),), params.scaling)
    density = 1.0 - params.drop_rate

    def combine(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        # peft draws its masks from torch's global generator: fork it so the caller's stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((params.seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
            return merge_utils.dare_linear(tensors, weights, density)

    state = _merge_vectors(base, models, combine)
    return MergeResult(state=state, coefficients=[params.scaling] * len(models),
                       notes={"drop_rate": params.drop_rate, "seed": params.seed})
