"""The merging-method contract: what every member of :mod:`tasks.merging` takes, returns and declares.

A method maps a base state dict and the constituents' state dicts (the same tensor names, shapes and dtypes)
to one merged state dict, plus the coefficients it used (recorded as the merge's lineage). Methods that need
data to decide (greedy soup, Frank-Wolfe) receive a ``score`` callback: higher is better, computed by the
caller on validation data, so the algorithms themselves stay pure tensor arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

StateDict = dict[str, torch.Tensor]
Score = Callable[[StateDict], float]

MergeMethodName = Literal["uniform-soup", "greedy-soup", "task-arithmetic", "ties", "dare", "opcm", "fw"]


class MergeParams(BaseModel):
    """How fine-tunes of one base are merged into one model: the method and its settings."""

    model_config = ConfigDict(extra="forbid")

    method: MergeMethodName = Field(
        "ties", description="uniform-soup (average), greedy-soup (add models in order of validation score while "
                            "the soup improves), task-arithmetic (base + scaling x sum of task vectors), ties "
                            "(trim, elect sign, disjoint mean), dare (random drop and rescale, then task "
                            "arithmetic), opcm (orthogonal projection, one model at a time, constant memory), fw "
                            "(Frank-Wolfe over the pool, guided by validation loss)")
    scaling: float = Field(0.3, ge=0.0, le=4.0, description="Task-vector scaling of task-arithmetic and dare "
                                                            "(Ilharco et al. 2023 pick 0.3-0.4 on validation)")
    ties_scaling: float = Field(1.0, ge=0.0, le=4.0, description="Scaling of the TIES-merged task vector "
                                                                 "(Yadav et al. 2023 use 1)")
    density: float = Field(0.2, gt=0.0, le=1.0, description="TIES: share of each task vector's largest-magnitude "
                                                            "entries kept (top-k)")
    majority_sign: Literal["total", "frequency"] = Field(
        "total", description="TIES sign election: by the summed values (total) or by the count of signs (frequency)")
    drop_rate: float = Field(0.5, ge=0.0, lt=1.0, description="DARE: share of each task vector's entries dropped "
                                                              "at random (the rest is rescaled by 1/(1-rate))")
    opcm_alpha: float = Field(0.5, gt=0.0, le=1.0, description="OPCM: share of the merged update's singular-value "
                                                               "mass treated as already covered (Tang et al. 2025 "
                                                               "use 0.5)")
    fw_steps: int = Field(8, ge=1, le=200, description="Frank-Wolfe iterations (each scores every pool model's "
                                                       "direction and a few step sizes on validation data)")
    fw_vertex_scale: float = Field(1.0, gt=0.0, le=8.0, description="Frank-Wolfe: each pool model enters the "
                                                                    "feasible set as base + scale x its task vector")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the random draws (dare's masks); same seed, "
                                                         "same merge")


@dataclass
class MergeResult:
    """The merged state, the coefficient each constituent ended with, and what the method did."""

    state: StateDict
    coefficients: list[float]
    notes: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeMethod:
    """One merging method.

    Attributes:
        name: the value of ``MergeParams.method``.
        merge: ``(base, models, params, score) -> MergeResult``.
        needs_score: it calls ``score`` (validation data); others ignore it.
        sequential: it folds models one at a time and keeps only a constant-size state (OPCM).
        paper: where the method comes from.
    """

    name: str
    merge: Callable[[StateDict, list[StateDict], MergeParams, Score | None], MergeResult]
    needs_score: bool
    sequential: bool
    paper: str
