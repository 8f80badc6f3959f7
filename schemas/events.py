"""Sluice's events: one envelope, one past-tense event type per stage outcome, typed payloads.

Every event shares the envelope fields (:class:`EventBase`); ``event_type`` is the discriminator that
selects the payload model, so ``Event`` is a discriminated union that pydantic validates in one pass.
Events are frozen: they are facts.

A stage derives its output's ``event_id`` from its input's (:func:`derive_event_id`), so a redelivered
input produces an output with the same id, and the next stage's idempotency table drops the copy.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1

# Namespace for the uuid5 ids Sluice derives; fixed forever, changing it would change every derived id.
SLUICE_NAMESPACE = uuid.UUID("6f1c3f5e-2a51-4c5e-9d1b-5b7e3f0c9a42")


def derive_event_id(input_event_id: uuid.UUID, stage: str) -> uuid.UUID:
    """The id of the event ``stage`` emits for ``input_event_id``: the same input gives the same id."""
    return uuid.uuid5(SLUICE_NAMESPACE, f"{input_event_id}:{stage}")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Severity(StrEnum):
    critical = "critical"
    high = "high"
    medium = "medium"
    low = "low"
    info = "info"


class Stage(StrEnum):
    """Where an exception is in the pipeline; the order of members is the order of the stages."""

    ingested = "ingested"
    intake = "intake"
    triage = "triage"
    policy = "policy"
    playbook = "playbook"
    tool = "tool"


class Decision(StrEnum):
    proceed = "proceed"
    suppressed = "suppressed"
    awaiting_approval = "awaiting_approval"


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------------------------------------------
# Payloads, one per event type.


class ExceptionReport(Frozen):
    """What a producer reported: the body of POST /v1/exceptions, as accepted (tenant from the key)."""

    source: str = Field(min_length=1, max_length=200, description="System that raised it.")
    error_type: str = Field(min_length=1, max_length=200, description="Machine-readable kind.")
    message: str = Field(min_length=1, max_length=10_000, description="Human-readable message.")
    occurred_at: AwareDatetime | None = Field(default=None, description="When it happened (UTC).")
    external_ref: str | None = Field(
        default=None, max_length=200, description="The producer's own id for it."
    )
    attributes: dict[str, Any] = Field(
        default_factory=dict, description="Free-form context (amount, order id, region...)."
    )


class IngestedPayload(Frozen):
    report: ExceptionReport
    request_hash: str = Field(description="sha256 of the canonical request body (idempotency).")
    idempotency_key: str | None = None


class FingerprintedPayload(Frozen):
    """Intake's internal hand-over to grouping (keyed by fingerprint); not part of the history."""

    report: ExceptionReport
    normalized_message: str
    fingerprint: str


class AcceptedPayload(Frozen):
    report: ExceptionReport
    normalized_message: str
    fingerprint: str
    occurrences_in_window: int = Field(ge=1, description="Events with this fingerprint in window.")
    is_repeat: bool
    first_seen_at: AwareDatetime


class ExceptionContext(Frozen):
    """What later stages need to know about the exception, carried forward from stage to stage so
    each stage stays a pure function of its input event (no lookups into another stage's state)."""

    report: ExceptionReport
    fingerprint: str
    is_repeat: bool
    occurrences_in_window: int
    severity: Severity | None = None
    category: str | None = None


class Classification(Frozen):
    """A classifier's answer (the optional LLM); triage uses it instead of the rules when given."""

    severity: Severity
    category: str = Field(min_length=1, max_length=100)
    note: str | None = Field(default=None, max_length=1000)


class TriagedPayload(Frozen):
    context: ExceptionContext
    severity: Severity
    category: str
    rule_id: str
    classifier: Literal["rules", "llm"] = "rules"
    classifier_note: str | None = None


class DecidedPayload(Frozen):
    context: ExceptionContext
    decision: Decision
    reason: str
    policy_id: str
    allowed_actions: tuple[str, ...] = ()
    approval_required_for: tuple[str, ...] = ()
    approval_timeout_seconds: int | None = Field(
        default=None, description="How long a held exception waits for a decision (policy)."
    )


class PlannedStep(Frozen):
    step_id: str
    tool: str
    action: str
    params: dict[str, Any] = Field(default_factory=dict)
    requires_approval: bool = False


class SkippedStep(Frozen):
    step_id: str
    reason: str


class PlannedPayload(Frozen):
    context: ExceptionContext
    playbook_id: str = Field(description="'none' when no playbook matched.")
    steps: tuple[PlannedStep, ...] = ()
    skipped: tuple[SkippedStep, ...] = Field(default=(), description="Steps policy did not allow.")
    awaiting_approval: bool = Field(
        default=False, description="A step needs approval: the tool stage does not run the plan."
    )
    approval_timeout_seconds: int | None = Field(
        default=None, description="How long a held plan waits for a decision (from the policy)."
    )
    policy_id: str | None = Field(default=None, description="The policy rule that allowed it.")


class StepResult(Frozen):
    step_id: str
    tool: str
    action: str
    idempotency_key: str
    status: Literal["succeeded", "failed", "skipped"]
    detail: dict[str, Any] = Field(default_factory=dict)
    replayed: bool = Field(
        default=False, description="True when the ledger already held the result: no new call."
    )


class CompletedPayload(Frozen):
    playbook_id: str
    results: tuple[StepResult, ...]
    outcome: Literal["resolved", "failed", "no_action"]


class OperatorRequestPayload(Frozen):
    """An operator's request to a stage about a quarantined exception (redrive or discard).

    ``requested_by`` is the name of the API key that asked (unique within its tenant) and ``role``
    that key's role; events written before roles existed have ``api:<tenant>`` and no role.
    """

    stage: str
    requested_by: str = Field(max_length=200)
    role: str | None = Field(default=None, max_length=20)
    reason: str | None = Field(default=None, max_length=2000)


class DeadLetteredPayload(Frozen):
    stage: str
    entry_id: str
    error_class: Literal["poison", "transient", "permanent", "in_doubt"]
    error_kind: str
    message: str
    attempts: int
    failed_event_id: uuid.UUID | None
    original_topic: str
    original_partition: int
    original_offset: int
    dlq_topic: str
    first_failure_at: AwareDatetime
    last_failure_at: AwareDatetime


class ParkedPayload(Frozen):
    stage: str
    parked_event_id: uuid.UUID | None
    position: int = Field(description="1 = first in line behind the dead-lettered event.")
    original_topic: str
    original_offset: int


class QuarantineLiftedPayload(Frozen):
    stage: str
    action: Literal["redrive", "discard"]
    released: int = Field(description="Parked events processed after the lift.")
    reason: str | None = None
    requested_by: str


class ApprovalRequestedPayload(Frozen):
    """A stage holds the exception until a person approves or rejects (or the timer runs out)."""

    stage: Literal["playbook", "tool"] = Field(
        description="playbook: policy held every action; tool: a planned step needs approval."
    )
    held_event_id: uuid.UUID = Field(description="The decision or plan that is held.")
    policy_id: str
    reason: str = Field(description="The policy's reason for holding it.")
    severity: Severity | None = None
    category: str | None = None
    playbook_id: str
    steps: tuple[PlannedStep, ...] = Field(description="What runs once approved.")
    requested_at: AwareDatetime
    expires_at: AwareDatetime


class ApprovalSubmittedPayload(Frozen):
    """A decision about a held exception, for the stage that holds it: an operator's approve or
    reject, or the approval timer's expire."""

    action: Literal["approve", "reject", "expire"]
    stage: Literal["playbook", "tool"]
    requested_by: str = Field(max_length=200)
    role: str | None = None
    reason: str = Field(min_length=1, max_length=1000)


class ApprovalDecisionPayload(Frozen):
    """What the holding stage made of a submitted decision (ExceptionApproved, ExceptionRejected,
    ExceptionApprovalExpired, or ExceptionApprovalRefused when nothing was held any more)."""

    stage: Literal["playbook", "tool"]
    action: Literal["approve", "reject", "expire"]
    decided_by: str
    role: str | None = None
    reason: str
    submitted_event_id: uuid.UUID
    held_event_id: uuid.UUID | None = None
    requested_at: AwareDatetime | None = None
    refused_because: str | None = None


# ---------------------------------------------------------------------------------------------------
# The envelope and the union.


class EventBase(Frozen):
    event_id: uuid.UUID
    schema_version: int = SCHEMA_VERSION
    tenant_id: str = Field(min_length=1, max_length=64)
    exception_id: str = Field(min_length=1, max_length=128)
    sequence: int = Field(ge=1, description="Position of the event in its exception's chain.")
    occurred_at: AwareDatetime
    causation_id: uuid.UUID | None = Field(description="The event that caused this one.")
    correlation_id: uuid.UUID = Field(description="Shared by every event of one ingestion.")

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


class ExceptionIngested(EventBase):
    event_type: Literal["ExceptionIngested"] = "ExceptionIngested"
    payload: IngestedPayload


class ExceptionFingerprinted(EventBase):
    event_type: Literal["ExceptionFingerprinted"] = "ExceptionFingerprinted"
    payload: FingerprintedPayload


class ExceptionAccepted(EventBase):
    event_type: Literal["ExceptionAccepted"] = "ExceptionAccepted"
    payload: AcceptedPayload


class ExceptionTriaged(EventBase):
    event_type: Literal["ExceptionTriaged"] = "ExceptionTriaged"
    payload: TriagedPayload


class ExceptionDecided(EventBase):
    event_type: Literal["ExceptionDecided"] = "ExceptionDecided"
    payload: DecidedPayload


class ExceptionPlanned(EventBase):
    event_type: Literal["ExceptionPlanned"] = "ExceptionPlanned"
    payload: PlannedPayload


class ExceptionCompleted(EventBase):
    event_type: Literal["ExceptionCompleted"] = "ExceptionCompleted"
    payload: CompletedPayload


class ExceptionRedriveRequested(EventBase):
    event_type: Literal["ExceptionRedriveRequested"] = "ExceptionRedriveRequested"
    payload: OperatorRequestPayload


class ExceptionDiscardRequested(EventBase):
    event_type: Literal["ExceptionDiscardRequested"] = "ExceptionDiscardRequested"
    payload: OperatorRequestPayload


class ExceptionDeadLettered(EventBase):
    event_type: Literal["ExceptionDeadLettered"] = "ExceptionDeadLettered"
    payload: DeadLetteredPayload


class ExceptionParked(EventBase):
    event_type: Literal["ExceptionParked"] = "ExceptionParked"
    payload: ParkedPayload


class ExceptionQuarantineLifted(EventBase):
    event_type: Literal["ExceptionQuarantineLifted"] = "ExceptionQuarantineLifted"
    payload: QuarantineLiftedPayload


class ExceptionApprovalRequested(EventBase):
    event_type: Literal["ExceptionApprovalRequested"] = "ExceptionApprovalRequested"
    payload: ApprovalRequestedPayload


class ExceptionApprovalSubmitted(EventBase):
    event_type: Literal["ExceptionApprovalSubmitted"] = "ExceptionApprovalSubmitted"
    payload: ApprovalSubmittedPayload


class ExceptionApproved(EventBase):
    event_type: Literal["ExceptionApproved"] = "ExceptionApproved"
    payload: ApprovalDecisionPayload


class ExceptionRejected(EventBase):
    event_type: Literal["ExceptionRejected"] = "ExceptionRejected"
    payload: ApprovalDecisionPayload


class ExceptionApprovalExpired(EventBase):
    event_type: Literal["ExceptionApprovalExpired"] = "ExceptionApprovalExpired"
    payload: ApprovalDecisionPayload


class ExceptionApprovalRefused(EventBase):
    event_type: Literal["ExceptionApprovalRefused"] = "ExceptionApprovalRefused"
    payload: ApprovalDecisionPayload


OPERATOR_REQUESTS = ("ExceptionRedriveRequested", "ExceptionDiscardRequested")

Event = Annotated[
    ExceptionIngested
    | ExceptionFingerprinted
    | ExceptionAccepted
    | ExceptionTriaged
    | ExceptionDecided
    | ExceptionPlanned
    | ExceptionCompleted
    | ExceptionRedriveRequested
    | ExceptionDiscardRequested
    | ExceptionDeadLettered
    | ExceptionParked
    | ExceptionQuarantineLifted
    | ExceptionApprovalRequested
    | ExceptionApprovalSubmitted
    | ExceptionApproved
    | ExceptionRejected
    | ExceptionApprovalExpired
    | ExceptionApprovalRefused,
    Field(discriminator="event_type"),
]

# Which stage emits which event type: the projection uses it to say where an exception is.
STAGE_OF_EVENT: dict[str, Stage] = {
    "ExceptionIngested": Stage.ingested,
    "ExceptionAccepted": Stage.intake,
    "ExceptionTriaged": Stage.triage,
    "ExceptionDecided": Stage.policy,
    "ExceptionPlanned": Stage.playbook,
    "ExceptionCompleted": Stage.tool,
}


E = TypeVar("E", bound=EventBase)


def follow(cause: EventBase, event_cls: type[E], stage: str, payload: Frozen, now: datetime) -> E:
    """The event ``stage`` emits in response to ``cause``: derived id, same exception and
    correlation, next sequence."""
    return event_cls.model_validate(
        {
            "event_id": derive_event_id(cause.event_id, stage),
            "tenant_id": cause.tenant_id,
            "exception_id": cause.exception_id,
            "sequence": cause.sequence + 1,
            "occurred_at": now,
            "causation_id": cause.event_id,
            "correlation_id": cause.correlation_id,
            "payload": payload,
        }
    )
