"""Policy: decide whether a triaged exception may be acted on, and with which actions.

The pure core of the policy stage. Its agent consumes ``ExceptionTriaged``, calls :func:`decide`
with the tenant's ``[policy]`` configuration, and sends the ``ExceptionDecided`` on. Only a
``proceed`` decision leads to a plan at once (see ``agents/playbook.py``); ``suppressed`` ends the
chain here, and ``awaiting_approval`` holds it at the playbook stage until a person decides
(``agents/approval.py``).
The decision carries which tool actions the playbook may run and which need a human approval, so the
playbook stage needs no policy lookups.
"""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.config import Match, PolicyConfig, PolicyThen
from schemas.events import (
    DecidedPayload,
    Decision,
    ExceptionContext,
    ExceptionDecided,
    ExceptionTriaged,
    TriagedPayload,
    follow,
)


def _applies(match: Match, triaged: TriagedPayload) -> bool:
    """Whether ``match`` holds for the exception: triage's verdict plus the original report."""
    report = triaged.context.report
    return match.matches(
        source=report.source,
        error_type=report.error_type,
        message=report.message,
        attributes=report.attributes,
        severity=triaged.severity,
        category=triaged.category,
    )


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _listing(patterns: tuple[str, ...]) -> str:
    return ", ".join(patterns) if patterns else "nothing"


def decide(event: ExceptionTriaged, config: PolicyConfig, now: datetime) -> ExceptionDecided:
    """The tenant's decision for this exception, with a reason a person can read in the history.

    In order: a maintenance window that covers ``now`` and matches suppresses (planned work should
    not page anyone); otherwise the first matching ``[[policy.rules]]`` entry (else
    ``[policy.default]``) applies: it may suppress repeats of a fingerprint within the repeat
    window, hold every action for approval (``"*"`` in ``approval_required_for``), or let the
    playbook proceed with the allowed actions. A suppressed decision allows no actions.
    """
    triaged = event.payload
    context = triaged.context
    for window in config.maintenance_windows:
        if window.covers(now) and _applies(window.match, triaged):
            reason = (
                f"Suppressed by maintenance window {window.id!r} "
                f"({window.start.astimezone(UTC).isoformat()} to "
                f"{window.end.astimezone(UTC).isoformat()})."
            )
            return _decided(
                event, context, Decision.suppressed, reason, f"maintenance:{window.id}", None, now
            )

    then: PolicyThen = config.default
    policy_id = "default"
    for rule in config.rules:
        if _applies(rule.match, triaged):
            then, policy_id = rule.then, rule.id
            break

    if then.suppress_repeats and context.is_repeat:
        reason = (
            f"Suppressed by policy {policy_id!r}: a repeat of fingerprint {context.fingerprint} "
            f"({_ordinal(context.occurrences_in_window)} occurrence in the repeat window)."
        )
        return _decided(event, context, Decision.suppressed, reason, policy_id, None, now)
    timeout = then.approval_timeout_seconds or config.approval_timeout_seconds
    if "*" in then.approval_required_for:
        reason = (
            f"Policy {policy_id!r} requires a human approval before any action runs "
            f"(allowed once approved: {_listing(then.allowed_actions)})."
        )
        return _decided(
            event, context, Decision.awaiting_approval, reason, policy_id, then, now, timeout
        )
    reason = f"Policy {policy_id!r} allows {_listing(then.allowed_actions)}"
    if then.approval_required_for:
        reason += f"; approval is required for {_listing(then.approval_required_for)}"
    return _decided(event, context, Decision.proceed, reason + ".", policy_id, then, now, timeout)


def _decided(
    event: ExceptionTriaged,
    context: ExceptionContext,
    decision: Decision,
    reason: str,
    policy_id: str,
    then: PolicyThen | None,
    now: datetime,
    approval_timeout_seconds: int | None = None,
) -> ExceptionDecided:
    payload = DecidedPayload(
        context=context,
        decision=decision,
        reason=reason,
        policy_id=policy_id,
        allowed_actions=then.allowed_actions if then is not None else (),
        approval_required_for=then.approval_required_for if then is not None else (),
        # only a decision that can hold something carries how long it may wait
        approval_timeout_seconds=approval_timeout_seconds if then is not None else None,
    )
    return follow(event, ExceptionDecided, "policy", payload, now)
