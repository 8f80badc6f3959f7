"""Holding an exception for approval, and the decisions about it, through the real playbook and
tool handlers on in-memory ports."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from agents.approval import Hold
from app.worker.approvals import Approvals, ExpiryTimer
from app.worker.registry import PLAYBOOK, TOOL
from app.worker.runner import StageRunner
from schemas.events import (
    ApprovalSubmittedPayload,
    Decision,
    EventBase,
    ExceptionApprovalExpired,
    ExceptionApprovalRefused,
    ExceptionApprovalRequested,
    ExceptionApprovalSubmitted,
    ExceptionApproved,
    ExceptionCompleted,
    ExceptionPlanned,
    ExceptionRejected,
    PlannedStep,
)
from tests import factories
from tests.unit.worker.conftest import Rig, acme_handlers


class Recording:
    """A tool that records each call's idempotency key."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.keys: list[str] = []

    async def call(self, step: PlannedStep, idempotency_key: str, event: Any) -> dict[str, Any]:
        self.keys.append(idempotency_key)
        return {"ok": True}


@pytest.fixture
def tools() -> dict[str, Any]:
    return {name: Recording(name) for name in ("ticket", "notify", "webhook")}


def submitted(
    exception_id: str, action: str, stage: str, by: str = "ops-alice", at: Any = None
) -> ExceptionApprovalSubmitted:
    event_id = uuid.uuid4()
    return ExceptionApprovalSubmitted(
        event_id=event_id,
        tenant_id="acme",
        exception_id=exception_id,
        sequence=1,
        occurred_at=at or factories.NOW,
        causation_id=None,
        correlation_id=event_id,
        payload=ApprovalSubmittedPayload(
            action=action,  # type: ignore[arg-type]
            stage=stage,  # type: ignore[arg-type]
            requested_by=by,
            role="operator",
            reason="checked with the customer",
        ),
    )


def ops(rig: Rig, cls: type[EventBase]) -> list[Any]:
    return [e for e in rig.events_to("operations") if isinstance(e, cls)]


def held_decision(exception_id: str = "exc-1") -> EventBase:
    report = factories.make_report(source="payments", message="Card declined for order 42")
    return factories.decided(
        factories.make_context(report, category="payments"),
        decision=Decision.awaiting_approval,
        policy_id="big-refunds",
        reason="Policy 'big-refunds' requires a human approval before any action runs.",
        exception_id=exception_id,
    )


async def test_policy_hold_waits_at_the_playbook_and_an_approval_plans_it(
    rig: Rig, tools: dict[str, Any]
) -> None:
    approvals: dict[str, bytes] = {}
    decided_holds: dict[str, bytes] = {}
    handlers = acme_handlers(rig, tools, approvals=approvals, decided=decided_holds)
    runner = rig.runner(handlers.playbook, PLAYBOOK)
    decided = held_decision()

    await runner.process([rig.item(decided, stage=PLAYBOOK)], 0)

    assert rig.events_to("planned") == []  # nothing runs before a person says so
    [requested] = ops(rig, ExceptionApprovalRequested)
    assert requested.payload.stage == "playbook"
    assert requested.payload.policy_id == "big-refunds"
    assert requested.payload.playbook_id == "payments"
    steps = [(s.tool, s.action) for s in requested.payload.steps]
    assert steps == [("ticket", "create"), ("notify", "page"), ("webhook", "retry-payment")]
    assert requested.payload.steps[0].params == {"queue": "payments", "ref": "exc-1"}  # rendered
    hold = Approvals(approvals).get("exc-1")
    assert hold is not None and hold.pending
    assert (hold.requested.expires_at - hold.requested.requested_at).total_seconds() == 86400

    approve = submitted("exc-1", "approve", "playbook")
    await runner.process([rig.item(approve, stage=PLAYBOOK)], 0)

    [approved] = ops(rig, ExceptionApproved)
    assert approved.payload.decided_by == "ops-alice" and approved.payload.role == "operator"
    assert approved.causation_id == approve.event_id
    [plan] = rig.events_to("planned")
    assert isinstance(plan, ExceptionPlanned)
    assert plan.causation_id == approved.event_id
    assert not plan.payload.awaiting_approval
    assert [s.step_id for s in plan.payload.steps] == ["open-ticket", "page-oncall", "callback"]
    # the decided hold leaves the pending table (what the list and the timer read) and is kept
    # in the expiring one, for a redelivery of this decision
    assert "exc-1" not in approvals
    kept = Approvals(approvals, decided_holds).get("exc-1")
    assert kept is not None and kept.decided_by == str(approve.event_id)

    # A second decision, even one that came at the same moment, is refused: the first one won.
    late = submitted("exc-1", "reject", "playbook", by="ops-bob")
    await runner.process([rig.item(late, stage=PLAYBOOK)], 0)
    [refused] = ops(rig, ExceptionApprovalRefused)
    assert refused.causation_id == late.event_id
    assert refused.payload.refused_because == "it was already approved by ops-alice"
    assert len(rig.events_to("planned")) == 1


async def test_a_decision_delivered_again_after_a_crash_gives_the_same_outputs(
    rig: Rig, tools: dict[str, Any]
) -> None:
    approvals: dict[str, bytes] = {}
    runner = rig.runner(acme_handlers(rig, tools, approvals=approvals).playbook, PLAYBOOK)
    await runner.process([rig.item(held_decision(), stage=PLAYBOOK)], 0)
    approve = submitted("exc-1", "approve", "playbook")
    await runner.process([rig.item(approve, stage=PLAYBOOK)], 0)
    first = [e.event_id for e in rig.events_to("planned")]

    rig.processed.clear()  # the crash came after the hold was written, before the mark
    await runner.process([rig.item(approve, stage=PLAYBOOK)], 0)

    assert ops(rig, ExceptionApprovalRefused) == []
    assert [e.event_id for e in rig.events_to("planned")] == first * 2  # the same plan again


async def test_a_plan_step_that_needs_approval_holds_the_plan_at_the_tool_stage(
    rig: Rig, tools: dict[str, Any]
) -> None:
    approvals: dict[str, bytes] = {}
    runner = rig.runner(acme_handlers(rig, tools, approvals=approvals).tool, TOOL)
    step = factories.make_step("escalate", action="escalate", requires_approval=True)
    plan = factories.planned(steps=[step], exception_id="exc-2", playbook_id="approvals")

    await runner.process([rig.item(plan, stage=TOOL)], 0)

    assert tools["ticket"].keys == []
    [requested] = ops(rig, ExceptionApprovalRequested)
    assert requested.payload.stage == "tool"
    assert "ticket.escalate" in requested.payload.reason

    approve = submitted("exc-2", "approve", "tool")
    await runner.process([rig.item(approve, stage=TOOL)], 0)

    # the step runs once, with the idempotency key the held plan gave it
    assert tools["ticket"].keys == [f"exc-2:{plan.event_id}:escalate"]
    [done] = rig.events_to("completed")
    assert isinstance(done, ExceptionCompleted) and done.payload.outcome == "resolved"
    [approved] = ops(rig, ExceptionApproved)
    assert done.causation_id == approved.event_id


async def test_a_rejected_plan_runs_nothing(rig: Rig, tools: dict[str, Any]) -> None:
    runner = rig.runner(acme_handlers(rig, tools).tool, TOOL)
    step = factories.make_step("escalate", action="escalate", requires_approval=True)
    await runner.process([rig.item(factories.planned(steps=[step]), stage=TOOL)], 0)

    await runner.process([rig.item(submitted("exc-0001", "reject", "tool"), stage=TOOL)], 0)

    assert tools["ticket"].keys == []
    assert rig.events_to("completed") == []
    [rejected] = ops(rig, ExceptionRejected)
    assert rejected.payload.reason == "checked with the customer"


async def test_a_decision_for_nothing_held_is_refused(rig: Rig, tools: dict[str, Any]) -> None:
    runner = rig.runner(acme_handlers(rig, tools).tool, TOOL)

    await runner.process([rig.item(submitted("exc-9", "approve", "tool"), stage=TOOL)], 0)

    [refused] = ops(rig, ExceptionApprovalRefused)
    assert refused.payload.refused_because == "nothing is held for approval at the tool stage"


async def test_the_timer_expires_a_hold_past_its_deadline_once(
    rig: Rig, tools: dict[str, Any]
) -> None:
    approvals: dict[str, bytes] = {}
    runner = rig.runner(acme_handlers(rig, tools, approvals=approvals).playbook, PLAYBOOK)
    await runner.process([rig.item(held_decision(), stage=PLAYBOOK)], 0)
    timer = ExpiryTimer(Approvals(approvals), rig.producer, rig.topics, rig.clock, resend_seconds=0)

    assert await timer.tick() == 0  # not due yet
    rig.clock.advance(86400)
    assert await timer.tick() == 1
    assert await timer.tick() == 1  # sent again (resend_seconds=0): the same decision
    sent = [s for s in rig.producer.to("t.decided")]
    assert len(sent) == 2 and sent[0].value == sent[1].value and sent[0].key == b"exc-1"

    for record in sent:  # both copies reach the stage; the idempotency table keeps one
        await runner.process([rig.item(record.value or b"", key=record.key, stage=PLAYBOOK)], 0)

    [expired] = ops(rig, ExceptionApprovalExpired)
    assert expired.payload.decided_by == "sluice" and expired.payload.action == "expire"
    assert rig.events_to("planned") == []
    assert await timer.tick() == 0  # nothing pending any more

    # an operator who comes too late is told so
    await runner.process([rig.item(submitted("exc-1", "approve", "playbook"), stage=PLAYBOOK)], 0)
    [refused] = ops(rig, ExceptionApprovalRefused)
    assert refused.payload.refused_because == "it was already expired"


async def test_an_expiry_that_is_not_due_is_refused(rig: Rig, tools: dict[str, Any]) -> None:
    approvals: dict[str, bytes] = {}
    runner: StageRunner = rig.runner(
        acme_handlers(rig, tools, approvals=approvals).playbook, PLAYBOOK
    )
    await runner.process([rig.item(held_decision(), stage=PLAYBOOK)], 0)

    early = submitted("exc-1", "expire", "playbook", by="sluice")
    await runner.process([rig.item(early, stage=PLAYBOOK)], 0)

    assert ops(rig, ExceptionApprovalExpired) == []
    [refused] = ops(rig, ExceptionApprovalRefused)
    assert (refused.payload.refused_because or "").startswith("its approval does not expire before")
    hold = Approvals(approvals).get("exc-1")
    assert isinstance(hold, Hold) and hold.pending
