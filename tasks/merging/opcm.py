"""OPCM, orthogonal projection continual merging (Tang et al. 2025, "Merging Models on the Fly Without
Retraining: A Sequential Approach to Scalable Continual Model Merging").

Models arrive one at a time. The running state is the merged task vector ``T`` (one tensor per base tensor),
its scale ``lambda`` and the running mean of the arrivals' task-vector norms: its size is one model's, whatever
the count. For every weight matrix, the arriving task vector ``tau`` is written in the singular bases of ``T``
(``C = U^T tau V``); the coefficients of the directions ``T`` already covers are removed: the diagonal (each
singular pair ``u_i v_i^T``) and the top-left ``k x k`` block of the leading singular directions holding
``alpha`` of the singular-value mass. What remains is orthogonal to what is merged, so it does not overwrite
earlier tasks. Other tensors (biases, norms, embeddings) are added as they are. The sum
``lambda_prev * T + projected`` is then divided by ``lambda`` chosen so the merged task vector keeps the mean
norm of the arrivals (the adaptive scaling of the paper), and ``lambda`` is kept for the next arrival.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks.merging.family import MergeParams, MergeResult, Score, StateDict
from tasks.merging.task_vectors import apply_task_vector, task_vector, vector_norm

STATE_FILE = "opcm-task-vector.safetensors"
SCALARS_FILE = "opcm-state.json"


@dataclass
class OpcmState:
    """Everything the next arrival needs: the merged task vector and three numbers (plus names, for lineage)."""

    vector: StateDict
    scale: float = 1.0
    count: int = 1
    mean_norm: float = 0.0
    constituents: list[str] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)


def covered_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """Number of leading singular directions whose block counts as covered: the first index where the
    cumulative share of singular-value mass exceeds ``alpha`` (0 when the first value alone does)."""
    total = singular_values.sum()
    if total <= 0:
        return 0
    return int((singular_values.cumsum(0) / total > alpha).float().argmax())


def project_out_covered(merged: torch.Tensor, update: torch.Tensor, alpha: float) -> torch.Tensor:
    """``update`` without its components along the directions ``merged`` covers (see the module docstring)."""
    if not torch.any(merged):
        return update  # nothing merged in this matrix yet: nothing is covered
    u, s, vh = torch.linalg.svd(merged.double(), full_matrices=True)
    v = vh.T
    coefficients = u.T @ update.double() @ v
    coefficients.diagonal().zero_()
    k = covered_rank(s, alpha)
    coefficients[:k, :k] = 0
    return (u @ coefficients @ v.T).to(update.dtype)


def start(base: StateDict, first: StateDict, name: str = "model-1") -> OpcmState:
    """The state after the first arrival: its own task vector, scale 1."""
    vector = task_vector(base, first)
    return OpcmState(vector=vector, scale=1.0, count=1, mean_norm=vector_norm(vector), constituents=[name],
                     scales=[1.0])


def fold(state: OpcmState, base: StateDict, arriving: StateDict, alpha: float, name: str = "") -> OpcmState:
    """Fold one arriving model into the state; uses only the state, the base and that model."""
    tau = task_vector(base, arriving)
    count = state.count + 1
    mean_norm = (state.mean_norm * state.count + vector_norm(tau)) / count
    combined = {}
    for key, merged in state.vector.items():
        # Weight matrices are projected; vectors and convolution kernels are added as they are (as in the paper).
        update = project_out_covered(merged, tau[key], alpha) if merged.ndim == 2 else tau[key]
        combined[key] = state.scale * merged + update
    norm = vector_norm(combined)
    scale = norm / mean_norm if norm > 0 and mean_norm > 0 else 1.0
    vector = {k: v / scale for k, v in combined.items()}
    return OpcmState(vector=vector, scale=scale, count=count, mean_norm=mean_norm,
                     constituents=[*state.constituents, name or f"model-{count}"], scales=[*state.scales, scale])


def merged_state(state: OpcmState, base: StateDict) -> StateDict:
    """The merged model: base plus the state's task vector."""
    return apply_task_vector(base, state.vector)


def opcm(base: StateDict, models: list[StateDict], params: MergeParams, score: Score | None = None) -> MergeResult:
    """All of ``models`` folded in their order (the merge of a batch, same as arriving one by one)."""
    state = start(base, models[0])
    for model in models[1:]:
        state = fold(state, base, model, params.opcm_alpha)
    # T_n = (lambda_{n-1} T_{n-1} + p_n) / lambda_n telescopes to (p_1 + ... + p_n) / lambda_n: every
    # (projected) task vector ends with the coefficient 1 / lambda_n.
    coefficients = [1.0 / state.scale] * len(models)
    return MergeResult(state=merged_state(state, base), coefficients=coefficients,
                       notes={"alpha": params.opcm_alpha, "scales": state.scales, "mean_norm": state.mean_norm})


def save_state(state: OpcmState, folder: Path) -> Path:
    """Write the state as ``opcm-task-vector.safetensors`` plus ``opcm-state.json`` in ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.vector.items()}, str(folder / STATE_FILE))
    (folder / SCALARS_FILE).write_text(json.dumps({"scale": state.scale, "count": state.count,
                                                   "mean_norm": state.mean_norm, "constituents": state.constituents,
                                                   "scales": state.scales}, indent=2) + "\n")
    return folder


def load_state(folder: Path) -> OpcmState:
    """Read a state written by :func:`save_state`."""
    from safetensors.torch import load_file

    scalars = json.loads((folder / SCALARS_FILE).read_text())
    return OpcmState(vector=load_file(str(folder / STATE_FILE)), scale=float(scalars["scale"]),
                     count=int(scalars["count"]), mean_norm=float(scalars["mean_norm"]),
                     constituents=list(scalars["constituents"]), scales=[float(s) for s in scalars["scales"]])
