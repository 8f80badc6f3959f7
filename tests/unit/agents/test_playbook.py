"""The playbook stage's pure core: choosing a playbook, applying policy to its steps, templating."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from agents.playbook import plan, render
from schemas.config import Playbook
from schemas.events import (
    Decision,
    ExceptionDecided,
    ExceptionPlanned,
    PlannedStep,
    Severity,
    SkippedStep,
    derive_event_id,
)
from tests import factories
from tests.factories import NOW


def playbook(
    playbook_id: str, match: dict[str, Any] | None = None, *steps: dict[str, Any]
) -> Playbook:
    return Playbook.model_validate({"id": playbook_id, "match": match or {}, "steps": list(steps)})


def step(step_id: str, tool: str, action: str, **params: Any) -> dict[str, Any]:
    return {"id": step_id, "tool": tool, "action": action, "params": params}


OUTAGE = playbook(
    "outage",
    {"category": ["payment_provider_outage"]},
    step("page", "notify", "page", channel="#payments-oncall"),
    step("ticket", "ticket", "create", queue="PAY"),
    step("escalate", "ticket", "escalate"),
)
DECLINE = playbook(
    "decline",
    {"category": ["payment_decline"]},
    step("ticket", "ticket", "create", queue="PAY-OPS"),
)
CATCH_ALL = playbook("catch-all", None, step("log", "noop", "record"))


def decided(
    severity: Severity = Severity.critical,
    category: str = "payment_provider_outage",
    *,
    allowed: tuple[str, ...] = ("*",),
    approval: tuple[str, ...] = (),
    decision: Decision = Decision.proceed,
    **report: Any,
) -> ExceptionDecided:
    context = factories.make_context(
        factories.make_report(**report), severity=severity, category=category
    )
    return factories.decided(
        context,
        decision=decision,
        allowed_actions=allowed,
        approval_required_for=approval,
        policy_id="critical-payments",
    )


def planned(event: ExceptionDecided, *playbooks: Playbook) -> ExceptionPlanned:
    out = plan(event, playbooks, NOW)
    assert out is not None
    return out


# --------------------------------------------------------------------------------------- choosing


@pytest.mark.parametrize("decision", [Decision.suppressed, Decision.awaiting_approval])
def test_no_plan_unless_policy_says_proceed(decision: Decision) -> None:
    assert plan(decided(decision=decision), [OUTAGE, CATCH_ALL], NOW) is None


def test_no_matching_playbook_plans_nothing_under_none() -> None:
    out = planned(decided(category="shipment_stuck"), OUTAGE, DECLINE)
    assert out.payload.playbook_id == "none"
    assert out.payload.steps == ()
    assert out.payload.skipped == ()
    assert out.payload.awaiting_approval is False


def test_first_matching_playbook_wins() -> None:
    assert planned(decided(), OUTAGE, CATCH_ALL).payload.playbook_id == "outage"
    assert planned(decided(), CATCH_ALL, OUTAGE).payload.playbook_id == "catch-all"
    assert (
        planned(decided(category="payment_decline"), OUTAGE, DECLINE).payload.playbook_id
        == "decline"
    )


@pytest.mark.parametrize(
    ("report", "severity", "category", "expected"),
    [
        ({"source": "payments-eu"}, Severity.high, "payment_decline", "specific"),
        ({"source": "payments-eu"}, Severity.low, "payment_decline", "none"),
        ({"source": "payments-eu"}, Severity.high, "shipment_stuck", "none"),
        ({"source": "billing"}, Severity.high, "payment_decline", "none"),
        (
            {"source": "payments", "error_type": "CardExpired"},
            Severity.high,
            "payment_decline",
            "none",
        ),
        (
            {"source": "payments", "message": "Timeout talking to bank"},
            Severity.high,
            "payment_decline",
            "none",
        ),
        (
            {"source": "payments", "attributes": {"region": "us-east"}},
            Severity.high,
            "payment_decline",
            "none",
        ),
    ],
)
def test_playbook_match_uses_every_condition(
    report: dict[str, Any], severity: Severity, category: str, expected: str
) -> None:
    specific = playbook(
        "specific",
        {
            "source": "PAYMENTS*",
            "error_type": "*declined",
            "message_contains": ["declined"],
            "attributes": {"region": "eu-*"},
            "severity": ["critical", "high"],
            "category": ["payment_*"],
        },
        step("ticket", "ticket", "create"),
    )
    out = planned(decided(severity, category, **report), specific)
    assert out.payload.playbook_id == expected


# ------------------------------------------------------------------------------------ policy on steps


def test_allowed_steps_are_planned_in_order() -> None:
    out = planned(decided(allowed=("ticket.*", "notify.*")), OUTAGE)
    assert [s.step_id for s in out.payload.steps] == ["page", "ticket", "escalate"]
    assert out.payload.steps[0] == PlannedStep(
        step_id="page", tool="notify", action="page", params={"channel": "#payments-oncall"}
    )
    assert out.payload.skipped == ()


def test_steps_policy_does_not_allow_are_skipped_with_a_reason() -> None:
    out = planned(decided(allowed=("ticket.create",)), OUTAGE)
    assert [s.step_id for s in out.payload.steps] == ["ticket"]
    assert out.payload.skipped == (
        SkippedStep(
            step_id="page",
            reason="notify.page is not allowed by policy 'critical-payments' (allowed: ticket.create).",
        ),
        SkippedStep(
            step_id="escalate",
            reason="ticket.escalate is not allowed by policy 'critical-payments' (allowed: ticket.create).",
        ),
    )


def test_nothing_allowed_skips_every_step() -> None:
    out = planned(decided(allowed=()), OUTAGE)
    assert out.payload.playbook_id == "outage"
    assert out.payload.steps == ()
    assert [s.step_id for s in out.payload.skipped] == ["page", "ticket", "escalate"]
    assert "(allowed: nothing)" in out.payload.skipped[0].reason
    assert out.payload.awaiting_approval is False


def test_action_globs_are_case_insensitive() -> None:
    out = planned(decided(allowed=("TICKET.*", "Notify.Pa?e")), OUTAGE)
    assert [s.step_id for s in out.payload.steps] == ["page", "ticket", "escalate"]


def test_per_action_approval_marks_the_step_and_holds_the_plan() -> None:
    out = planned(decided(approval=("ticket.ESCALATE",)), OUTAGE)
    assert {s.step_id: s.requires_approval for s in out.payload.steps} == {
        "page": False,
        "ticket": False,
        "escalate": True,
    }
    assert out.payload.awaiting_approval is True


def test_no_approval_needed_means_the_plan_can_run() -> None:
    out = planned(decided(approval=("carrier.*",)), OUTAGE)
    assert not any(s.requires_approval for s in out.payload.steps)
    assert out.payload.awaiting_approval is False


def test_a_skipped_step_never_holds_the_plan() -> None:
    out = planned(decided(allowed=("notify.*",), approval=("ticket.*",)), OUTAGE)
    assert [s.step_id for s in out.payload.steps] == ["page"]
    assert out.payload.awaiting_approval is False


# ---------------------------------------------------------------------------------------- templating


def test_params_are_templated_with_every_placeholder() -> None:
    names = [
        "exception_id", "tenant_id", "severity", "category", "source", "error_type", "message",
        "fingerprint", "external_ref",
    ]  # fmt: skip
    templated = playbook(
        "all", None, step("s", "ticket", "create", **{name: f"<{{{name}}}>" for name in names})
    )
    event = decided(
        Severity.high,
        "payment_decline",
        source="payments",
        error_type="PaymentDeclined",
        message="Card declined",
        external_ref="ord-1",
    )
    params = planned(event, templated).payload.steps[0].params
    assert params == {
        "exception_id": "<exc-0001>",
        "tenant_id": "<acme>",
        "severity": "<high>",
        "category": "<payment_decline>",
        "source": "<payments>",
        "error_type": "<PaymentDeclined>",
        "message": "<Card declined>",
        "fingerprint": f"<{event.payload.context.fingerprint}>",
        "external_ref": "<ord-1>",
    }


def test_templating_reaches_into_nested_dicts_and_lists_and_leaves_other_values() -> None:
    params = {
        "summary": "{severity}: {source}",
        "labels": ["{category}", "fixed", ["{tenant_id}"]],
        "fields": {"ref": "{external_ref}", "count": 3, "urgent": True, "ratio": 0.5},
        "tags": ("{tenant_id}",),
    }
    values = {
        "severity": "high",
        "source": "payments",
        "category": "c",
        "tenant_id": "acme",
        "external_ref": "r",
    }
    assert render(params, values) == {
        "summary": "high: payments",
        "labels": ["c", "fixed", ["acme"]],
        "fields": {"ref": "r", "count": 3, "urgent": True, "ratio": 0.5},
        "tags": ("acme",),
    }


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{unknown} stays", "{unknown} stays"),
        ("{Tenant_Id} is case-sensitive", "{Tenant_Id} is case-sensitive"),
        ('{"json": true, "id": "{exception_id}"}', '{"json": true, "id": "exc-0001"}'),
        ("{{exception_id}}", "{exc-0001}"),
        ("{ exception_id }", "{ exception_id }"),
        ("unbalanced { and } and {", "unbalanced { and } and {"),
        ("{}", "{}"),
        ("${HOME}/x", "${HOME}/x"),
        ("100% {tenant_id}", "100% acme"),
    ],
)
def test_unknown_placeholders_and_literal_braces_are_kept(template: str, expected: str) -> None:
    out = planned(decided(), playbook("p", None, step("s", "ticket", "create", text=template)))
    assert out.payload.steps[0].params["text"] == expected


def test_values_from_the_exception_are_not_expanded_again() -> None:
    event = decided(message="Injected {tenant_id} and {exception_id}")
    out = planned(event, playbook("p", None, step("s", "ticket", "create", text="{message}")))
    assert out.payload.steps[0].params["text"] == "Injected {tenant_id} and {exception_id}"


def test_a_missing_external_ref_renders_as_empty_text() -> None:
    out = planned(
        decided(external_ref=None),
        playbook("p", None, step("s", "ticket", "create", ref="[{external_ref}]")),
    )
    assert out.payload.steps[0].params["ref"] == "[]"


def test_templating_does_not_change_the_configured_playbook() -> None:
    templated = playbook("p", None, step("s", "ticket", "create", labels=["{tenant_id}"]))
    planned(decided(), templated)
    assert templated.steps[0].params == {"labels": ["{tenant_id}"]}


# ---------------------------------------------------------------------------------------- the output


def test_context_is_carried_forward_unchanged() -> None:
    event = decided()
    assert planned(event, OUTAGE).payload.context == event.payload.context
    assert planned(event).payload.context == event.payload.context


def test_envelope_is_derived_from_the_input() -> None:
    event = factories.decided(tenant_id="globex", exception_id="exc-3")
    out = plan(event, [CATCH_ALL], NOW + timedelta(seconds=3))
    assert isinstance(out, ExceptionPlanned)
    assert out.event_id == derive_event_id(event.event_id, "playbook")
    assert out.sequence == event.sequence + 1
    assert out.causation_id == event.event_id
    assert out.correlation_id == event.correlation_id
    assert (out.tenant_id, out.exception_id) == ("globex", "exc-3")
    assert out.occurred_at == NOW + timedelta(seconds=3)
    again = plan(event, [OUTAGE], NOW)
    assert again is not None
    assert again.event_id == out.event_id
