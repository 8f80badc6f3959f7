"""The state an approval's events fold into, and the audit entries they make."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from agents.approval import hold_plan, settle
from app.worker.audit import audit_entry
from schemas.events import ApprovalSubmittedPayload, ExceptionApprovalSubmitted
from schemas.state import ExceptionRecord, apply
from tests import factories


def _submission(action: str, at: Any, by: str = "ops-alice") -> ExceptionApprovalSubmitted:
    event_id = uuid.uuid4()
    return ExceptionApprovalSubmitted(
        event_id=event_id,
        tenant_id="acme",
        exception_id=factories.EXCEPTION_ID,
        sequence=1,
        occurred_at=at,
        causation_id=None,
        correlation_id=event_id,
        payload=ApprovalSubmittedPayload(
            action=action,  # type: ignore[arg-type]
            stage="tool",
            requested_by=by,
            role="operator",
            reason="ok",
        ),
    )


def _fold(*events: Any) -> ExceptionRecord:
    record = None
    for event in events:
        record = apply(record, event) or record
    assert record is not None
    return record


def _held() -> tuple[Any, Any]:
    step = factories.make_step("escalate", action="escalate", requires_approval=True)
    plan = factories.planned(steps=[step])
    return plan, hold_plan(plan, factories.NOW)


def test_a_held_plan_awaits_approval_until_a_decision_and_then_resolves() -> None:
    plan, held = _held()
    approve = _submission("approve", factories.NOW + timedelta(minutes=5))
    approved = settle(approve, held.hold, factories.NOW + timedelta(minutes=5)).result

    waiting = _fold(factories.ingested(), plan, held.note)
    assert waiting.state.status == "awaiting_approval"
    assert waiting.state.approval is not None and waiting.state.approval["stage"] == "tool"

    done = _fold(factories.ingested(), plan, held.note, approve, approved)
    assert done.state.status == "in_progress"
    assert done.state.approval["decision"] == "approved"  # type: ignore[index]
    assert done.state.approval["decided_by"] == "ops-alice"  # type: ignore[index]


def test_rejected_and_expired_are_final_statuses() -> None:
    plan, held = _held()
    later = factories.NOW + timedelta(days=2)
    rejected = settle(_submission("reject", later), held.hold, later).result
    expired = settle(_submission("expire", later, by="sluice"), held.hold, later).result

    assert _fold(factories.ingested(), plan, held.note, rejected).state.status == "rejected"
    assert _fold(factories.ingested(), plan, held.note, expired).state.status == "approval_expired"


def test_audit_entries_name_the_actor_the_role_and_the_reason_but_not_the_timer() -> None:
    _plan, held = _held()
    later = factories.NOW + timedelta(days=2)
    approve = _submission("approve", later)
    approved = settle(approve, held.hold, later)
    refused = settle(_submission("reject", later, by="ops-bob"), approved.hold, later).result
    expired = settle(_submission("expire", later, by="sluice"), held.hold, later).result

    entry = audit_entry(approved.result)
    assert entry is not None
    assert (entry["actor"], entry["role"], entry["action"], entry["outcome"]) == (
        "ops-alice",
        "operator",
        "approve",
        "approved",
    )
    refusal = audit_entry(refused)
    assert refusal is not None and refusal["outcome"].startswith("refused: it was already approved")
    assert audit_entry(expired) is None
    assert audit_entry(approve) is None  # the request; the stage's answer is the action
