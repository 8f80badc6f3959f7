"""Policy's pure core: maintenance windows, rules in order, repeats, approvals."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from agents.policy import decide
from schemas.config import PolicyConfig
from schemas.events import Decision, ExceptionDecided, ExceptionTriaged, Severity, derive_event_id
from tests import factories
from tests.factories import NOW


def config(*rules: dict[str, Any], **extra: Any) -> PolicyConfig:
    return PolicyConfig.model_validate({"rules": list(rules), **extra})


def triaged(
    severity: Severity = Severity.high,
    category: str = "payment_decline",
    *,
    is_repeat: bool = False,
    occurrences: int = 1,
    **report: Any,
) -> ExceptionTriaged:
    context = factories.make_context(
        factories.make_report(**report),
        severity=severity,
        category=category,
        is_repeat=is_repeat,
        occurrences_in_window=occurrences,
    )
    return factories.triaged(context, severity=severity, category=category)


CRITICAL_PAYMENTS = {
    "id": "critical-payments",
    "match": {"severity": ["critical"], "category": ["payment_*"]},
    "then": {
        "allowed_actions": ["ticket.*", "notify.*"],
        "approval_required_for": ["ticket.escalate"],
    },
}
QUIET_LOW = {
    "id": "quiet-low",
    "match": {"severity": ["low", "info"]},
    "then": {"allowed_actions": ["ticket.create"], "suppress_repeats": True},
}
HOLD_AUTH = {
    "id": "hold-auth",
    "match": {"category": ["auth_*"]},
    "then": {"allowed_actions": ["ticket.create"], "approval_required_for": ["*"]},
}
SHIPPING = {
    "id": "shipping",
    "match": {"source": "shipping*", "attributes": {"carrier": "dhl"}},
    "then": {"allowed_actions": ["carrier.*"]},
}
WINDOW = {
    "id": "provider-migration",
    "start": NOW - timedelta(hours=1),
    "end": NOW + timedelta(hours=1),
    "match": {"source": "payments*"},
}


# ------------------------------------------------------------------------------ maintenance windows


def test_maintenance_window_covering_now_suppresses() -> None:
    out = decide(
        triaged(Severity.critical), config(CRITICAL_PAYMENTS, maintenance_windows=[WINDOW]), NOW
    )
    assert out.payload.decision == Decision.suppressed
    assert out.payload.policy_id == "maintenance:provider-migration"
    assert "maintenance window 'provider-migration'" in out.payload.reason
    assert "2025-06-02T08:30:00+00:00 to 2025-06-02T10:30:00+00:00" in out.payload.reason
    assert out.payload.allowed_actions == ()
    assert out.payload.approval_required_for == ()


@pytest.mark.parametrize(
    "when",
    [
        NOW - timedelta(hours=1, microseconds=1),
        NOW + timedelta(hours=1),
        NOW + timedelta(days=365),
    ],
    ids=["before-start", "exactly-at-end", "long-after"],
)
def test_maintenance_window_not_covering_now_does_not_suppress(when: datetime) -> None:
    out = decide(triaged(), config(maintenance_windows=[WINDOW]), when)
    assert out.payload.decision == Decision.proceed
    assert out.payload.policy_id == "default"


def test_maintenance_window_starts_inclusively() -> None:
    out = decide(triaged(), config(maintenance_windows=[WINDOW]), NOW - timedelta(hours=1))
    assert out.payload.decision == Decision.suppressed


def test_maintenance_window_only_suppresses_what_it_matches() -> None:
    out = decide(triaged(source="shipping"), config(maintenance_windows=[WINDOW]), NOW)
    assert out.payload.decision == Decision.proceed


def test_maintenance_window_can_match_on_triage_verdict() -> None:
    window = {**WINDOW, "match": {"severity": ["low"], "category": ["payment_*"]}}
    cfg = config(maintenance_windows=[window])
    assert decide(triaged(Severity.low), cfg, NOW).payload.decision == Decision.suppressed
    assert decide(triaged(Severity.high), cfg, NOW).payload.decision == Decision.proceed


# ------------------------------------------------------------------------------------------- rules


def test_first_matching_rule_wins() -> None:
    out = decide(triaged(Severity.critical), config(CRITICAL_PAYMENTS, HOLD_AUTH, QUIET_LOW), NOW)
    assert out.payload.policy_id == "critical-payments"
    out = decide(triaged(Severity.low), config(CRITICAL_PAYMENTS, QUIET_LOW), NOW)
    assert out.payload.policy_id == "quiet-low"


def test_no_matching_rule_applies_the_default() -> None:
    cfg = config(CRITICAL_PAYMENTS, default={"allowed_actions": ["notify.post"]})
    out = decide(triaged(Severity.high), cfg, NOW)
    assert out.payload.policy_id == "default"
    assert out.payload.decision == Decision.proceed
    assert out.payload.allowed_actions == ("notify.post",)
    assert out.payload.reason == "Policy 'default' allows notify.post."


def test_rules_match_on_the_report_too() -> None:
    cfg = config(SHIPPING)
    matching = triaged(source="Shipping-EU", attributes={"carrier": "DHL"})
    assert decide(matching, cfg, NOW).payload.policy_id == "shipping"
    other_carrier = triaged(source="shipping", attributes={"carrier": "ups"})
    assert decide(other_carrier, cfg, NOW).payload.policy_id == "default"


def test_category_globs_are_case_insensitive() -> None:
    out = decide(
        triaged(Severity.critical, "Payment_Provider_Outage"), config(CRITICAL_PAYMENTS), NOW
    )
    assert out.payload.policy_id == "critical-payments"


# ----------------------------------------------------------------------------------------- repeats


def test_repeat_is_suppressed_when_the_rule_says_so() -> None:
    event = triaged(Severity.low, is_repeat=True, occurrences=3)
    out = decide(event, config(QUIET_LOW), NOW)
    assert out.payload.decision == Decision.suppressed
    assert out.payload.policy_id == "quiet-low"
    fingerprint = event.payload.context.fingerprint
    assert out.payload.reason == (
        f"Suppressed by policy 'quiet-low': a repeat of fingerprint {fingerprint} "
        "(3rd occurrence in the repeat window)."
    )
    assert out.payload.allowed_actions == ()


@pytest.mark.parametrize(
    ("occurrences", "ordinal"),
    [
        (2, "2nd"),
        (4, "4th"),
        (11, "11th"),
        (12, "12th"),
        (13, "13th"),
        (21, "21st"),
        (102, "102nd"),
    ],
)
def test_repeat_reason_names_the_occurrence(occurrences: int, ordinal: str) -> None:
    event = triaged(Severity.low, is_repeat=True, occurrences=occurrences)
    out = decide(event, config(QUIET_LOW), NOW)
    assert f"({ordinal} occurrence in the repeat window)" in out.payload.reason


def test_first_occurrence_is_not_suppressed() -> None:
    out = decide(triaged(Severity.low, is_repeat=False), config(QUIET_LOW), NOW)
    assert out.payload.decision == Decision.proceed
    assert out.payload.allowed_actions == ("ticket.create",)


def test_repeat_proceeds_when_the_rule_does_not_suppress_repeats() -> None:
    out = decide(
        triaged(Severity.critical, is_repeat=True, occurrences=5), config(CRITICAL_PAYMENTS), NOW
    )
    assert out.payload.decision == Decision.proceed


# --------------------------------------------------------------------------------------- approvals


def test_star_approval_holds_everything() -> None:
    out = decide(triaged(Severity.high, "auth_failure"), config(HOLD_AUTH), NOW)
    assert out.payload.decision == Decision.awaiting_approval
    assert out.payload.policy_id == "hold-auth"
    assert "requires a human approval before any action runs" in out.payload.reason
    assert out.payload.allowed_actions == ("ticket.create",)
    assert out.payload.approval_required_for == ("*",)


def test_per_action_approval_proceeds_and_passes_the_globs_on() -> None:
    out = decide(triaged(Severity.critical), config(CRITICAL_PAYMENTS), NOW)
    assert out.payload.decision == Decision.proceed
    assert out.payload.allowed_actions == ("ticket.*", "notify.*")
    assert out.payload.approval_required_for == ("ticket.escalate",)
    assert out.payload.reason == (
        "Policy 'critical-payments' allows ticket.*, notify.*; "
        "approval is required for ticket.escalate."
    )


def test_suppressing_a_repeat_comes_before_asking_for_approval() -> None:
    rule = {
        "id": "hold-but-quiet",
        "then": {"approval_required_for": ["*"], "suppress_repeats": True},
    }
    out = decide(triaged(is_repeat=True, occurrences=2), config(rule), NOW)
    assert out.payload.decision == Decision.suppressed


def test_empty_allowed_actions_is_said_plainly() -> None:
    out = decide(triaged(), config(default={"allowed_actions": []}), NOW)
    assert out.payload.decision == Decision.proceed
    assert out.payload.reason == "Policy 'default' allows nothing."


# -------------------------------------------------------------------------------------- the output


def test_context_is_carried_forward_unchanged() -> None:
    event = triaged(Severity.critical, is_repeat=True, occurrences=2)
    for cfg in (config(), config(QUIET_LOW), config(maintenance_windows=[WINDOW])):
        assert decide(event, cfg, NOW).payload.context == event.payload.context


def test_envelope_is_derived_from_the_input() -> None:
    event = factories.triaged(tenant_id="globex", exception_id="exc-7")
    out = decide(event, config(), NOW + timedelta(seconds=2))
    assert isinstance(out, ExceptionDecided)
    assert out.event_id == derive_event_id(event.event_id, "policy")
    assert out.sequence == event.sequence + 1
    assert out.causation_id == event.event_id
    assert out.correlation_id == event.correlation_id
    assert (out.tenant_id, out.exception_id) == ("globex", "exc-7")
    assert out.occurred_at == NOW + timedelta(seconds=2)
    assert decide(event, config(QUIET_LOW), NOW).event_id == out.event_id
