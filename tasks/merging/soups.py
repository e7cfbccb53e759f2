"""Model soups (Wortsman et al. 2022): the uniform average of fine-tunes, and the greedy soup that keeps a
model only if adding it does not lower the validation score."""

from __future__ import annotations

import torch

from tasks.merging.family import MergeParams, MergeResult, Score, StateDict
from tasks.merging.task_vectors import mergeable_keys


def average_states(base: StateDict, models: list[StateDict]) -> StateDict:
    """Element-wise mean of ``models`` (floating-point tensors; others copied from the base)."""
    floats = set(mergeable_keys(base))
    return {k: (torch.stack([m[k].float() for m in models]).sum(0) / len(models)).to(base[k].dtype)
            if k in floats else base[k].clone() for k in base}


def uniform_soup(base: StateDict, models: list[StateDict], params: MergeParams, score: Score | None = None) -> MergeResult:
    """Every constituent with weight 1/N."""
    return MergeResult(state=average_states(base, models), coefficients=[1.0 / len(models)] * len(models))


def greedy_soup(base: StateDict, models: list[StateDict], params: MergeParams, score: Score | None = None) -> MergeResult:
    """Models in order of their own validation score (ties by position); each joins the soup only if the
    soup's score does not fall. The first (best) model always stays, so the soup is never worse than it on
    the validation data."""
    if score is None:
        raise ValueError("greedy-soup needs a validation score callback")
    own = [score(m) for m in models]
    order = sorted(range(len(models)), key=lambda i: (-own[i], i))
    kept = [order[0]]
    best = own[order[0]]
    trail = [{"model": order[0], "score": best, "kept": True}]
    for index in order[1:]:
        candidate = average_states(base, [models[i] for i in kept + [index]])
        value = score(candidate)
        joined = value >= best
        trail.append({"model": index, "score": value, "kept": joined})
        if joined:
            kept.append(index)
            best = value
    state = average_states(base, [models[i] for i in kept])
    coefficients = [1.0 / len(kept) if i in kept else 0.0 for i in range(len(models))]
    return MergeResult(state=state, coefficients=coefficients,
                       notes={"own_scores": own, "order": order, "trail": trail, "soup_score": best})
