"""Promote: a gate decides; passing models get the champion or challenger alias in the MLflow registry."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field

from domains import get_domain
from flows.error_reporting import report_input_errors
from flows.parameters import DomainName, WorkdirField
from tasks import tracking
from tasks.approval import ApprovalPolicy, fail_on_timeout
from tasks.backbone_catalog import base_licence_tags
from tasks.promotion import (
    GateThresholds,
    apply_approval_task,
    apply_promotion_task,
    complete_half_promotions_task,
    current_champion_metric_task,
    decide_promotion_task,
    gather_candidate_task,
    promotion_lock,
    publish_decision_task,
    registered_model_names,
    review_promotion,
)


class PromoteParams(BaseModel):
    """Decide whether a validated model may serve, and register it."""

    domain: DomainName = "satellite"
    model_uri: str = Field(..., min_length=1, max_length=1000, description="Reference model URI from the finetune flow")
    edge_model_uri: str = Field(..., min_length=1, max_length=1000, description="Edge model URI from the compress flow")
    compress_run_id: str = Field(..., min_length=1, max_length=64, description="MLflow run id of the compress flow")
    validate_run_id: str = Field(..., min_length=1, max_length=64, description="MLflow run id of the validate flow")
    workdir: str = WorkdirField
    gate: GateThresholds = Field(default_factory=GateThresholds, description="Promotion thresholds")
    approval: ApprovalPolicy = Field(default_factory=ApprovalPolicy,
                                     description="Human approval before an alias moves (a form in the Prefect UI)")


class PromoteReceipt(BaseModel):
    """The decision and the registry versions it produced."""

    passed: bool
    alias: str | None
    reasons: list[str]
    reference_model: str
    edge_model: str
    repaired: list[str] = Field(default_factory=list,
                                description="Alias pairs a crashed promotion left half-applied, completed first")
    approval: str = Field("not-required", description="approved, refused, timed-out, superseded or not-required")


@flow(name="promote-model", flow_run_name="promote-{params.domain}", log_prints=True)
@report_input_errors
def promote(params: PromoteParams) -> PromoteReceipt:
    """Apply the gate, compare with the current champion, register versions and set aliases.

    One promotion of a registered model at a time: read champion, decide, register and set aliases all
    happen under a Prefect global concurrency limit named after the model, across processes and workers.
    When approval is required the versions are registered with the gate's verdict, the lock is released, and
    the run pauses for a reviewer; the alias moves (under the lock again) only once approved.
    """
    with tracking.stage_run(params.domain, "promote", params.workdir, params.model_dump(mode="json")) as run:
        candidate, edge_variant = gather_candidate_task(params.compress_run_id, params.validate_run_id, params.gate.metric)
        names = registered_model_names(get_domain(params.domain), candidate.task)
        lineage = {"vitrail.finetune_model": params.model_uri, "vitrail.compress_run_id": params.compress_run_id,
                   "vitrail.validate_run_id": params.validate_run_id, "vitrail.edge_variant": edge_variant,
                   "vitrail.promote_run_id": run.run_id,
                   # Catalog weights' licence (non-commercial, gated) travels to every registered version.
                   **base_licence_tags(tracking.logged_model_metadata_task(params.model_uri).get("base_backbone"))}
        with promotion_lock(names[1]):
            repaired = complete_half_promotions_task(names)
            champion = current_champion_metric_task(names[1], candidate.metric)
            decision = decide_promotion_task(candidate, params.gate, champion)
            record = apply_promotion_task(decision, candidate, params.gate, params.model_uri, params.edge_model_uri,
                                          names, lineage, hold_aliases=params.approval.required)
        tracking.set_tags(decision.as_tags())
        publish_decision_task(decision, record)
        outcome = review_promotion(params.approval, decision, record, params.gate)  # pauses only when asked
        if outcome.status != "not-required":
            with promotion_lock(names[1]):
                record = apply_approval_task(outcome, record)
            tracking.set_tags({"vitrail.approval": record.approval})
            fail_on_timeout(params.approval, outcome, f"promotion of {record.edge_name} version {record.edge_version}")
    return PromoteReceipt(passed=decision.passed, alias=record.alias, reasons=list(decision.reasons),
                          reference_model=f"{record.reference_name}/{record.reference_version}",
                          edge_model=f"{record.edge_name}/{record.edge_version}", repaired=repaired,
                          approval=record.approval)
