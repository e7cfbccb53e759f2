"""Rollback: put an earlier champion back on the reference and edge models together, with optional approval."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field

from domains import get_domain
from flows.error_reporting import report_input_errors
from flows.parameters import DomainName, WorkdirField
from tasks.approval import ApprovalPolicy, fail_on_timeout
from tasks.promotion import complete_half_promotions_task, promotion_lock, registered_model_names
from tasks.rollback import model_pair, plan_rollback_task, review_rollback, settle_rollback_task
from tasks.tracking import configure_tracking


class RollbackParams(BaseModel):
    """Move the champion alias back to an earlier model version, on the reference and edge models together."""

    domain: DomainName = "satellite"
    model: str = Field("", max_length=250, pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]*)?$",
                       description="Registered model name, reference or edge (e.g. satellite-tile-classification); "
                                   "empty: the domain's own models (<domain>-<task> and its -edge twin)")
    to_version: str | None = Field(None, pattern=r"^[0-9]{1,9}$",
                                   description="Version of that model to restore; empty restores the previous "
                                               "champion (the last one not rolled back from since)")
    reason: str = Field("", max_length=2000, description="Why; recorded on the model versions")
    requested_by: str = Field("", max_length=200, description="Who asks for the rollback; recorded on the versions "
                                                              "(the reviewer's name when approval is required)")
    workdir: str = WorkdirField
    approval: ApprovalPolicy = Field(default_factory=ApprovalPolicy,
                                     description="Human approval before champion moves (a form in the Prefect UI)")


class RollbackReceipt(BaseModel):
    """What serves now."""

    reference_model: str
    edge_model: str
    rolled_back: bool
    previous: str = Field(description="The champion versions (reference + edge) before the rollback")
    approval: str = Field(description="approved, refused, timed-out or not-required")
    repaired: list[str] = Field(default_factory=list, description="Half-applied alias pairs completed first")


@flow(name="rollback-champion", flow_run_name="rollback-{params.domain}", log_prints=True)
@report_input_errors
def rollback(params: RollbackParams) -> RollbackReceipt:
    """Restore an earlier champion on both registered models (reference and edge) and tag the move.

    Runs under the model's promotion lock, so it never interleaves with a promotion; with approval required the
    lock is released while the run waits for the reviewer, and the move is refused if the champion changed.
    """
    configure_tracking(params.workdir)
    model = params.model or registered_model_names(get_domain(params.domain))[0]
    names = model_pair(model)
    with promotion_lock(names[1]):
        repaired = complete_half_promotions_task(names)
        plan = plan_rollback_task(model, params.to_version)
    print(f"rollback: {plan.describe()}")
    outcome = review_rollback(params.approval, plan, params.reason)  # pauses only when asked
    moved = settle_rollback_task(plan, outcome, params.requested_by, params.reason)
    fail_on_timeout(params.approval, outcome, f"rollback of {names[1]}")
    serving = plan.target if moved else plan.current
    return RollbackReceipt(reference_model=f"{names[0]}/{serving[0]}", edge_model=f"{names[1]}/{serving[1]}",
                           rolled_back=moved, previous=f"{plan.current[0]} + {plan.current[1]}",
                           approval=outcome.status, repaired=repaired)
