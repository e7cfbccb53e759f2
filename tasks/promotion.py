"""Promotion: a pure gate decides, a small side-effecting function applies it to the MLflow registry."""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from domains import DomainSpec
from tasks.bags import SLIDE_TASK
from tasks.evaluation import SELECTION_METRICS
from tasks.request_errors import RequestError

GateMetric = Literal["auto", "macro_f1", "accuracy", "macro_auroc", "macro_auprc", "foreground_iou", "mean_iou",
                     "pixel_accuracy"]
# What "auto" means per task: the score model selection maximises during training; for slide models
# (tasks.bags.SLIDE_TASK) the slide-level AUROC, since a test split holds few slides and macro-F1 over a
# handful of slides moves a whole step with each one.
AUTO_GATE_METRIC = {**SELECTION_METRICS, SLIDE_TASK: "macro_auroc"}


class GateThresholds(BaseModel):
    """What a candidate must reach before it may serve: quality, fidelity to fp32, speed, export parity."""

    metric: GateMetric = Field("auto", description="Test-split metric the gate and champion comparison use; 'auto' is "
                                                   "macro-F1 for classification, macro AUROC for multilabel and "
                                                   "slide classification, foreground IoU for segmentation")
    min_metric: float = Field(0.6, ge=0.0, le=1.0, description="Lowest acceptable metric of the edge model")
    max_drop_vs_fp32: float = Field(0.02, ge=0.0, le=1.0,
                                    description="Largest metric drop of the edge model versus the fp32 reference")
    latency_budget_ms: float = Field(50.0, gt=0, le=60000, description="Edge model p50 latency budget per tile at "
                                                                      "batch 1 (ms; a slide model's latency for a bag "
                                                                      "of tiles is divided by its tile count)")
    parity_tolerance: float = Field(1e-3, gt=0, le=1.0,
                                    description="Largest |logit| difference allowed between torch and fp32 ONNX")


@dataclass(frozen=True)
class Candidate:
    """Measured facts about a model pair (reference + edge) waiting for a decision."""

    reference_metric: float
    edge_metric: float
    edge_latency_ms: float
    parity_max_abs_diff: float
    metric: str = "macro_f1"
    task: str = "classification"


@dataclass(frozen=True)
class Decision:
    """Outcome of the gate: whether the candidate passed, which alias it gets, and why."""

    passed: bool
    alias: Literal["champion", "challenger"] | None
    reasons: tuple[str, ...]

    def as_tags(self) -> dict[str, str]:
        return {"vitrail.gate": "passed" if self.passed else "failed",
                "vitrail.alias": self.alias or "none",
                "vitrail.gate_reasons": "; ".join(self.reasons)}


def decide_promotion(candidate: Candidate, gate: GateThresholds, champion_metric: float | None) -> Decision:
    """Apply the gate; a passing candidate becomes champion unless it is worse than the current one."""
    m = candidate.metric
    # Rounded so that e.g. 0.90 - 0.88 (0.020000000000000018 in floats) counts as a drop of exactly 0.02.
    drop = round(candidate.reference_metric - candidate.edge_metric, 9)
    checks = [
        (candidate.edge_metric >= gate.min_metric,
         f"edge {m} {candidate.edge_metric:.4f} {'>=' if candidate.edge_metric >= gate.min_metric else '<'} minimum {gate.min_metric:.4f}"),
        (drop <= gate.max_drop_vs_fp32,
         f"drop vs fp32 {drop:+.4f} {'within' if drop <= gate.max_drop_vs_fp32 else 'exceeds'} {gate.max_drop_vs_fp32:.4f}"),
        (candidate.edge_latency_ms <= gate.latency_budget_ms,
         f"edge p50 latency {candidate.edge_latency_ms:.2f} ms {'within' if candidate.edge_latency_ms <= gate.latency_budget_ms else 'over'} "
         f"budget {gate.latency_budget_ms:.2f} ms"),
        (candidate.parity_max_abs_diff <= gate.parity_tolerance,
         f"export parity {candidate.parity_max_abs_diff:.2e} {'within' if candidate.parity_max_abs_diff <= gate.parity_tolerance else 'over'} "
         f"tolerance {gate.parity_tolerance:.1e}"),
    ]
    reasons = [text for _, text in checks]
    if not all(ok for ok, _ in checks):
        return Decision(passed=False, alias=None, reasons=tuple(reasons))
    if champion_metric is None:
        return Decision(passed=True, alias="champion", reasons=(*reasons, "no current champion"))
    if candidate.edge_metric >= champion_metric:
        return Decision(passed=True, alias="champion",
                        reasons=(*reasons, f"not worse than champion ({candidate.edge_metric:.4f} >= {champion_metric:.4f})"))
    return Decision(passed=True, alias="challenger",
                    reasons=(*reasons, f"worse than champion ({candidate.edge_metric:.4f} < {champion_metric:.4f})"))


def registered_model_names(domain: DomainSpec, task: str | None = None) -> tuple[str, str]:
    """(reference, edge) registered model names: ``<domain>-<task>`` and ``<domain>-<task>-edge``.

    A model of the domain's own task uses its task slug (``satellite-tile-classification``); a model
    of another task the domain also reads (radiology masks: segmentation) is named after that task,
    so champions of different tasks are never compared with each other.
    """
    base = f"{domain.name}-{domain.task_name if task in (None, domain.task) else task}"
    return base, f"{base}-edge"


def resolve_model_uri(domain_name: str, model_uri: str | None) -> str:
    """``model_uri`` when given, else the domain's edge champion: ``models:/<domain>-<task>-edge@champion``."""
    from domains import get_domain

    return model_uri or f"models:/{registered_model_names(get_domain(domain_name))[1]}@champion"


def current_champion_metric(edge_name: str, metric: str) -> float | None:
    """The gate metric recorded on the edge champion version, or None when there is no champion."""
    from tasks import tracking

    holder = tracking.alias_holder(edge_name, "champion")
    if holder is None:
        return None
    value = holder[1].get(f"vitrail.edge_{metric}")
    return float(value) if value is not None else None


@dataclass(frozen=True)
class PromotionRecord:
    """What the registry now holds for this candidate.

    ``pending`` is the alias the gate granted while a reviewer has yet to approve it (no alias moved yet);
    ``champion_version`` the edge champion the decision was compared with (None: there was none);
    ``approval`` the reviewer's outcome (:class:`tasks.approval.ApprovalOutcome` status).
    """

    reference_name: str
    reference_version: str
    edge_name: str
    edge_version: str
    alias: str | None
    pending: str | None = None
    champion_version: str | None = None
    approval: str = "not-required"


log = logging.getLogger(__name__)

# Each registered version names its twin (the reference <-> edge version registered with it), so a reader of
# an alias can check that both registered models agree, and a later promotion can finish a half-applied one.
TWIN_NAME_TAG = "vitrail.twin_name"
TWIN_VERSION_TAG = "vitrail.twin_version"
# When a version pair last became champion (ISO UTC): the champion history a rollback reads.
CHAMPION_SINCE_TAG = "vitrail.champion_since"
ALIASES = ("champion", "challenger")
# Test-only: the promotion test sets this to a crash point's name, and the process SIGKILLs itself there, so a
# crash lands deterministically between the two alias writes. Never set in production.
CRASH_POINT_ENV = "VITRAIL_TEST_CRASH_AT"


class HalfPromotionError(RequestError):
    """An alias is held by a reference or edge version whose twin does not hold it too."""


def _twin_tags(name: str, version: str) -> dict[str, str]:
    return {TWIN_NAME_TAG: name, TWIN_VERSION_TAG: version}


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_POINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def set_alias_pair(names: tuple[str, str], versions: tuple[str, str], alias: str) -> None:
    """Point ``alias`` at twin versions: the reference first, always, so the reference side tells a later
    promotion what a crash interrupted (:func:`complete_half_promotions`)."""
    from tasks import tracking
    from tasks.approval import utc_now

    if alias == "champion":
        since = {CHAMPION_SINCE_TAG: utc_now()}
        tracking.tag_version(names[0], versions[0], since)
        tracking.tag_version(names[1], versions[1], since)
    tracking.set_alias(names[0], alias, versions[0])
    _crash_point("between-aliases")
    tracking.set_alias(names[1], alias, versions[1])


def apply_promotion(decision: Decision, candidate: Candidate, gate: GateThresholds, reference_uri: str,
                    edge_uri: str, names: tuple[str, str], lineage: dict[str, str],
                    hold_aliases: bool = False) -> PromotionRecord:
    """Register both models as twins with the decision as tags; set the alias on both only if the gate passed.

    With ``hold_aliases`` (a reviewer must approve first) nothing moves: the granted alias is returned as
    ``pending`` and :func:`apply_approval` sets it once approved.

    Call it under :func:`promotion_lock`. The edge version is registered already naming its reference twin,
    the reference version is tagged with its edge twin before any alias moves, and aliases move reference
    first: a crash at any point leaves either no alias change or one that :func:`complete_half_promotions`
    finishes, and readers refuse the half state meanwhile (:func:`pinned_model_uri`).
    """
    from tasks import tracking

    tags = {**decision.as_tags(), **lineage, f"vitrail.edge_{candidate.metric}": f"{candidate.edge_metric:.6f}",
            f"vitrail.reference_{candidate.metric}": f"{candidate.reference_metric:.6f}",
            "vitrail.edge_latency_ms_p50": f"{candidate.edge_latency_ms:.4f}"}
    ref_version = tracking.register_version(reference_uri, names[0], tags)
    edge_version = tracking.register_version(edge_uri, names[1], {**tags, **_twin_tags(names[0], ref_version)})
    tracking.tag_version(names[0], ref_version, _twin_tags(names[1], edge_version))
    champion = tracking.alias_holder(names[1], "champion")
    granted = decision.alias if decision.passed else None
    if granted and hold_aliases:
        return PromotionRecord(names[0], ref_version, names[1], edge_version, None, pending=granted,
                               champion_version=champion[0] if champion else None)
    if granted:
        set_alias_pair(names, (ref_version, edge_version), granted)
    return PromotionRecord(names[0], ref_version, names[1], edge_version, granted,
                           champion_version=champion[0] if champion else None)


def approval_report(decision: Decision, record: PromotionRecord, gate: GateThresholds) -> str:
    """The markdown a reviewer reads above the approval form: the versions, the gate's verdict and reasons."""
    champion = (f"version {record.champion_version} of `{record.edge_name}`" if record.champion_version
                else "none yet")
    lines = [f"### Approve `{record.reference_name}` version {record.reference_version} + `{record.edge_name}` "
             f"version {record.edge_version} as **{record.pending}**?", "",
             f"The gate passed ({gate.metric}: minimum {gate.min_metric}, drop vs fp32 at most "
             f"{gate.max_drop_vs_fp32}, latency budget {gate.latency_budget_ms} ms). Current champion: {champion}.",
             "", "Gate results:", ""]
    lines += [f"- {reason}" for reason in decision.reasons]
    lines += ["", "Approve to move the alias on both models; refuse to leave every alias as it is."]
    return "\n".join(lines)


def review_promotion(policy, decision: Decision, record: PromotionRecord, gate: GateThresholds):
    """Pause for a reviewer when the policy asks and an alias is pending; else ``not-required`` (no pause).

    Runs in the flow body (Prefect pauses flow runs, not tasks). ``policy`` is a
    :class:`tasks.approval.ApprovalPolicy`.
    """
    from tasks.approval import ApprovalInput, ApprovalOutcome, request_review

    if not (policy.required and record.pending):
        return ApprovalOutcome("not-required")
    return request_review(policy, ApprovalInput, approval_report(decision, record, gate),
                          key=f"approve-{record.edge_name}-{record.edge_version}",
                          defaults={"alias": record.pending})


def apply_approval(outcome, record: PromotionRecord) -> PromotionRecord:
    """Record a reviewer's outcome on both versions and, if approved, set the alias on both.

    Call it under :func:`promotion_lock`. An approved ``champion`` is not set when the champion changed while
    the run waited (another promotion or a rollback won meanwhile): the reviewer approved a comparison that no
    longer holds, so the outcome is recorded as ``superseded`` and nothing moves.
    """
    from dataclasses import replace

    from tasks import tracking

    if outcome.status == "approved" and outcome.alias == "champion":
        now = tracking.alias_holder(record.edge_name, "champion")
        if (now[0] if now else None) != record.champion_version:
            outcome = replace(outcome, status="superseded", alias=None)
    tags = outcome.as_tags()
    tracking.tag_version(record.reference_name, record.reference_version, tags)
    tracking.tag_version(record.edge_name, record.edge_version, tags)
    alias = outcome.alias if outcome.status == "approved" else None
    if alias:
        set_alias_pair((record.reference_name, record.edge_name), (record.reference_version, record.edge_version),
                       alias)
    return replace(record, alias=alias, pending=None, approval=outcome.status)


def complete_half_promotions(names: tuple[str, str]) -> list[str]:
    """Finish any alias pair a crashed promotion left half-applied; return what was repaired.

    Call it under :func:`promotion_lock`, before reading the champion. The reference side is authoritative
    (:func:`set_alias_pair` writes it first): its holder's twin gets the alias on the edge model, which
    completes an interrupted promotion, or puts back an edge alias moved alone by hand. Only when no
    reference version with a twin holds the alias does the edge holder's twin get it on the reference.
    Versions without twin tags (registered outside the promote stage) are left alone.
    """
    from tasks import tracking

    repaired = []
    for alias in ALIASES:
        for side, other in ((0, 1), (1, 0)):
            holder = tracking.alias_holder(names[side], alias)
            if holder is None or holder[1].get(TWIN_NAME_TAG) != names[other]:
                continue
            twin_version = holder[1][TWIN_VERSION_TAG]
            current = tracking.alias_holder(names[other], alias)
            if current is None or current[0] != twin_version:
                tracking.set_alias(names[other], alias, twin_version)
                repaired.append(f"{names[other]}@{alias}: version {current[0] if current else 'none'} -> "
                                f"{twin_version} (twin of {names[side]} version {holder[0]})")
                log.warning("completed a half-applied promotion: %s", repaired[-1])
            break  # the reference side decided; the edge side is only read when the reference has no twin
    return repaired


def pinned_model_uri(model_uri: str) -> str:
    """``models:/<name>@<alias>`` resolved to ``models:/<name>/<version>`` after checking its twin; other URIs as given.

    Raises:
        HalfPromotionError: the alias holder names a twin version that does not hold the alias too (a
            promotion was interrupted between its two alias writes; the next promotion completes it).
    """
    from tasks import tracking

    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return model_uri
    name, alias = model_uri.removeprefix("models:/").rsplit("@", 1)
    holder = tracking.alias_holder(name, alias)
    if holder is None:
        return model_uri  # the loader reports the missing alias
    version, tags = holder
    twin_name, twin_version = tags.get(TWIN_NAME_TAG), tags.get(TWIN_VERSION_TAG)
    if twin_name is not None:
        twin = tracking.alias_holder(twin_name, alias)
        if twin is None or twin[0] != twin_version:
            raise HalfPromotionError(
                f"{model_uri}: half-applied promotion: {name} version {version} holds '{alias}' but its twin "
                f"{twin_name} version {twin_version} does not ({twin_name}@{alias} is "
                f"{'unset' if twin is None else 'version ' + twin[0]}); refusing to serve a model whose "
                f"reference/edge pair disagrees. Run the promote stage again: it completes the pair first.")
    return f"models:/{name}/{version}"


PROMOTION_LEASE_S = 60  # Prefect's shortest lease: renewed while held, and frees the lock this soon after a crash


def promotion_lock_name(edge_name: str) -> str:
    """Name of the Prefect global concurrency limit that serialises promotions of one registered model."""
    return f"vitrail-promote-{edge_name}"


def ensure_promotion_limit(name: str) -> None:
    """Create the one-slot global concurrency limit ``name`` if missing (idempotent, safe under races).

    Prefect's ``concurrency()`` silently skips a limit that does not exist (a warning, no lock), so the limit
    must exist before acquiring; one that someone widened or deactivated is set back to one active slot.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # a concurrent promotion created it first
            return
        if limit.limit != 1 or not limit.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))


@contextmanager
def promotion_lock(edge_name: str, timeout_s: float | None = 600.0) -> Iterator[None]:
    """Hold the one slot of ``vitrail-promote-<edge name>`` (a Prefect global concurrency limit).

    The limit lives on the Prefect server, so it excludes promotions in other processes and on other
    workers too. The slot is leased: Prefect renews it while held, and a holder killed mid-promotion frees
    it when the lease expires (:data:`PROMOTION_LEASE_S`). If renewal fails, the run is cancelled rather
    than continue without the lock.

    Raises:
        TimeoutError: the slot was not acquired within ``timeout_s`` (``None`` waits for ever).
    """
    from prefect.concurrency.sync import concurrency

    name = promotion_lock_name(edge_name)
    ensure_promotion_limit(name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=PROMOTION_LEASE_S, strict=True):
        yield


def publish_decision(decision: Decision, record: PromotionRecord) -> None:
    """A markdown artifact in the Prefect UI stating the decision and every reason."""
    from prefect.artifacts import create_markdown_artifact

    verdict = (f"promoted to **{record.alias}**" if record.alias
               else f"**{record.pending}** granted by the gate, waiting for a reviewer" if record.pending
               else "**not promoted** (gate failed)")
    lines = [f"### Promotion decision: {verdict}", "",
             f"- `{record.reference_name}` version {record.reference_version}",
             f"- `{record.edge_name}` version {record.edge_version}", "", "Reasons:", ""]
    lines += [f"- {reason}" for reason in decision.reasons]
    create_markdown_artifact(markdown="\n".join(lines), key="promotion-decision",
                             description="Gate decision and reasons")


apply_promotion_task = task(apply_promotion, name="apply-promotion", cache_policy=NONE)
apply_approval_task = task(apply_approval, name="apply-approval", cache_policy=NONE)
publish_decision_task = task(publish_decision, name="publish-decision", cache_policy=NONE)


def gather_candidate(compress_run_id: str, validate_run_id: str, metric: GateMetric) -> tuple[Candidate, str]:
    """Collect the measured facts of a candidate from its compress and validate runs; also return the edge variant.

    ``metric="auto"`` resolves by the task the validate run recorded (tag ``vitrail.task``).
    """
    from tasks import tracking

    validation, validate_tags = tracking.read_run(validate_run_id)
    task = validate_tags.get("vitrail.task", "classification")
    if metric == "auto":
        metric = AUTO_GATE_METRIC[task]
    _, compress_tags = tracking.read_run(compress_run_id)
    edge = compress_tags.get("vitrail.edge_variant")
    if edge is None:
        raise RequestError(f"run {compress_run_id} is not a compress run (no vitrail.edge_variant tag)")
    report = tracking.read_json_artifact(compress_run_id, "compress_report.json")
    keys = (f"torch-fp32.test_{metric}", f"{edge}.test_{metric}")
    missing = [k for k in keys if k not in validation]
    if missing:
        raise RequestError(f"validate run {validate_run_id} lacks metrics {missing}")
    edge_row = next(v for v in report["variants"] if v["name"] == edge)
    candidate = Candidate(reference_metric=validation[keys[0]], edge_metric=validation[keys[1]],
                          # per tile: a slide model's row times a bag of tiles_per_sample tiles
                          edge_latency_ms=edge_row["latency_ms_p50"] / max(edge_row.get("tiles_per_sample", 1), 1),
                          parity_max_abs_diff=report["parity"]["onnx-fp32"]["max_abs_diff"], metric=metric,
                          task=task)
    return candidate, edge


gather_candidate_task = task(gather_candidate, name="gather-candidate", cache_policy=NONE)
decide_promotion_task = task(decide_promotion, name="decide-promotion", cache_policy=NONE)
current_champion_metric_task = task(current_champion_metric, name="current-champion-metric", cache_policy=NONE)
complete_half_promotions_task = task(complete_half_promotions, name="complete-half-promotions", cache_policy=NONE)
