"""FW-Merging (Chen et al. 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization"): merging
as constrained optimisation over a pool of fine-tunes, solved by Frank-Wolfe.

The feasible set is the convex hull of the base and every pool model's scaled task vector
(``base + vertex_scale * tau_i``). Each iteration asks the linear-minimisation oracle which vertex the
validation loss decreases towards fastest, then moves towards it by the best of a few step sizes. The slopes
come from the ``score`` callback (higher is better, e.g. minus the validation loss) by finite differences along
each vertex's direction, so no gradient and no training loop is needed: each iteration costs one validation
pass per pool model plus one per step size tried. A model that helps no task is never the steepest vertex, so
a large, noisy pool does not pull the merge off course; iterations stop early when no vertex improves.
"""

from __future__ import annotations

import torch

from tasks.merging.family import MergeParams, MergeResult, Score, StateDict
from tasks.merging.task_vectors import apply_task_vector, task_vector

PROBE = 0.05  # share of the way to a vertex used to measure the slope towards it
STEP_SIZES = (0.1, 0.25, 0.5, 1.0)


def _combine(vectors: list[StateDict], weights: list[float], scale: float) -> StateDict:
    keys = vectors[0].keys()
    return {k: scale * sum(w * v[k] for w, v in zip(weights, vectors) if w) if any(weights)
            else torch.zeros_like(vectors[0][k]) for k in keys}


def frank_wolfe(base: StateDict, models: list[StateDict], params: MergeParams,
                score: Score | None = None) -> MergeResult:
    """Frank-Wolfe from the base over the hull of the scaled task vectors; returns the weights reached."""
    if score is None:
        raise ValueError("fw needs a validation score callback")
    vectors = [task_vector(base, m) for m in models]
    scale = params.fw_vertex_scale
    weights = [0.0] * len(models)  # the base holds 1 - sum(weights)

    def value(w: list[float]) -> float:
        return score(apply_task_vector(base, _combine(vectors, w, scale)))

    current = value(weights)
    trail = [{"step": 0, "score": current, "weights": list(weights)}]
    for step in range(1, params.fw_steps + 1):
        slopes = []
        for i in range(len(models)):
            towards = [(1 - PROBE) * w for w in weights]
            towards[i] += PROBE
            slopes.append((value(towards) - current) / PROBE)
        vertex = max(range(len(models)), key=lambda i: (slopes[i], -i))
        if slopes[vertex] <= 0:
            trail.append({"step": step, "stopped": "no vertex improves the score", "slopes": slopes})
            break
        best_gamma, best_value = 0.0, current
        for gamma in STEP_SIZES:
            trial = [(1 - gamma) * w for w in weights]
            trial[vertex] += gamma
            trial_value = value(trial)
            if trial_value > best_value:
                best_gamma, best_value = gamma, trial_value
        if best_gamma == 0.0:
            trail.append({"step": step, "stopped": "no step size improves the score", "vertex": vertex})
            break
        weights = [(1 - best_gamma) * w for w in weights]
        weights[vertex] += best_gamma
        current = best_value
        trail.append({"step": step, "vertex": vertex, "gamma": best_gamma, "score": current,
                      "slopes": slopes, "weights": list(weights)})
    state = apply_task_vector(base, _combine(vectors, weights, scale))
    return MergeResult(state=state, coefficients=[w * scale for w in weights],
                       notes={"trail": trail, "score": current, "vertex_scale": scale})
