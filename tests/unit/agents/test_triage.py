"""Triage's pure core: rules in order, the default, and the optional LLM classification."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from agents.triage import triage
from schemas.config import TriageConfig
from schemas.events import (
    Classification,
    ExceptionAccepted,
    ExceptionContext,
    ExceptionTriaged,
    Severity,
    derive_event_id,
)
from tests import factories
from tests.factories import NOW


def config(*rules: dict[str, Any], **extra: Any) -> TriageConfig:
    return TriageConfig.model_validate({"rules": list(rules), **extra})


OUTAGE = {
    "id": "provider-outage",
    "match": {"source": "payments*", "error_type": "Provider*"},
    "then": {"severity": "critical", "category": "payment_provider_outage"},
}
DECLINE = {
    "id": "declined",
    "match": {"source": "payments*", "message_contains": ["declined"]},
    "then": {"severity": "low", "category": "payment_decline"},
}
ANY_PAYMENT = {
    "id": "any-payment",
    "match": {"source": "payments*"},
    "then": {"severity": "medium", "category": "payments"},
}
KEY_ACCOUNT = {
    "id": "key-account",
    "match": {"attributes": {"customer_tier": "enterprise*", "amount": "1*"}},
    "then": {"severity": "high", "category": "key_account"},
}


def accepted_with(**report: Any) -> ExceptionAccepted:
    return factories.accepted(factories.make_report(**report))


# -------------------------------------------------------------------------------------------- rules


def test_first_matching_rule_wins() -> None:
    out = triage(factories.accepted(), config(DECLINE, ANY_PAYMENT), NOW)
    assert (out.payload.rule_id, out.payload.severity, out.payload.category) == (
        "declined",
        Severity.low,
        "payment_decline",
    )
    out = triage(factories.accepted(), config(ANY_PAYMENT, DECLINE), NOW)
    assert out.payload.rule_id == "any-payment"


def test_no_matching_rule_gives_the_default() -> None:
    cfg = config(OUTAGE, default={"severity": "info", "category": "unsorted"})
    out = triage(accepted_with(source="shipping", error_type="ShipmentStuck"), cfg, NOW)
    assert (out.payload.rule_id, out.payload.severity, out.payload.category) == (
        "default",
        Severity.info,
        "unsorted",
    )
    assert out.payload.classifier == "rules"
    assert out.payload.classifier_note is None


def test_no_rules_at_all_gives_the_built_in_default() -> None:
    out = triage(factories.accepted(), TriageConfig(), NOW)
    assert (out.payload.rule_id, out.payload.severity, out.payload.category) == (
        "default",
        Severity.medium,
        "uncategorized",
    )


@pytest.mark.parametrize(
    ("source", "error_type", "expected"),
    [
        ("payments", "ProviderTimeout", "provider-outage"),
        ("Payments-API", "PROVIDERUNAVAILABLE", "provider-outage"),
        ("payments-eu", "providertimeout", "provider-outage"),
        ("billing-payments", "ProviderTimeout", "default"),
        ("payments", "GatewayProviderTimeout", "default"),
    ],
)
def test_globs_match_case_insensitively_and_whole_values(
    source: str, error_type: str, expected: str
) -> None:
    out = triage(accepted_with(source=source, error_type=error_type), config(OUTAGE), NOW)
    assert out.payload.rule_id == expected


def test_message_contains_is_case_insensitive() -> None:
    out = triage(accepted_with(message="Card DECLINED by issuer"), config(DECLINE), NOW)
    assert out.payload.rule_id == "declined"


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"customer_tier": "Enterprise-Gold", "amount": 129.9}, "key-account"),
        ({"customer_tier": "enterprise", "amount": "1500"}, "key-account"),
        ({"customer_tier": "enterprise", "amount": 29.9}, "default"),
        ({"customer_tier": "retail", "amount": 129.9}, "default"),
        ({"amount": 129.9}, "default"),
        ({}, "default"),
    ],
)
def test_attribute_globs_match_the_string_value(attributes: dict[str, Any], expected: str) -> None:
    out = triage(accepted_with(attributes=attributes), config(KEY_ACCOUNT), NOW)
    assert out.payload.rule_id == expected


# ---------------------------------------------------------------------------------------------- LLM


def test_llm_classification_is_used_when_given() -> None:
    answer = Classification(severity=Severity.critical, category="fraud", note="Looks like a bot.")
    out = triage(factories.accepted(), config(DECLINE), NOW, answer)
    assert out.payload.classifier == "llm"
    assert out.payload.rule_id == "llm"
    assert (out.payload.severity, out.payload.category) == (Severity.critical, "fraud")
    assert out.payload.classifier_note == "Looks like a bot."


def test_llm_category_in_the_allowed_list_is_used_in_its_configured_spelling() -> None:
    cfg = config(DECLINE, llm={"categories": ["payment_decline", "Fraud"]})
    answer = Classification(severity=Severity.high, category="FRAUD")
    out = triage(factories.accepted(), cfg, NOW, answer)
    assert out.payload.classifier == "llm"
    assert out.payload.category == "Fraud"
    assert out.payload.context.category == "Fraud"


def test_llm_category_outside_the_allowed_list_falls_back_to_the_rules() -> None:
    cfg = config(DECLINE, llm={"categories": ["payment_decline", "payment_provider_outage"]})
    answer = Classification(severity=Severity.critical, category="weather")
    out = triage(factories.accepted(), cfg, NOW, answer)
    assert out.payload.classifier == "rules"
    assert out.payload.rule_id == "declined"
    assert (out.payload.severity, out.payload.category) == (Severity.low, "payment_decline")
    note = out.payload.classifier_note
    assert note is not None
    assert "'weather'" in note
    assert "payment_decline, payment_provider_outage" in note
    assert "'declined'" in note


def test_llm_fallback_can_land_on_the_default() -> None:
    cfg = config(OUTAGE, llm={"categories": ["payments"]})
    answer = Classification(severity=Severity.info, category="other")
    out = triage(factories.accepted(), cfg, NOW, answer)
    assert out.payload.rule_id == "default"
    assert out.payload.classifier_note is not None
    assert "'default'" in out.payload.classifier_note


# -------------------------------------------------------------------------------------- the output


def test_context_carries_the_accepted_exception_and_the_verdict() -> None:
    event = factories.accepted(occurrences_in_window=3, fingerprint="c" * 32)
    out = triage(event, config(DECLINE), NOW)
    assert out.payload.context == ExceptionContext(
        report=event.payload.report,
        fingerprint="c" * 32,
        is_repeat=True,
        occurrences_in_window=3,
        severity=Severity.low,
        category="payment_decline",
    )


def test_envelope_is_derived_from_the_input() -> None:
    event = factories.accepted(tenant_id="globex", exception_id="exc-9")
    out = triage(event, config(DECLINE), NOW + timedelta(seconds=1))
    assert isinstance(out, ExceptionTriaged)
    assert out.event_id == derive_event_id(event.event_id, "triage")
    assert out.sequence == event.sequence + 1
    assert out.causation_id == event.event_id
    assert out.correlation_id == event.correlation_id
    assert (out.tenant_id, out.exception_id) == ("globex", "exc-9")
    assert out.occurred_at == NOW + timedelta(seconds=1)


def test_same_input_gives_the_same_output_id() -> None:
    event = factories.accepted()
    first = triage(event, config(DECLINE), NOW)
    redelivered = triage(event, config(ANY_PAYMENT), NOW + timedelta(minutes=5))
    assert first.event_id == redelivered.event_id
    assert first.event_id != derive_event_id(event.event_id, "policy")
