"""Rollback: move ``champion`` back to an earlier version pair on the reference and edge models together.

A plan is read from the registry (pure, no change), shown to a reviewer when approval is required, and applied
under the model's promotion lock with :func:`tasks.promotion.set_alias_pair`, so a rollback and a promotion never
interleave and a crash half-way is completed by the next promotion like any other alias move.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NONE

from tasks.promotion import CHAMPION_SINCE_TAG, TWIN_NAME_TAG, TWIN_VERSION_TAG, promotion_lock, set_alias_pair
from tasks.request_errors import RequestError

# On the retired pair: when it was rolled back, and to which version. A version rolled back from after it last
# became champion is never picked as a rollback target by default (it was retired for a reason).
ROLLED_BACK_AT_TAG = "vitrail.rolled_back_at"
ROLLED_BACK_TO_TAG = "vitrail.rolled_back_to"
ROLLBACK_TAG_PREFIX = "vitrail.rollback"
ROLLBACK_APPROVAL_PREFIX = "vitrail.rollback_approval"


@dataclass(frozen=True)
class RollbackPlan:
    """Which champion pair is retired and which earlier pair takes its place."""

    names: tuple[str, str]
    current: tuple[str, str]
    target: tuple[str, str]
    target_since: str

    def describe(self) -> str:
        return (f"champion of {self.names[0]} + {self.names[1]}: versions {self.current[0]} + {self.current[1]} -> "
                f"{self.target[0]} + {self.target[1]} (champion since {self.target_since or 'never'})")


def model_pair(name: str) -> tuple[str, str]:
    """(reference, edge) names for either one: ``<domain>-<task>`` and ``<domain>-<task>-edge``."""
    name = name.strip()
    if not name:
        raise RequestError("rollback: no registered model name given")
    return (name.removesuffix("-edge"), name) if name.endswith("-edge") else (name, f"{name}-edge")


def _versions(name: str) -> dict[str, dict[str, str]]:
    from tasks import tracking

    return tracking.model_versions(name)


def _twin(name: str, version: str, tags: dict[str, str], other: str) -> str:
    if tags.get(TWIN_NAME_TAG) != other or not tags.get(TWIN_VERSION_TAG):
        raise RequestError(f"{name} version {version} has no twin on {other} (it was not registered by the promote "
                           "stage), so champion cannot move on both models together; pick a promoted version")
    return tags[TWIN_VERSION_TAG]


def plan_rollback(model: str, to_version: str | None = None) -> RollbackPlan:
    """The rollback of ``model``'s champion: to ``to_version`` (of the model named), else to the previous champion.

    The previous champion is the version pair that most recently became champion, other than the current one,
    and not rolled back from since. Only versions that passed the gate may become champion again.

    Raises:
        RequestError: no champion now, an unknown or untwinned version, a version that failed the gate, the
            current champion itself, or no earlier champion recorded (then name one with ``to_version``).
    """
    from tasks import tracking

    names = model_pair(model)
    side = 1 if model.strip().endswith("-edge") else 0
    holders = [tracking.alias_holder(name, "champion") for name in names]
    if holders[0] is None or holders[1] is None:
        raise RequestError(f"rollback: {names[0]} and {names[1]} have no champion pair to roll back "
                           f"({names[0]}@champion: {holders[0][0] if holders[0] else 'unset'}, "
                           f"{names[1]}@champion: {holders[1][0] if holders[1] else 'unset'})")
    current = (holders[0][0], holders[1][0])
    versions = _versions(names[0])
    if to_version is not None:
        chosen = str(to_version).strip()
        if side == 1:  # an edge version was named: find the reference version registered with it
            edge_tags = _versions(names[1]).get(chosen)
            if edge_tags is None:
                raise RequestError(f"rollback: {names[1]} has no version {chosen}")
            chosen = _twin(names[1], chosen, edge_tags, names[0])
        if chosen not in versions:
            raise RequestError(f"rollback: {names[0]} has no version {chosen} (versions: {sorted(versions, key=int)})")
    else:
        earlier = [(tags.get(CHAMPION_SINCE_TAG, ""), version) for version, tags in versions.items()
                   if version != current[0] and tags.get(CHAMPION_SINCE_TAG)
                   and tags.get(ROLLED_BACK_AT_TAG, "") <= tags[CHAMPION_SINCE_TAG]]
        if not earlier:
            raise RequestError(f"rollback: no earlier champion of {names[0]} is recorded (tag {CHAMPION_SINCE_TAG}); "
                               "name the version to restore with --to VERSION")
        chosen = max(earlier)[1]
    tags = versions[chosen]
    if chosen == current[0]:
        raise RequestError(f"rollback: {names[0]} version {chosen} is already the champion")
    if tags.get("vitrail.gate") != "passed":
        raise RequestError(f"rollback: {names[0]} version {chosen} did not pass the promotion gate "
                           f"(vitrail.gate={tags.get('vitrail.gate', 'unset')}); only gated versions may serve")
    target = (chosen, _twin(names[0], chosen, tags, names[1]))
    return RollbackPlan(names, current, target, tags.get(CHAMPION_SINCE_TAG, ""))


def rollback_report(plan: RollbackPlan, reason: str) -> str:
    """The markdown a reviewer reads above the rollback form: both pairs and their gate results."""
    from tasks import tracking

    lines = [f"### Roll back the champion of `{plan.names[0]}` + `{plan.names[1]}`?", "",
             f"- serving now: versions {plan.current[0]} + {plan.current[1]}",
             f"- to restore: versions {plan.target[0]} + {plan.target[1]} "
             f"(champion since {plan.target_since or 'never'})",
             f"- reason given: {reason or 'none'}"]
    for label, version in (("to restore", plan.target[1]), ("serving now", plan.current[1])):
        gate = tracking.model_version(plan.names[1], version).tags.get("vitrail.gate_reasons", "none recorded")
        lines += ["", f"Gate results of the edge version {label} ({version}):", ""]
        lines += [f"- {line}" for line in gate.split("; ")]
    lines += ["", "Approve to move champion on both models; refuse to leave it where it is."]
    return "\n".join(lines)


def apply_rollback(plan: RollbackPlan, by: str, reason: str, approval_tags: dict[str, str]) -> RollbackPlan:
    """Move ``champion`` to the plan's target pair and tag both pairs; call it under the promotion lock.

    Refuses when the champion moved since the plan was made (a promotion or another rollback won meanwhile):
    the reviewer approved a move from a champion that no longer serves.
    """
    from tasks import tracking
    from tasks.approval import utc_now

    now = tuple((tracking.alias_holder(name, "champion") or ("unset",))[0] for name in plan.names)
    if now != plan.current:
        raise RequestError(f"rollback: the champion changed while waiting ({plan.current[0]} + {plan.current[1]} -> "
                           f"{now[0]} + {now[1]}); nothing moved, run the rollback again")
    at = utc_now()
    restored = {f"{ROLLBACK_TAG_PREFIX}.restored_at": at, f"{ROLLBACK_TAG_PREFIX}.replaced_version": plan.current[0],
                f"{ROLLBACK_TAG_PREFIX}.by": by, f"{ROLLBACK_TAG_PREFIX}.reason": reason[:5000], **approval_tags}
    retired = {ROLLED_BACK_AT_TAG: at, ROLLED_BACK_TO_TAG: plan.target[0]}
    for name, version in zip(plan.names, plan.current):
        tracking.tag_version(name, version, retired)
    for name, version in zip(plan.names, plan.target):
        tracking.tag_version(name, version, restored)
    set_alias_pair(plan.names, plan.target, "champion")
    return plan


def review_rollback(policy, plan: RollbackPlan, reason: str):
    """Pause for a reviewer when ``policy`` (:class:`tasks.approval.ApprovalPolicy`) asks; else ``not-required``.

    Runs in the flow body (Prefect pauses flow runs, not tasks). The form has no alias field: a rollback only
    ever moves ``champion``.
    """
    from tasks.approval import ApprovalOutcome, ReviewInput, request_review

    if not policy.required:
        return ApprovalOutcome("not-required")
    return request_review(policy, ReviewInput, rollback_report(plan, reason), key=f"rollback-{plan.names[1]}-"
                          f"{plan.current[1]}-to-{plan.target[1]}", alias_at_stake="champion")


def settle_rollback(plan: RollbackPlan, outcome, requested_by: str, reason: str) -> bool:
    """Apply the plan if ``outcome`` allows it (under the promotion lock), else record the refusal on the pair
    it would have restored; return whether champion moved."""
    from tasks import tracking

    approval = outcome.as_tags(ROLLBACK_APPROVAL_PREFIX) if outcome.status != "not-required" else {}
    if not outcome.approved:
        for name, version in zip(plan.names, plan.target):
            tracking.tag_version(name, version, approval)
        return False
    with promotion_lock(plan.names[1]):
        apply_rollback(plan, outcome.reviewer or requested_by, reason, approval)
    return True


plan_rollback_task = task(plan_rollback, name="plan-rollback", cache_policy=NONE)
settle_rollback_task = task(settle_rollback, name="settle-rollback", cache_policy=NONE)
