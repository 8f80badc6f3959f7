"""Approvals: holding an exception for a person's decision, and applying that decision.

Two stages can hold an exception. The playbook stage holds a decision that policy marked
``awaiting_approval`` (every action needs approval): it plans it as approved would let it run and
shows that plan. The tool stage holds a plan with a step that needs approval. Either way the stage
keeps a :class:`Hold` and announces it with ``ExceptionApprovalRequested`` (what is held, why, until
when). A decision arrives as ``ExceptionApprovalSubmitted`` on the holding stage's own input topic,
keyed by the exception, so it is ordered with the stage's events: :func:`settle` turns it into
``ExceptionApproved``, ``ExceptionRejected`` or ``ExceptionApprovalExpired``, or, when nothing is
held any more (another decision won, or the timer ran out), ``ExceptionApprovalRefused``.

Everything here is pure: the worker stores the hold and sends what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from schemas.config import DEFAULT_APPROVAL_TIMEOUT_SECONDS
from schemas.events import (
    ApprovalDecisionPayload,
    ApprovalRequestedPayload,
    ApprovalSubmittedPayload,
    EventBase,
    ExceptionApprovalExpired,
    ExceptionApprovalRefused,
    ExceptionApprovalRequested,
    ExceptionApprovalSubmitted,
    ExceptionApproved,
    ExceptionDecided,
    ExceptionPlanned,
    ExceptionRejected,
    derive_event_id,
    follow,
)

HoldStage = Literal["playbook", "tool"]

_RESULT: dict[str, type[ExceptionApproved | ExceptionRejected | ExceptionApprovalExpired]] = {
    "approve": ExceptionApproved,
    "reject": ExceptionRejected,
    "expire": ExceptionApprovalExpired,
}


class Hold(BaseModel):
    """What a stage keeps while an exception waits: the held event, what would run, and whether
    (and by which submission) it was decided. A decided hold is kept, so that a decision delivered
    again after a crash gives the same outputs instead of a refusal."""

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    exception_id: str
    stage: HoldStage
    requested: ApprovalRequestedPayload
    held: dict[str, Any]  # the held ExceptionDecided or ExceptionPlanned, as JSON
    plan: dict[str, Any]  # the ExceptionPlanned that runs once approved, as JSON
    decided_by: str | None = None  # the submission event id that decided it
    decided_action: str | None = None
    decided_actor: str | None = None

    @property
    def pending(self) -> bool:
        return self.decided_by is None

    def runnable_plan(self) -> ExceptionPlanned:
        """The plan as approved lets it run (no step waits for approval any more)."""
        planned = ExceptionPlanned.model_validate(self.plan)
        steps = tuple(
            s.model_copy(update={"requires_approval": False}) for s in planned.payload.steps
        )
        payload = planned.payload.model_copy(update={"awaiting_approval": False, "steps": steps})
        return planned.model_copy(update={"payload": payload})


def _requested(
    stage: HoldStage,
    held: EventBase,
    plan: ExceptionPlanned,
    decided: ExceptionDecided | None,
    now: datetime,
) -> ExceptionApprovalRequested:
    context = plan.payload.context
    timeout = plan.payload.approval_timeout_seconds or DEFAULT_APPROVAL_TIMEOUT_SECONDS
    if decided is not None:
        policy_id, reason = decided.payload.policy_id, decided.payload.reason
    else:
        policy_id = plan.payload.policy_id or "default"
        needing = ", ".join(
            f"{s.tool}.{s.action}" for s in plan.payload.steps if s.requires_approval
        )
        reason = (
            f"Policy {policy_id!r} requires approval for {needing} "
            f"(playbook {plan.payload.playbook_id!r})."
        )
    payload = ApprovalRequestedPayload(
        stage=stage,
        held_event_id=held.event_id,
        policy_id=policy_id,
        reason=reason,
        severity=context.severity,
        category=context.category,
        playbook_id=plan.payload.playbook_id,
        steps=plan.payload.steps,
        requested_at=now,
        expires_at=now + timedelta(seconds=timeout),
    )
    return follow(held, ExceptionApprovalRequested, f"{stage}:approval", payload, now)


@dataclass(frozen=True)
class Held:
    hold: Hold
    note: ExceptionApprovalRequested


def hold_decision(
    decided: ExceptionDecided, approved_plan: ExceptionPlanned, now: datetime
) -> Held:
    """Hold a decision that policy sent for approval; ``approved_plan`` is what then runs."""
    note = _requested("playbook", decided, approved_plan, decided, now)
    return Held(_hold("playbook", decided, approved_plan, note), note)


def hold_plan(planned: ExceptionPlanned, now: datetime) -> Held:
    """Hold a plan with steps that need approval."""
    note = _requested("tool", planned, planned, None, now)
    return Held(_hold("tool", planned, planned, note), note)


def _hold(
    stage: HoldStage, held: EventBase, plan: ExceptionPlanned, note: ExceptionApprovalRequested
) -> Hold:
    return Hold(
        tenant_id=held.tenant_id,
        exception_id=held.exception_id,
        stage=stage,
        requested=note.payload,
        held=held.model_dump(mode="json"),
        plan=plan.model_dump(mode="json"),
    )


@dataclass(frozen=True)
class Settled:
    """What a submitted decision comes to: the event to record, the hold to keep (None: leave it
    as it is), and whether the held work may now run."""

    result: (
        ExceptionApproved | ExceptionRejected | ExceptionApprovalExpired | ExceptionApprovalRefused
    )
    hold: Hold | None
    run: bool


def expiry(hold: Hold, now: datetime) -> ExceptionApprovalSubmitted:
    """The timer's decision for a hold past its ``expires_at``. Its event id comes from the held
    event, so however often a timer sends it, the stage's idempotency table keeps one."""
    held_id = hold.requested.held_event_id
    event_id = derive_event_id(held_id, "approval:expire")
    timeout = (hold.requested.expires_at - hold.requested.requested_at).total_seconds()
    return ExceptionApprovalSubmitted(
        event_id=event_id,
        tenant_id=hold.tenant_id,
        exception_id=hold.exception_id,
        sequence=1,
        occurred_at=max(now, hold.requested.expires_at),
        causation_id=held_id,
        correlation_id=event_id,
        payload=ApprovalSubmittedPayload(
            action="expire",
            stage=hold.stage,
            requested_by="sluice",
            role="system",
            reason=f"No decision within {int(timeout)} s of the request.",
        ),
    )


def settle(submission: ExceptionApprovalSubmitted, hold: Hold | None, now: datetime) -> Settled:
    """Apply ``submission`` to the stage's ``hold`` of its exception."""
    request = submission.payload
    sid = str(submission.event_id)

    def payload(refused_because: str | None = None) -> ApprovalDecisionPayload:
        return ApprovalDecisionPayload(
            stage=request.stage,
            action=request.action,
            decided_by=request.requested_by,
            role=request.role,
            reason=request.reason,
            submitted_event_id=submission.event_id,
            held_event_id=hold.requested.held_event_id if hold else None,
            requested_at=hold.requested.requested_at if hold else None,
            refused_because=refused_because,
        )

    def refused(because: str) -> Settled:
        note = follow(
            submission, ExceptionApprovalRefused, f"{request.stage}:refused", payload(because), now
        )
        return Settled(note, None, False)

    if hold is None or hold.stage != request.stage:
        return refused(f"nothing is held for approval at the {request.stage} stage")
    if hold.decided_by is not None and hold.decided_by != sid:
        past = {"approve": "approved", "reject": "rejected", "expire": "expired"}
        verb = past.get(hold.decided_action or "", "decided")
        by = f" by {hold.decided_actor}" if hold.decided_action != "expire" else ""
        return refused(f"it was already {verb}{by}")
    if request.action == "expire" and submission.occurred_at < hold.requested.expires_at:
        return refused(
            f"its approval does not expire before {hold.requested.expires_at.isoformat()}"
        )
    result_cls = _RESULT[request.action]
    result = follow(submission, result_cls, f"{request.stage}:{request.action}", payload(), now)
    decided = hold.model_copy(
        update={
            "decided_by": sid,
            "decided_action": request.action,
            "decided_actor": request.requested_by,
        }
    )
    return Settled(result, decided, request.action == "approve")
