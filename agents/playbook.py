"""Playbook: turn a ``proceed`` decision into an ordered list of tool steps.

The pure core of the playbook stage. Its agent consumes ``ExceptionDecided``, calls :func:`plan`
with the tenant's ``[[playbooks]]``, and sends the ``ExceptionPlanned`` to the tool stage
(``agents/tool.py``), which runs the steps. Policy has already said which ``tool.action`` pairs may
run and which need a human approval; this stage applies that to the chosen playbook, so a step
policy forbids is recorded as skipped (visible in the history) rather than silently dropped, and
fills in the steps' parameter templates with what is known about the exception.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from schemas.config import Playbook, StepConfig
from schemas.events import (
    Decision,
    ExceptionDecided,
    ExceptionPlanned,
    PlannedPayload,
    PlannedStep,
    SkippedStep,
    follow,
)

# A placeholder is a name in single braces; anything else in braces (JSON, "{{", "{unknown}") stays.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _any_glob(value: str, patterns: Sequence[str]) -> bool:
    """Whether ``value`` matches one of ``patterns`` (shell globs, case-insensitive, like Match)."""
    low = value.lower()
    return any(fnmatch.fnmatchcase(low, p.lower()) for p in patterns)


def _template_values(event: ExceptionDecided) -> dict[str, str]:
    """What a parameter template may refer to. A missing value (no external_ref) is empty text, so a
    ticket never shows a raw ``{external_ref}``."""
    context = event.payload.context
    report = context.report
    return {
        "exception_id": event.exception_id,
        "tenant_id": event.tenant_id,
        "severity": context.severity.value if context.severity is not None else "",
        "category": context.category or "",
        "source": report.source,
        "error_type": report.error_type,
        "message": report.message,
        "fingerprint": context.fingerprint,
        "external_ref": report.external_ref or "",
    }


def render(value: Any, values: dict[str, str]) -> Any:
    """``value`` with ``{name}`` placeholders filled in, in strings nested at any depth in dicts and
    lists; other values are returned as they are.

    Substitution is a single pass: text that comes from the exception (a message containing
    ``{tenant_id}``) is inserted verbatim, never expanded again. An unknown name is left as written,
    so a typo shows up in the ticket instead of failing the stage.
    """
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {key: render(item, values) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(render(item, values) for item in value)
    return value


def _choose(event: ExceptionDecided, playbooks: Sequence[Playbook]) -> Playbook | None:
    """The first playbook, in file order, whose match holds for the exception."""
    decided = event.payload
    context = decided.context
    report = context.report
    for playbook in playbooks:
        if playbook.match.matches(
            source=report.source,
            error_type=report.error_type,
            message=report.message,
            attributes=report.attributes,
            severity=context.severity,
            category=context.category,
        ):
            return playbook
    return None


def plan(
    event: ExceptionDecided, playbooks: Sequence[Playbook], now: datetime, approved: bool = False
) -> ExceptionPlanned | None:
    """The plan for a ``proceed`` decision; None for any other decision (the chain stops at policy).

    ``approved`` plans an ``awaiting_approval`` decision as a person's approval lets it run: as
    proceed, with no step waiting for another approval (the playbook stage shows that plan while
    the exception is held, and emits it once approved).

    No matching playbook gives a plan with ``playbook_id`` "none" and no steps, so the history still
    says that nothing was planned. A step whose ``tool.action`` the decision does not allow is
    skipped with a reason; a step matching ``approval_required_for`` needs approval, and one such
    step holds the whole plan (``awaiting_approval``), since later steps may depend on it.
    """
    decided = event.payload
    runnable = (Decision.proceed, Decision.awaiting_approval) if approved else (Decision.proceed,)
    if decided.decision not in runnable:
        return None
    timeout = decided.approval_timeout_seconds
    playbook = _choose(event, playbooks)
    if playbook is None:
        payload = PlannedPayload(
            context=decided.context,
            playbook_id="none",
            approval_timeout_seconds=timeout,
            policy_id=decided.policy_id,
        )
        return follow(event, ExceptionPlanned, "playbook", payload, now)

    values = _template_values(event)
    steps: list[PlannedStep] = []
    skipped: list[SkippedStep] = []
    for step in playbook.steps:
        action = f"{step.tool}.{step.action}"
        if not _any_glob(action, decided.allowed_actions):
            skipped.append(SkippedStep(step_id=step.id, reason=_not_allowed(action, event)))
            continue
        needs = not approved and _any_glob(action, decided.approval_required_for)
        steps.append(_planned(step, values, needs))
    payload = PlannedPayload(
        context=decided.context,
        playbook_id=playbook.id,
        steps=tuple(steps),
        skipped=tuple(skipped),
        awaiting_approval=any(s.requires_approval for s in steps),
        approval_timeout_seconds=timeout,
        policy_id=decided.policy_id,
    )
    return follow(event, ExceptionPlanned, "playbook", payload, now)


def _planned(step: StepConfig, values: dict[str, str], requires_approval: bool) -> PlannedStep:
    return PlannedStep(
        step_id=step.id,
        tool=step.tool,
        action=step.action,
        params=render(step.params, values),
        requires_approval=requires_approval,
    )


def _not_allowed(action: str, event: ExceptionDecided) -> str:
    decided = event.payload
    allowed = ", ".join(decided.allowed_actions) or "nothing"
    return f"{action} is not allowed by policy {decided.policy_id!r} (allowed: {allowed})."
