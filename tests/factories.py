"""Event factories for tests: a valid event of every type in one call, any field overridable.

The defaults describe one Acme payment decline travelling through the pipeline, so a test states only
what it is about::

    event = factories.accepted(is_repeat=True, occurrences_in_window=3)
    event = factories.triaged(factories.make_report(source="shipping"), severity=Severity.low)
    event = factories.decided(decision=Decision.suppressed, tenant_id="globex")

``make_report``, ``make_context`` and ``make_step`` build the payload parts the events share;
``ingested``, ``fingerprinted``, ``accepted``, ``triaged``, ``decided``, ``planned`` and
``completed`` build the events. Every event factory takes the envelope fields as keyword arguments
(``event_id``, ``tenant_id``, ``exception_id``, ``sequence``, ``occurred_at``, ``causation_id``,
``correlation_id``, ``schema_version``); a misspelled name fails, because the events forbid unknown
fields. Everything is built through pydantic validation, so an invalid override fails at
construction with pydantic's message, not later in the code under test.

Defaults are deterministic, so two calls with the same arguments build equal events: ids are uuid5
values derived from tenant, exception id and event type; ``sequence`` is the event type's position
in the chain (ingested 1, fingerprinted 2, accepted 3, triaged 4, decided 5, planned 6, completed
7); ``causation_id`` is the default id of the previous event type, so the default events of one
exception form a chain; the normalized message and fingerprint are what intake computes for the
report.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from agents.intake import fingerprint as compute_fingerprint
from agents.intake import normalize_message
from schemas.events import (
    AcceptedPayload,
    CompletedPayload,
    DecidedPayload,
    Decision,
    EventBase,
    ExceptionAccepted,
    ExceptionCompleted,
    ExceptionContext,
    ExceptionDecided,
    ExceptionFingerprinted,
    ExceptionIngested,
    ExceptionPlanned,
    ExceptionReport,
    ExceptionTriaged,
    FingerprintedPayload,
    Frozen,
    IngestedPayload,
    PlannedPayload,
    PlannedStep,
    Severity,
    SkippedStep,
    StepResult,
    TriagedPayload,
)

# A fixed, timezone-aware "now" for tests that need one.
NOW = datetime(2025, 6, 2, 9, 30, tzinfo=UTC)
TENANT_ID = "acme"
EXCEPTION_ID = "exc-0001"

# Namespace of the factories' uuid5 ids; unrelated to Sluice's own namespace, so a factory id is
# never mistaken for one a stage derived.
_FACTORY_NAMESPACE = uuid.UUID("0b6f6a52-5c1e-4a8e-9f6e-7d2c9a4b1e30")

_CHAIN = (
    ExceptionIngested,
    ExceptionFingerprinted,
    ExceptionAccepted,
    ExceptionTriaged,
    ExceptionDecided,
    ExceptionPlanned,
    ExceptionCompleted,
)

E = TypeVar("E", bound=EventBase)


def default_event_id(
    event_cls: type[EventBase], tenant_id: str = TENANT_ID, exception_id: str = EXCEPTION_ID
) -> uuid.UUID:
    """The event id a factory gives ``event_cls`` when the test does not choose one."""
    return uuid.uuid5(_FACTORY_NAMESPACE, f"{tenant_id}:{exception_id}:{event_cls.__name__}")


def default_correlation_id(
    tenant_id: str = TENANT_ID, exception_id: str = EXCEPTION_ID
) -> uuid.UUID:
    """The correlation id the factories share for one exception's events."""
    return uuid.uuid5(_FACTORY_NAMESPACE, f"{tenant_id}:{exception_id}:correlation")


def _event(event_cls: type[E], payload: Frozen, envelope: dict[str, Any]) -> E:
    tenant_id = envelope.get("tenant_id", TENANT_ID)
    exception_id = envelope.get("exception_id", EXCEPTION_ID)
    position = _CHAIN.index(event_cls)
    fields: dict[str, Any] = {
        "event_id": default_event_id(event_cls, tenant_id, exception_id),
        "tenant_id": tenant_id,
        "exception_id": exception_id,
        "sequence": position + 1,
        "occurred_at": NOW,
        "causation_id": (
            default_event_id(_CHAIN[position - 1], tenant_id, exception_id) if position else None
        ),
        "correlation_id": default_correlation_id(tenant_id, exception_id),
        **envelope,
        "payload": payload,
    }
    return event_cls.model_validate(fields)


# ------------------------------------------------------------------------------------ payload parts


def make_report(**overrides: Any) -> ExceptionReport:
    """A producer's report: a declined card payment, unless ``overrides`` say otherwise."""
    fields: dict[str, Any] = {
        "source": "payments",
        "error_type": "PaymentDeclined",
        "message": "Card declined for order 100234 (insufficient funds)",
        "occurred_at": NOW,
        "external_ref": "ord-100234",
        "attributes": {"amount": 129.9, "currency": "EUR", "region": "eu-west"},
        **overrides,
    }
    return ExceptionReport.model_validate(fields)


def default_fingerprint(report: ExceptionReport, tenant_id: str = TENANT_ID) -> str:
    """The fingerprint intake computes for ``report`` of ``tenant_id``."""
    return compute_fingerprint(
        tenant_id, report.source, report.error_type, normalize_message(report.message)
    )


def make_context(
    report: ExceptionReport | None = None, *, tenant_id: str = TENANT_ID, **overrides: Any
) -> ExceptionContext:
    """What a triaged exception carries forward: by default a first occurrence, rated high, in
    category payment_decline. ``tenant_id`` only feeds the default fingerprint."""
    report = report if report is not None else make_report()
    fields: dict[str, Any] = {
        "report": report,
        "fingerprint": default_fingerprint(report, tenant_id),
        "is_repeat": False,
        "occurrences_in_window": 1,
        "severity": Severity.high,
        "category": "payment_decline",
        **overrides,
    }
    return ExceptionContext.model_validate(fields)


# ------------------------------------------------------------------------------------------- events


def ingested(
    report: ExceptionReport | None = None,
    *,
    request_hash: str | None = None,
    idempotency_key: str | None = None,
    **envelope: Any,
) -> ExceptionIngested:
    """What the API emits for an accepted POST. ``request_hash`` defaults to a hash of the report."""
    report = report if report is not None else make_report()
    digest = (
        request_hash
        if request_hash is not None
        else hashlib.sha256(report.model_dump_json().encode()).hexdigest()
    )
    payload = IngestedPayload(report=report, request_hash=digest, idempotency_key=idempotency_key)
    return _event(ExceptionIngested, payload, envelope)


def fingerprinted(
    report: ExceptionReport | None = None,
    *,
    normalized_message: str | None = None,
    fingerprint: str | None = None,
    **envelope: Any,
) -> ExceptionFingerprinted:
    """Intake's hand-over to grouping; normalized message and fingerprint default to intake's."""
    report = report if report is not None else make_report()
    tenant_id = envelope.get("tenant_id", TENANT_ID)
    payload = FingerprintedPayload(
        report=report,
        normalized_message=(
            normalize_message(report.message) if normalized_message is None else normalized_message
        ),
        fingerprint=(
            default_fingerprint(report, tenant_id) if fingerprint is None else fingerprint
        ),
    )
    return _event(ExceptionFingerprinted, payload, envelope)


def accepted(
    report: ExceptionReport | None = None,
    *,
    normalized_message: str | None = None,
    fingerprint: str | None = None,
    occurrences_in_window: int = 1,
    is_repeat: bool | None = None,
    first_seen_at: datetime = NOW,
    **envelope: Any,
) -> ExceptionAccepted:
    """What grouping emits. ``is_repeat`` defaults to ``occurrences_in_window > 1``, which is what
    grouping would say."""
    report = report if report is not None else make_report()
    tenant_id = envelope.get("tenant_id", TENANT_ID)
    payload = AcceptedPayload(
        report=report,
        normalized_message=(
            normalize_message(report.message) if normalized_message is None else normalized_message
        ),
        fingerprint=(
            default_fingerprint(report, tenant_id) if fingerprint is None else fingerprint
        ),
        occurrences_in_window=occurrences_in_window,
        is_repeat=occurrences_in_window > 1 if is_repeat is None else is_repeat,
        first_seen_at=first_seen_at,
    )
    return _event(ExceptionAccepted, payload, envelope)


def triaged(
    context: ExceptionContext | ExceptionReport | None = None,
    *,
    severity: Severity = Severity.high,
    category: str = "payment_decline",
    rule_id: str = "payment-declined",
    classifier: Literal["rules", "llm"] = "rules",
    classifier_note: str | None = None,
    **envelope: Any,
) -> ExceptionTriaged:
    """What triage emits. Pass a report (or nothing) to get a context consistent with ``severity``
    and ``category``; pass a context to control it entirely (it is used as given)."""
    ctx = _context(context, envelope, severity=severity, category=category)
    payload = TriagedPayload(
        context=ctx,
        severity=severity,
        category=category,
        rule_id=rule_id,
        classifier=classifier,
        classifier_note=classifier_note,
    )
    return _event(ExceptionTriaged, payload, envelope)


def decided(
    context: ExceptionContext | ExceptionReport | None = None,
    *,
    decision: Decision = Decision.proceed,
    reason: str = "Policy 'default' allows *.",
    policy_id: str = "default",
    allowed_actions: Sequence[str] = ("*",),
    approval_required_for: Sequence[str] = (),
    **envelope: Any,
) -> ExceptionDecided:
    """What policy emits: by default ``proceed`` with every action allowed and none held."""
    payload = DecidedPayload(
        context=_context(context, envelope),
        decision=decision,
        reason=reason,
        policy_id=policy_id,
        allowed_actions=tuple(allowed_actions),
        approval_required_for=tuple(approval_required_for),
    )
    return _event(ExceptionDecided, payload, envelope)


def make_step(step_id: str = "open-ticket", **overrides: Any) -> PlannedStep:
    """One planned tool step: by default a ticket to create, no approval needed."""
    fields: dict[str, Any] = {
        "step_id": step_id,
        "tool": "ticket",
        "action": "create",
        "params": {"queue": "OPS"},
        **overrides,
    }
    return PlannedStep.model_validate(fields)


def planned(
    context: ExceptionContext | ExceptionReport | None = None,
    *,
    playbook_id: str = "payment-decline",
    steps: Sequence[PlannedStep] | None = None,
    skipped: Sequence[SkippedStep] = (),
    awaiting_approval: bool | None = None,
    **envelope: Any,
) -> ExceptionPlanned:
    """What the playbook stage emits: by default one ticket step. ``awaiting_approval`` defaults to
    whether a step requires approval, which is what the playbook stage would say."""
    the_steps = tuple(steps) if steps is not None else (make_step(),)
    payload = PlannedPayload(
        context=_context(context, envelope),
        playbook_id=playbook_id,
        steps=the_steps,
        skipped=tuple(skipped),
        awaiting_approval=(
            any(s.requires_approval for s in the_steps)
            if awaiting_approval is None
            else awaiting_approval
        ),
    )
    return _event(ExceptionPlanned, payload, envelope)


def completed(
    *,
    playbook_id: str = "payment-decline",
    results: Sequence[StepResult] = (),
    outcome: Literal["resolved", "failed", "no_action"] = "no_action",
    **envelope: Any,
) -> ExceptionCompleted:
    """What the tool stage emits: by default nothing ran (``no_action``)."""
    payload = CompletedPayload(playbook_id=playbook_id, results=tuple(results), outcome=outcome)
    return _event(ExceptionCompleted, payload, envelope)


def _context(
    given: ExceptionContext | ExceptionReport | None, envelope: dict[str, Any], **overrides: Any
) -> ExceptionContext:
    if isinstance(given, ExceptionContext):
        return given
    return make_context(given, tenant_id=envelope.get("tenant_id", TENANT_ID), **overrides)
