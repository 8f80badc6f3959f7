"""The current state of an exception: a fold of its events (the projection's pure core).

The projection consumes several topics, and Kafka orders records only within one partition of one
topic, so the events of an exception can reach it out of causal order. :func:`add_event` therefore keeps
the history sorted (chains in order of first appearance, each chain by sequence) and drops an event id it
already holds, and :func:`fold` recomputes the state from the sorted history. Both are idempotent: the
same event applied twice, or in another order, gives the same state.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import (
    STAGE_OF_EVENT,
    Decision,
    Event,
    ExceptionAccepted,
    ExceptionApprovalExpired,
    ExceptionApprovalRequested,
    ExceptionApproved,
    ExceptionCompleted,
    ExceptionDeadLettered,
    ExceptionDecided,
    ExceptionIngested,
    ExceptionParked,
    ExceptionPlanned,
    ExceptionQuarantineLifted,
    ExceptionRejected,
    ExceptionTriaged,
    Severity,
    Stage,
    StepResult,
)

# The values ExceptionState.status takes (see fold).
ExceptionStatus = Literal[
    "received",
    "in_progress",
    "suppressed",
    "awaiting_approval",
    "resolved",
    "failed",
    "no_action",
    "dead_lettered",
    "discarded",
    "rejected",
    "approval_expired",
]


class HistoryEntry(BaseModel):
    """One event in an exception's history, as stored and as served by the API."""

    model_config = ConfigDict(frozen=True)

    event_id: uuid.UUID
    event_type: str
    sequence: int
    occurred_at: AwareDatetime
    causation_id: uuid.UUID | None
    correlation_id: uuid.UUID
    payload: dict[str, Any]


class ExceptionState(BaseModel):
    """What the API answers for GET /v1/exceptions/{id}."""

    model_config = ConfigDict(frozen=True)

    exception_id: str
    tenant_id: str
    stage: Stage = Field(description="The last stage the exception has passed.")
    status: ExceptionStatus
    source: str | None = None
    error_type: str | None = None
    message: str | None = None
    fingerprint: str | None = None
    is_repeat: bool | None = None
    severity: Severity | None = None
    category: str | None = None
    decision: Decision | None = None
    decision_reason: str | None = None
    playbook_id: str | None = None
    tool_results: tuple[StepResult, ...] = ()
    received_at: AwareDatetime
    updated_at: AwareDatetime
    completed_at: AwareDatetime | None = None
    event_count: int
    quarantine: dict[str, Any] | None = Field(
        default=None,
        description="Set while a stage holds the exception in quarantine after a dead letter: "
        "stage, error_class, message, entry_id, attempts.",
    )
    parked: int = Field(default=0, description="Events parked behind the dead letter.")
    approval: dict[str, Any] | None = Field(
        default=None,
        description="Set once a stage holds the exception for approval: stage, policy_id, reason, "
        "requested_at, expires_at, and once decided: decision, decided_by, role, decided_at.",
    )


class ExceptionRecord(BaseModel):
    """What the projection stores per exception: the folded state and the ordered history."""

    state: ExceptionState
    history: list[HistoryEntry]


def entry_of(event: Event) -> HistoryEntry:
    # Every field comes from a validated event, in the field's own type; validating them again
    # was the costliest line of the projection in a profile (performance.md, session 4).
    return HistoryEntry.model_construct(
        event_id=event.event_id,
        event_type=event.event_type,
        sequence=event.sequence,
        occurred_at=event.occurred_at,
        causation_id=event.causation_id,
        correlation_id=event.correlation_id,
        payload=event.payload.model_dump(mode="json"),
    )


def add_event(history: list[HistoryEntry], event: Event) -> list[HistoryEntry] | None:
    """The history with ``event`` in its place, or None when the history already holds it."""
    if any(h.event_id == event.event_id for h in history):
        return None
    entries = [*history, entry_of(event)]
    chain_rank: dict[uuid.UUID, int] = {}
    for h in entries:
        chain_rank.setdefault(h.correlation_id, len(chain_rank))
    # Stable sort: chains in order of first appearance, events of a chain by sequence.
    return sorted(entries, key=lambda h: (chain_rank[h.correlation_id], h.sequence))


_STAGE_ORDER = {stage: n for n, stage in enumerate(Stage)}


def fold(exception_id: str, tenant_id: str, history: list[HistoryEntry]) -> ExceptionState:
    """The state after every event of ``history`` (sorted as add_event keeps it)."""
    fields: dict[str, Any] = {
        "exception_id": exception_id,
        "tenant_id": tenant_id,
        "stage": Stage.ingested,
        "status": "received",
        "received_at": history[0].occurred_at,
        "updated_at": history[0].occurred_at,
        "event_count": len(history),
    }
    furthest = -1
    for h in history:
        fields["updated_at"] = max(fields["updated_at"], h.occurred_at)
        stage = STAGE_OF_EVENT.get(h.event_type)
        if stage is not None and _STAGE_ORDER[stage] >= furthest:
            furthest = _STAGE_ORDER[stage]
            fields["stage"] = stage
        p = h.payload
        if h.event_type == ExceptionIngested.__name__:
            report = p["report"]
            fields.update(
                source=report["source"], error_type=report["error_type"], message=report["message"]
            )
            fields["status"] = "received"
        elif h.event_type == ExceptionAccepted.__name__:
            fields.update(fingerprint=p["fingerprint"], is_repeat=p["is_repeat"])
            fields["status"] = "in_progress"
        elif h.event_type == ExceptionTriaged.__name__:
            fields.update(severity=p["severity"], category=p["category"])
        elif h.event_type == ExceptionDecided.__name__:
            fields.update(decision=p["decision"], decision_reason=p["reason"])
            if p["decision"] != Decision.proceed:
                fields["status"] = p["decision"]
        elif h.event_type == ExceptionPlanned.__name__:
            fields["playbook_id"] = p["playbook_id"]
            if p.get("awaiting_approval"):
                fields["status"] = "awaiting_approval"
        elif h.event_type == ExceptionCompleted.__name__:
            fields["tool_results"] = tuple(StepResult.model_validate(r) for r in p["results"])
            fields["status"] = p["outcome"]
            fields["completed_at"] = h.occurred_at
        elif h.event_type == ExceptionDeadLettered.__name__:
            fields["status"] = "dead_lettered"
            fields["quarantine"] = {
                k: p[k] for k in ("stage", "error_class", "message", "entry_id", "attempts")
            }
        elif h.event_type == ExceptionParked.__name__:
            fields["parked"] = fields.get("parked", 0) + 1
        elif h.event_type == ExceptionQuarantineLifted.__name__:
            fields["quarantine"] = None
            fields["parked"] = 0
            if fields["status"] == "dead_lettered":
                fields["status"] = "discarded" if p["action"] == "discard" else "in_progress"
        elif h.event_type == ExceptionApprovalRequested.__name__:
            fields["status"] = "awaiting_approval"
            fields["approval"] = {
                k: p[k] for k in ("stage", "policy_id", "reason", "requested_at", "expires_at")
            }
        elif h.event_type in _DECISIONS:
            status, decision = _DECISIONS[h.event_type]
            fields["status"] = status
            fields["approval"] = {
                **(fields.get("approval") or {}),
                "decision": decision,
                "decided_by": p["decided_by"],
                "role": p.get("role"),
                "decided_at": h.occurred_at.isoformat(),
            }
    return ExceptionState.model_validate(fields)


# A decision's event type -> (the status it leaves, the decision's name)
_DECISIONS = {
    ExceptionApproved.__name__: ("in_progress", "approved"),
    ExceptionRejected.__name__: ("rejected", "rejected"),
    ExceptionApprovalExpired.__name__: ("approval_expired", "expired"),
}


def apply(record: ExceptionRecord | None, event: Event) -> ExceptionRecord | None:
    """The record after ``event``, or None when the event was already applied (no write needed)."""
    history = add_event(record.history if record else [], event)
    if history is None:
        return None
    return ExceptionRecord(
        state=fold(event.exception_id, event.tenant_id, history), history=history
    )
