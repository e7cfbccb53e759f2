"""Model merging: fine-tunes of one base combined into one model, one file per method.

Every member follows :class:`tasks.merging.family.MergeMethod` and is listed in :data:`METHODS` (the form,
the CLI and the contract tests read it). The algorithms work on state dicts and know nothing of MLflow or
Prefect; :mod:`tasks.merging.stage` is the merge stage's work around them (loading registered fine-tunes,
refusing mismatched ones, heads per task, scoring and the gate).
"""

from __future__ import annotations

from tasks.merging.arithmetic import dare, task_arithmetic, ties
from tasks.merging.family import MergeMethod, MergeMethodName, MergeParams, MergeResult, Score, StateDict
from tasks.merging.frank_wolfe import frank_wolfe
from tasks.merging.opcm import opcm
from tasks.merging.soups import greedy_soup, uniform_soup
from tasks.request_errors import RequestError

__all__ = ["METHODS", "MergeMethod", "MergeMethodName", "MergeParams", "MergeResult", "Score", "StateDict",
           "get_method", "merge_states"]

METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("uniform-soup", uniform_soup, needs_score=False, sequential=False,
                paper="Wortsman et al. 2022, Model soups"),
    MergeMethod("greedy-soup", greedy_soup, needs_score=True, sequential=False,
                paper="Wortsman et al. 2022, Model soups"),
    MergeMethod("task-arithmetic", task_arithmetic, needs_score=False, sequential=False,
                paper="Ilharco et al. 2023, Editing models with task arithmetic"),
    MergeMethod("ties", ties, needs_score=False, sequential=False,
                paper="Yadav et al. 2023, TIES-Merging"),
    MergeMethod("dare", dare, needs_score=False, sequential=False,
                paper="Yu et al. 2024, Language models are Super Mario (DARE)"),
    MergeMethod("opcm", opcm, needs_score=False, sequential=True,
                paper="Tang et al. 2025, Merging models on the fly without retraining (OPCM)"),
    MergeMethod("fw", frank_wolfe, needs_score=True, sequential=False,
                paper="Chen et al. 2025, FW-Merging: scaling model merging with Frank-Wolfe optimization"),
)}


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; a :class:`RequestError` lists the known ones otherwise."""
    if name not in METHODS:
        raise RequestError(f"merge method {name!r} is unknown; known: {', '.join(METHODS)}")
    return METHODS[name]


def merge_states(base: StateDict, models: list[StateDict], params: MergeParams,
                 score: Score | None = None) -> MergeResult:
    """Merge ``models`` (fine-tunes of ``base``, same tensors) with ``params.method``."""
    from tasks.merging.task_vectors import check_same_layout

    if not models:
        raise RequestError("nothing to merge: no constituent models")
    check_same_layout(base, models)
    method = get_method(params.method)
    if method.needs_score and score is None:
        raise RequestError(f"merge method {method.name} needs validation data to score candidates")
    return method.merge(base, models, params, score)
