"""The merge stage's work: registered fine-tunes in, checked to share one base and one input contract, merged
by a method of :mod:`tasks.merging`, heads kept per task, every merged task model scored on each constituent's
test split and gated against that constituent's own score.

Heads: a classifier head (and a slide model's attention pooling) belongs to its task. When every constituent
has the same label space (task type and class names), the head is merged like the rest and one model serves
all; otherwise the backbone is merged and each constituent's head is put back on it, giving one merged model
per constituent task.

Recommended fine-tune protocol for models meant to be merged (what ``vitrail bench merging`` does by default):
fit each task's head first by a linear probe of the base's frozen features, then train the adapter with that
head frozen (``tasks.finetune.fit_adapter(..., frozen_head=...)``). A head trained jointly with its own
fine-tuned backbone fits only that backbone; a frozen linear-probe head stays valid under the merged one.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field
from torch import nn
from torch.nn import functional as F

from tasks.merging import MergeParams, MergeResult, Score, StateDict, merge_states
from tasks.merging.opcm import OpcmState, fold, load_state, merged_state, save_state, start
from tasks.merging.registry import ModelRef
from tasks.merging.task_vectors import shared_part, task_part, weights_digest
from tasks.request_errors import RequestError

log = logging.getLogger(__name__)

HeadMode = Literal["auto", "per-task", "shared"]
HEADS_FILE = "heads.safetensors"
CONSTITUENTS_FILE = "constituents.json"


class MergeGateParams(BaseModel):
    """What a merged model must keep of each constituent's own quality."""

    min_share: float = Field(0.9, ge=0.0, le=1.5, description="Lowest allowed merged / own test score, for every "
                                                            "constituent task (0.9: at most 10 % below each "
                                                            "fine-tune on its own test split)")
    metric: Literal["auto", "macro_f1", "accuracy", "macro_auroc", "foreground_iou"] = Field(
        "auto", description="Test metric compared; auto is the gate metric of the task (macro-F1 for "
                            "classification, macro AUROC for multilabel, foreground IoU for segmentation)")


class SelectionParams(BaseModel):
    """Which registered fine-tunes to merge."""

    models: list[str] = Field(default_factory=list, max_length=256,
                              description="Model URIs or registry names: models:/NAME/VERSION, models:/NAME@ALIAS, "
                                          "NAME (newest version), NAME/VERSION, NAME@ALIAS or runs:/RUN/model")
    tag: str = Field("", max_length=500, description="Also every registered version carrying this tag, as "
                                                    "KEY=VALUE (e.g. vitrail.site=north); empty for none")
    search: str = Field("", max_length=1000, description="Also every registered version an MLflow search filter "
                                                         "finds (e.g. name LIKE 'satellite-%'); empty for none")


@dataclass
class Constituent:
    """A loaded fine-tune: the model, what it was logged with, and the dataset it learned from."""

    ref: ModelRef
    model: nn.Module
    metadata: dict
    dataset: str
    own_score: float | None = None

    @property
    def label_space(self) -> str:
        return json.dumps([self.metadata.get("task", "classification"), self.metadata.get("class_names", [])])


@dataclass
class TaskModel:
    """One merged model and the constituents whose test splits it answers to."""

    name: str
    model: nn.Module
    metadata: dict
    constituents: list[Constituent]


@dataclass
class MergeOutcome:
    """What a merge produced: the models per task, the method's coefficients and notes, the head mode."""

    task_models: list[TaskModel]
    result: MergeResult
    shared_head: bool
    opcm_state: OpcmState | None = None
    lineage: dict[str, str] = field(default_factory=dict)


# --- loading and checking ---------------------------------------------------------------------------------


def load_constituents(refs: list[ModelRef]) -> list[Constituent]:
    """Load every constituent's reference model, metadata and dataset location."""
    from tasks import tracking
    from tasks.merging.registry import finetune_dataset

    if not refs:
        raise RequestError("nothing to merge: give models, a tag or a search that finds registered fine-tunes")
    loaded = []
    for ref in refs:
        metadata = tracking.logged_model_metadata(ref.uri)
        if metadata.get("adapter_mergeable") is False:
            raise RequestError(f"{ref.label}: its {metadata.get('adapter')} adapter keeps extra operations that "
                               "cannot be folded into plain weights; only fine-tunes with mergeable adapters "
                               "(LoRA, DoRA, IA3, full, ...) can be merged")
        loaded.append(Constituent(ref=ref, model=tracking.load_reference_model(ref.uri), metadata=metadata,
                                  dataset=finetune_dataset(ref.uri)))
    check_compatible(loaded)
    return loaded


CONTRACT = (("channels", "bands"), ("tile_size", "tile size"), ("input_normalisation", "input normalisation"),
            ("task", "task type"), ("bags", "bag settings"), ("backbone", "backbone"))


def check_compatible(constituents: list[Constituent]) -> None:
    """Refuse constituents of different bases or input contracts, naming both models and what differs."""
    first = constituents[0]
    if not first.metadata.get("base_digest"):
        raise RequestError(f"{first.ref.label}: no base digest recorded (fine-tuned before Vitrail recorded "
                           "one); fine-tune it again to merge it")
    for other in constituents[1:]:
        a, b = first.metadata, other.metadata
        if not b.get("base_digest"):
            raise RequestError(f"{other.ref.label}: no base digest recorded (fine-tuned before Vitrail recorded "
                               "one); fine-tune it again to merge it")
        if a["base_digest"] != b["base_digest"]:
            raise RequestError(f"{first.ref.label} and {other.ref.label} were fine-tuned from different bases "
                               f"(base digests {a['base_digest'][:12]} and {b['base_digest'][:12]}); only fine-tunes "
                               "of one base can be merged")
        for key, what in CONTRACT:
            if a.get(key) != b.get(key):
                raise RequestError(f"{first.ref.label} and {other.ref.label} have different {what} "
                                   f"({_short(a.get(key))} and {_short(b.get(key))}); merged models share one "
                                   "input contract")
        for buffer in ("mean", "std"):  # the normalisation statistics inside the model
            if not torch.equal(getattr(first.model, buffer), getattr(other.model, buffer)):
                raise RequestError(f"{first.ref.label} and {other.ref.label} normalise inputs differently (channel "
                                   f"{buffer} {getattr(first.model, buffer).flatten().tolist()} and "
                                   f"{getattr(other.model, buffer).flatten().tolist()}); merged models share one "
                                   "input contract")
        units = [getattr(c.model, "input_scaling", None) for c in (first, other)]
        if units[0] != units[1]:  # raw units the buffers are folded for (see tasks.models.NormalizedClassifier)
            raise RequestError(f"{first.ref.label} and {other.ref.label} take inputs in different units (input "
                               f"scaling {_short(units[0])} and {_short(units[1])}); merged models share one "
                               "input contract")


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def rebuild_base(constituent: Constituent) -> StateDict:
    """The base the constituents were fine-tuned from, rebuilt from what the fine-tune recorded (backbone block
    and seed) and checked against the recorded digest; in the reference model's tensor names."""
    from tasks.models import BackboneParams, build_backbone
    from tasks.reproducibility import pin_determinism

    from domains import Channel
    from tasks.bags import BagParams

    meta = constituent.metadata
    backbone = BackboneParams(**meta["base_backbone"])
    channels = tuple(Channel(**c) for c in meta["channels"])
    bags = BagParams(**meta["bags"]) if meta.get("bags") else None
    pin_determinism(int(meta["base_seed"]))  # fine-tuning pinned it before building: the same random start
    net = build_backbone(backbone, channels, len(meta["class_names"]), int(meta["tile_size"]),
                         task=meta.get("task", "classification"), bags=bags)
    digest = weights_digest(net.state_dict())
    if digest != meta["base_digest"]:
        raise RequestError(f"{constituent.ref.label}: the base rebuilt from its record ({backbone.name}, weights "
                           f"{backbone.weights} {backbone.weights_file or ''}, seed {meta['base_seed']}) has digest "
                           f"{digest[:12]}, not the recorded {meta['base_digest'][:12]}; the base checkpoint changed "
                           "or is missing here")
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    own = constituent.model.state_dict()
    for key in ("mean", "std"):
        state[key] = own[key].clone()
    if state.keys() != own.keys():
        raise RequestError(f"{constituent.ref.label}: its tensors do not match the rebuilt base's "
                           f"({sorted(set(own) ^ set(state))[:3]})")
    return state


# --- scoring -----------------------------------------------------------------------------------------------


def _validation_split(model: nn.Module, dataset_path: str, max_samples: int) -> tuple[str, np.ndarray, torch.Tensor]:
    """(task, images, labels) of (the first ``max_samples`` of) a dataset's validation split, read once."""
    from tasks.model_inputs import load_dataset_for

    dataset = load_dataset_for(dataset_path, model)
    split = dataset.splits.get("val") or dataset.splits["train"]
    count = min(len(split), max_samples)
    return (dataset.info.task, np.asarray(split.images[:count], dtype=np.float32),
            torch.from_numpy(np.asarray(split.labels[:count])))


def _validation_loss(model: nn.Module, task: str, images: np.ndarray, labels: torch.Tensor) -> float:
    """Mean loss of ``model`` on validation images (cross-entropy; masked binary cross-entropy for multilabel)."""
    from tasks.training import predict_logits

    logits = torch.from_numpy(predict_logits(model, images))
    if task == "multilabel":
        known = labels >= 0
        loss = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0).float(), reduction="none")
        return float((loss * known).sum() / known.sum().clamp(min=1))
    return float(F.cross_entropy(logits, labels.long(), ignore_index=-1))


def validation_score(constituents: list[Constituent], shared_head: bool, max_samples: int = 512) -> Score:
    """A score for greedy soup and Frank-Wolfe: minus the mean validation loss over the constituents' tasks,
    each with its own head (or the merged head when it is shared)."""
    models = [copy.deepcopy(c.model).eval() for c in constituents]
    splits = [_validation_split(c.model, c.dataset, max_samples) for c in constituents]

    def score(state: StateDict) -> float:
        losses = []
        for constituent, model, split in zip(constituents, models, splits):
            weights = state if shared_head else {**state, **task_part(constituent.model.state_dict())}
            model.load_state_dict(weights)
            losses.append(_validation_loss(model, *split))
        return -float(np.mean(losses))

    return score


def gate_metric(task_type: str, metric: str) -> str:
    from tasks.promotion import AUTO_GATE_METRIC

    return AUTO_GATE_METRIC[task_type] if metric == "auto" else metric


def test_score(model: nn.Module, dataset: str, metric: str, plot_dir: Path) -> float:
    """The reference model's ``metric`` on a dataset's test split, scored by the validate stage's own code."""
    from tasks.validation import REFERENCE, validate_variants

    result = validate_variants(dataset, model, {}, plot_dir)
    metrics = result.reports[REFERENCE].flat_metrics(prefix="")
    if metric not in metrics:
        raise RequestError(f"metric {metric!r} is not reported for {result.task} (reported: {sorted(metrics)})")
    return float(metrics[metric])


# --- merging -----------------------------------------------------------------------------------------------


def decide_heads(constituents: list[Constituent], heads: HeadMode) -> bool:
    """True for one shared (merged) head; refuses ``shared`` when the label spaces differ."""
    spaces = {c.label_space for c in constituents}
    if heads == "shared" and len(spaces) > 1:
        raise RequestError("heads=shared needs one label space, but the constituents differ: " + "; ".join(
            f"{c.ref.label}: {c.label_space}" for c in constituents))
    return heads == "shared" or (heads == "auto" and len(spaces) == 1)


def _state_for_merge(constituent: Constituent, shared_head: bool) -> StateDict:
    state = constituent.model.state_dict()
    return state if shared_head else shared_part(state)


def build_task_models(merged: StateDict, constituents: list[Constituent], shared_head: bool,
                      lineage: dict) -> list[TaskModel]:
    """One model with the shared head, or one per constituent: the merged backbone with that task's head."""
    groups = [constituents] if shared_head else [[c] for c in constituents]
    models = []
    for group in groups:
        owner = group[0]
        model = copy.deepcopy(owner.model)
        model.load_state_dict(merged if shared_head else {**merged, **task_part(owner.model.state_dict())})
        name = _merged_name(owner, shared_head)
        metadata = {**owner.metadata, "merge": {**lineage, "head_from": "merged" if shared_head else owner.ref.label}}
        models.append(TaskModel(name=name, model=model.eval(), metadata=metadata, constituents=group))
    return models


def _merged_name(owner: Constituent, shared_head: bool) -> str:
    """Registered name of a merged model: ``<constituent's registered name>-merged`` for a task's own head,
    ``<domain>-merged`` for the shared head."""
    if shared_head:
        return f"{owner.metadata['domain']}-merged"
    if owner.ref.registered_name:
        return f"{owner.ref.registered_name}-merged"
    # a run's model: named after its dataset, the task it answers to
    return f"{owner.metadata['domain']}-merged-{owner.metadata.get('dataset_digest', 'model')[:12]}"


def merge_lineage(constituents: list[Constituent], params: MergeParams, result: MergeResult) -> dict:
    return {"method": params.method, "constituents": [c.ref.label for c in constituents],
            "coefficients": [round(float(x), 6) for x in result.coefficients],
            "base_digest": constituents[0].metadata["base_digest"], "params": params.model_dump(mode="json")}


def merge_constituents(constituents: list[Constituent], params: MergeParams, heads: HeadMode = "auto",
                       max_val_samples: int = 512) -> MergeOutcome:
    """Merge the loaded constituents with ``params.method``; return one model per task (or one shared)."""
    shared_head = decide_heads(constituents, heads)
    base = rebuild_base(constituents[0])
    if not shared_head:
        base = shared_part(base)
    states = [_state_for_merge(c, shared_head) for c in constituents]
    score = validation_score(constituents, shared_head, max_val_samples) if params.method in ("greedy-soup", "fw") \
        else None
    result = merge_states(base, states, params, score)
    lineage = merge_lineage(constituents, params, result)
    return MergeOutcome(task_models=build_task_models(result.state, constituents, shared_head, lineage),
                        result=result, shared_head=shared_head, lineage=lineage)


merge_constituents_task = task(merge_constituents, name="merge-constituents", cache_policy=NONE)


# --- sequential merging (OPCM), one arriving model at a time -------------------------------------------------


def fold_arriving(previous: Path | None, arriving: Constituent, alpha: float, heads: HeadMode = "auto") -> MergeOutcome:
    """Fold one arriving fine-tune into the running OPCM state read from ``previous`` (None: it starts one).

    Reads only the previous state (merged task vector, three numbers, the constituents' heads and records)
    and the arriving model, so memory does not grow with the number merged so far, heads aside.
    """
    if previous is None:
        records, heads_state, state = [], {}, None
    else:
        records = json.loads((previous / CONSTITUENTS_FILE).read_text())
        from safetensors.torch import load_file

        heads_state = load_file(str(previous / HEADS_FILE))
        state = load_state(previous)
    known = [_constituent_from_record(r, heads_state, arriving) for r in records]
    if any(c.ref.label == arriving.ref.label for c in known):
        raise RequestError(f"{arriving.ref.label} is already merged into this running model")
    everyone = [*known, arriving]
    check_compatible([arriving, *known[:1]])
    # The first arrival cannot know the label spaces still to come: "auto" keeps heads per task in a sequence.
    mode = ("per-task" if heads == "auto" else heads) if previous is None else records[0]["head_mode"]
    shared_head = decide_heads(everyone, mode)
    base = rebuild_base(arriving)
    if not shared_head:
        base = shared_part(base)
    incoming = _state_for_merge(arriving, shared_head)
    state = start(base, incoming, arriving.ref.label) if state is None else fold(
        state, base, incoming, alpha, arriving.ref.label)
    merged = merged_state(state, base)
    params = MergeParams(method="opcm", opcm_alpha=alpha)
    result = MergeResult(state=merged, coefficients=[1.0 / state.scale] * state.count,
                         notes={"alpha": alpha, "scales": state.scales, "mean_norm": state.mean_norm})
    lineage = merge_lineage(everyone, params, result)
    return MergeOutcome(task_models=build_task_models(merged, everyone, shared_head, lineage), result=result,
                        shared_head=shared_head, opcm_state=state, lineage=lineage)


fold_arriving_task = task(fold_arriving, name="fold-arriving", cache_policy=NONE)


def _constituent_from_record(record: dict, heads_state: StateDict, template: Constituent) -> Constituent:
    """A constituent merged earlier, rebuilt from the state's record: its architecture (random weights) with its
    head loaded; its backbone is never kept (only its head and facts are)."""
    from tasks.models import ReferenceArchitecture, build_reference_model

    model = build_reference_model(ReferenceArchitecture(**record["architecture"]))
    # keys are "<label>/<tensor>"; labels hold slashes (name/version), tensor names never do
    own = {k.rsplit("/", 1)[1]: v for k, v in heads_state.items() if k.rsplit("/", 1)[0] == record["label"]}
    model.load_state_dict({**model.state_dict(), **shared_part(template.model.state_dict()), **own})
    return Constituent(ref=ModelRef(**record["ref"]), model=model.eval(), metadata=record["metadata"],
                       dataset=record["dataset"], own_score=record.get("own_score"))


def save_running_state(outcome: MergeOutcome, constituents: list[Constituent], folder: Path) -> Path:
    """Write the OPCM state, every constituent's head and its record (label, dataset, own score) to ``folder``."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    save_state(outcome.opcm_state, folder)
    heads = {} if outcome.shared_head else {f"{c.ref.label}/{k}": v.contiguous()
                                            for c in constituents for k, v in task_part(c.model.state_dict()).items()}
    save_file(heads or {"none/none": torch.zeros(1)}, str(folder / HEADS_FILE))
    records = [{"label": c.ref.label, "ref": asdict(c.ref), "metadata": c.metadata, "dataset": c.dataset,
                "own_score": c.own_score, "head_mode": "shared" if outcome.shared_head else "per-task",
                "architecture": _architecture(c).model_dump(mode="json")} for c in constituents]
    (folder / CONSTITUENTS_FILE).write_text(json.dumps(records, indent=2) + "\n")
    return folder


def _architecture(constituent: Constituent):
    from domains import Channel
    from tasks.models import reference_architecture

    channels = tuple(Channel(**c) for c in constituent.metadata["channels"])
    return reference_architecture(constituent.model, channels, constituent.metadata.get("task", "classification"))


# --- the gate ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskScore:
    """A merged model's test score on one constituent's split, next to that constituent's own."""

    constituent: str
    model: str
    metric: str
    merged: float
    own: float

    @property
    def share(self) -> float:
        return self.merged / self.own if self.own > 0 else float("inf") if self.merged > 0 else 1.0


@dataclass(frozen=True)
class MergeGate:
    passed: bool
    reasons: tuple[str, ...]

    def as_tags(self) -> dict[str, str]:
        return {"vitrail.merge.gate": "passed" if self.passed else "failed",
                "vitrail.merge.gate_reasons": "; ".join(self.reasons)[:5000]}


def decide_merge_gate(scores: list[TaskScore], gate: MergeGateParams) -> MergeGate:
    """Pass only when every constituent keeps at least ``min_share`` of its own test score."""
    if not scores:
        return MergeGate(False, ("no constituent task was scored",))
    reasons = []
    for s in scores:
        ok = s.share >= gate.min_share
        reasons.append(f"{s.constituent}: merged {s.metric} {s.merged:.4f} is {s.share:.1%} of its own {s.own:.4f} "
                       f"({'>=' if ok else '<'} {gate.min_share:.0%})")
    return MergeGate(all(s.share >= gate.min_share for s in scores), tuple(reasons))


def score_against_constituents(outcome: MergeOutcome, gate: MergeGateParams, plot_dir: Path) -> list[TaskScore]:
    """Every merged model on each of its constituents' test splits, beside the constituent's own score (scored
    now unless a sequential state recorded it when that constituent arrived)."""
    scores = []
    for task_model in outcome.task_models:
        for constituent in task_model.constituents:
            metric = gate_metric(constituent.metadata.get("task", "classification"), gate.metric)
            if constituent.own_score is None:
                constituent.own_score = test_score(constituent.model, constituent.dataset, metric,
                                                   plot_dir / "own" / constituent.ref.label.replace("/", "-"))
            merged = test_score(task_model.model, constituent.dataset, metric,
                                plot_dir / "merged" / constituent.ref.label.replace("/", "-"))
            scores.append(TaskScore(constituent.ref.label, task_model.name, metric, merged, constituent.own_score))
    return scores


score_against_constituents_task = task(score_against_constituents, name="score-against-constituents",
                                       cache_policy=NONE)
decide_merge_gate_task = task(decide_merge_gate, name="decide-merge-gate", cache_policy=NONE)
load_constituents_task = task(load_constituents, name="load-constituents", cache_policy=NONE)


# --- recording ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergedModelRecord:
    """A merged model as logged and registered."""

    name: str
    model_uri: str
    version: str
    datasets: list[str]
    alias: str | None


CANDIDATE_ALIAS = "candidate"
STATE_ALIAS = "current"


def lineage_tags(outcome: MergeOutcome) -> dict[str, str]:
    lineage = outcome.lineage
    return {"vitrail.merge.method": lineage["method"],
            "vitrail.merge.constituents": json.dumps(lineage["constituents"])[:5000],
            "vitrail.merge.coefficients": json.dumps(lineage["coefficients"])[:5000],
            "vitrail.merge.base_digest": lineage["base_digest"],
            "vitrail.merge.heads": "shared" if outcome.shared_head else "per-task"}


def record_merge(outcome: MergeOutcome, scores: list[TaskScore], gate: MergeGate) -> list[MergedModelRecord]:
    """Log every merged model to the active run, register it with its lineage and the gate's verdict as tags,
    and give it the alias ``candidate`` when the gate passed (promotion stays the promote stage's decision)."""
    from tasks import tracking

    tags = {**lineage_tags(outcome), **gate.as_tags()}
    tracking.set_tags(tags)
    tracking.log_metrics({f"share.{s.constituent.replace('/', '.v')}": s.share for s in scores}
                         | {f"merged_test_{s.metric}.{s.constituent.replace('/', '.v')}": s.merged for s in scores}
                         | {f"own_test_{s.metric}.{s.constituent.replace('/', '.v')}": s.own for s in scores})
    records = []
    for task_model in outcome.task_models:
        meta = task_model.metadata
        bag = (2,) if "bags" in meta else ()
        example = np.zeros((1, *bag, len(meta["channels"]), meta["tile_size"], meta["tile_size"]), dtype=np.float32)
        uri = tracking.log_reference_model(task_model.model, example, meta)
        version = tracking.register_version(uri, task_model.name, tags)
        alias = CANDIDATE_ALIAS if gate.passed else None
        if alias:
            tracking.set_alias(task_model.name, alias, version)
        records.append(MergedModelRecord(task_model.name, uri, version, [c.dataset for c in task_model.constituents],
                                         alias))
    return records


record_merge_task = task(record_merge, name="record-merge", cache_policy=NONE)


def running_state_name(domain: str, running: str) -> str:
    """Registered name of a sequential merge's state: ``<running>`` or ``<domain>-opcm``, plus ``-state``."""
    return f"{running or domain + '-opcm'}-state"


def fetch_running_state(name: str, destination: Path) -> Path | None:
    """Download the state version holding the alias ``current`` (None when the sequence has not started)."""
    from tasks import tracking

    holder = tracking.alias_holder(name, STATE_ALIAS)
    if holder is None:
        return None
    return tracking.download_model(f"models:/{name}/{holder[0]}", destination)


def record_running_state(outcome: MergeOutcome, gate: MergeGate, name: str, folder: Path) -> str:
    """Log the new state's files, register them as a version of ``name``; only a state whose merge passed the
    gate becomes ``current`` (the next arrival folds into it), so a failed fold leaves the sequence where it
    was. Returns the version."""
    from tasks import tracking

    for path in sorted(folder.iterdir()):
        tracking.log_artifact(path, "opcm-state")
    version = tracking.register_artifact_folder("opcm-state", name, {
        **lineage_tags(outcome), **gate.as_tags(), "vitrail.merge.count": str(outcome.opcm_state.count)})
    if gate.passed:
        tracking.set_alias(name, STATE_ALIAS, version)
    return version


fetch_running_state_task = task(fetch_running_state, name="fetch-running-state", cache_policy=NONE)
record_running_state_task = task(record_running_state, name="record-running-state", cache_policy=NONE)
save_running_state_task = task(save_running_state, name="save-running-state", cache_policy=NONE)


# --- the two ways in: a selection merged at once, or one arriving model folded into the running state ---------


def merge_selection(selection: SelectionParams, params: MergeParams, heads: HeadMode = "auto",
                    max_val_samples: int = 512) -> MergeOutcome:
    """Resolve the selection in the registry, load and check the constituents, merge them."""
    from tasks.merging.registry import select_models

    constituents = load_constituents(select_models(selection.models, selection.tag, selection.search))
    return merge_constituents(constituents, params, heads, max_val_samples)


def fold_arriving_model(arriving: str, state_name: str, alpha: float, heads: HeadMode, scratch: Path) -> MergeOutcome:
    """Fold the arriving fine-tune (``models:/NAME/VERSION``) into the running state registered as ``state_name``."""
    from tasks.merging.registry import resolve_model

    if not arriving.startswith("models:/"):
        raise RequestError(f"arriving {arriving!r}: expected a registered version, models:/NAME/VERSION")
    previous = fetch_running_state(state_name, scratch / "previous-state")
    return fold_arriving(previous, load_constituents([resolve_model(arriving)])[0], alpha, heads)


def constituents_of(outcome: MergeOutcome) -> list[Constituent]:
    seen: dict[str, Constituent] = {}
    for task_model in outcome.task_models:
        for constituent in task_model.constituents:
            seen.setdefault(constituent.ref.label, constituent)
    return list(seen.values())


def record_sequence(outcome: MergeOutcome, gate: MergeGate, state_name: str, scratch: Path) -> str:
    """Write and register the new running state (``current`` only when the gate passed); return its version."""
    folder = save_running_state(outcome, constituents_of(outcome), scratch / "opcm-state")
    return record_running_state(outcome, gate, state_name, folder)


merge_selection_task = task(merge_selection, name="merge-selection", cache_policy=NONE)
fold_arriving_model_task = task(fold_arriving_model, name="fold-arriving-model", cache_policy=NONE)
record_sequence_task = task(record_sequence, name="record-sequence", cache_policy=NONE)
