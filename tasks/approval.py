"""Human approval: a registry move (promotion, rollback) waits for a reviewer's typed answer in the Prefect UI.

The run pauses with :func:`prefect.flow_runs.pause_flow_run` and a :class:`prefect.input.RunInput` form; the
Prefect server validates the answer against the form's JSON schema, so an invalid answer is rejected and the run
stays paused. What the reviewer decided (or that nobody did in time) is recorded as model-version tags beside the
gate's own, so the registry alone tells who let a model serve, when and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from prefect.input import RunInput
from pydantic import BaseModel, Field, create_model

# How often a paused run asks the server whether it was resumed (Prefect's default is 10 s).
APPROVAL_POLL_S = 5
APPROVAL_TAG_PREFIX = "vitrail.approval"
REPORT_ARTIFACT_KEY = "approval-request"


class ApprovalPolicy(BaseModel):
    """Whether a person must approve before an alias moves, and what happens when nobody answers in time."""

    required: bool = Field(False, description="Pause for a reviewer's approval in the Prefect UI before any alias "
                                              "moves (the gate's report is shown above the form)")
    timeout_s: int = Field(86400, ge=1, le=30 * 86400,
                           description="Seconds to wait for the reviewer (1 s to 30 days)")
    on_timeout: Literal["refuse", "fail"] = Field(
        "refuse", description="When nobody answers in time the aliases never move; 'refuse' records the timeout "
                              "and finishes the run, 'fail' records it and fails the run")


class ReviewInput(RunInput):
    """The reviewer's answer."""

    approve: bool = Field(False, description="Tick to approve; leave unticked to refuse")
    reviewer: str = Field(..., min_length=1, max_length=200, pattern=r"\S",
                          description="Who decides (name or e-mail); recorded on the model versions")
    comment: str = Field("", max_length=2000, description="Why; recorded on the model versions")


class ApprovalInput(ReviewInput):
    """The reviewer's answer to a promotion: approve, which alias, who and why."""

    alias: Literal["champion", "challenger"] = Field(
        ..., description="Alias the approved versions get (the gate's suggestion is preselected)")


class ApprovalTimeout(RuntimeError):
    """Nobody answered within the policy's timeout and the policy says to fail the run."""


@dataclass(frozen=True)
class ApprovalOutcome:
    """What the reviewer decided: ``approved``, ``refused``, ``timed-out``, ``not-required`` (no pause), or
    ``superseded`` (approved, but the registry changed while the run waited, so nothing moved)."""

    status: Literal["approved", "refused", "timed-out", "not-required", "superseded"]
    alias: str | None = None
    reviewer: str = ""
    comment: str = ""
    at: str = ""

    @property
    def approved(self) -> bool:
        return self.status in ("approved", "not-required")

    def as_tags(self, prefix: str = APPROVAL_TAG_PREFIX) -> dict[str, str]:
        """Model-version tags; the comment is cut to MLflow's 5000-character tag limit."""
        tags = {f"{prefix}.status": self.status, f"{prefix}.at": self.at}
        if self.status in ("approved", "refused", "superseded"):
            tags.update({f"{prefix}.reviewer": self.reviewer, f"{prefix}.comment": self.comment[:5000]})
        if self.alias:
            tags[f"{prefix}.alias"] = self.alias
        return tags


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (what every Vitrail registry tag records)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def outcome_from_answer(answer: ReviewInput | None, alias: str | None = None) -> ApprovalOutcome:
    """The outcome of a reviewer's answer (``None``: nobody answered in time).

    ``alias`` is the alias at stake when the form has no alias field (a rollback always moves ``champion``).
    """
    if answer is None:
        return ApprovalOutcome("timed-out", at=utc_now())
    chosen = getattr(answer, "alias", alias)
    return ApprovalOutcome("approved" if answer.approve else "refused", chosen if answer.approve else None,
                           answer.reviewer.strip(), answer.comment, utc_now())


def review_form(form: type[ReviewInput], report: str, **defaults: object) -> type[ReviewInput]:
    """``form`` with ``report`` (markdown) shown above it in the UI and some fields preselected.

    Prefect's ``RunInput.with_initial_data`` rebuilds each field from its annotation alone, which drops the
    description and constraints the server validates against; this keeps each field's ``Field`` and only
    replaces its default.
    """
    fields = {}
    for name, value in defaults.items():
        info = form.model_fields[name]
        fields[name] = (info.annotation, Field(value, description=info.description))
    model = create_model(form.__name__, __base__=form, **fields)
    model._description = report
    return model


def request_review(policy: ApprovalPolicy, form: type[ReviewInput], report: str, key: str,
                   defaults: dict[str, object] | None = None, alias_at_stake: str | None = None) -> ApprovalOutcome:
    """Pause the current flow run until a reviewer answers ``form`` (or ``policy.timeout_s`` passes).

    Call it from a flow body, not a task: Prefect pauses flow runs only. The report also goes to the run as a
    markdown artifact, so it stays readable after the answer. ``key`` names the pause, so a run that pauses
    twice keeps each answer apart. ``defaults`` preselect form fields; ``alias_at_stake`` is the alias a form
    without an alias field decides on. A timeout is an outcome (``timed-out``), never an exception here: the
    caller records it first, then :func:`fail_on_timeout` applies the policy.
    """
    from prefect.artifacts import create_markdown_artifact
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    create_markdown_artifact(markdown=report, key=REPORT_ARTIFACT_KEY,
                             description="What the reviewer is asked to approve")
    try:
        answer = pause_flow_run(wait_for_input=review_form(form, report, **(defaults or {})), timeout=policy.timeout_s,
                                poll_interval=APPROVAL_POLL_S, key=key)
    except FlowPauseTimeout:
        answer = None
        _resume_after_timeout()
    return outcome_from_answer(answer, alias_at_stake)


def _resume_after_timeout() -> None:
    """Put the run back to Running after an unanswered pause, so it can record the timeout and finish.

    Prefect leaves a run whose pause timed out in the Paused state and then refuses its Completed state
    ("The flow was completed and never resumed"); the timeout is an answer here, so the run carries on.
    """
    from prefect import get_client
    from prefect.runtime import flow_run
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Running(message="approval timed out: aliases left unchanged"),
                                  force=True)


def fail_on_timeout(policy: ApprovalPolicy, outcome: ApprovalOutcome, what: str) -> None:
    """Raise :class:`ApprovalTimeout` when nobody answered and the policy says to fail (call after recording)."""
    if outcome.status == "timed-out" and policy.on_timeout == "fail":
        raise ApprovalTimeout(f"{what}: no reviewer answered within {policy.timeout_s} s; aliases left unchanged "
                              "(approval.on_timeout=fail)")
