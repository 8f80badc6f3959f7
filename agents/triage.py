"""Triage: give an accepted exception a severity and a category.

The pure core of the triage stage. Its agent consumes ``ExceptionAccepted``, optionally asks the
tenant's LLM for a :class:`~schemas.events.Classification` first (I/O stays in the agent, see
``agents/llm.py``), calls :func:`triage`, and sends the ``ExceptionTriaged`` on to policy. The rules
are the tenant's ``[[triage.rules]]``; they always decide when there is no usable LLM answer, so
triage never depends on the model being up.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from schemas.config import TriageConfig, TriageOutcome
from schemas.events import (
    Classification,
    ExceptionAccepted,
    ExceptionContext,
    ExceptionReport,
    ExceptionTriaged,
    Severity,
    TriagedPayload,
    follow,
)


def _by_rules(report: ExceptionReport, config: TriageConfig) -> tuple[TriageOutcome, str]:
    """The first rule that matches the report, in file order, else the tenant's default."""
    for rule in config.rules:
        if rule.match.matches(
            source=report.source,
            error_type=report.error_type,
            message=report.message,
            attributes=report.attributes,
        ):
            return rule.then, rule.id
    return config.default, "default"


def _allowed_category(category: str, allowed: tuple[str, ...]) -> str | None:
    """The configured spelling of ``category`` when the LLM may answer it (case-insensitively), so
    downstream policy and playbook matching see the tenant's own names; None when it may not."""
    if not allowed:
        return category
    wanted = category.lower()
    return next((name for name in allowed if name.lower() == wanted), None)


def triage(
    event: ExceptionAccepted,
    config: TriageConfig,
    now: datetime,
    classification: Classification | None = None,
) -> ExceptionTriaged:
    """Classify the exception: by the LLM's answer when one is given and acceptable, else by rules.

    An LLM answer is acceptable when ``config.llm.categories`` is empty or names its category; an
    answer outside that list is a model going off-script, so the rules decide and
    ``classifier_note`` records what the model said and why it was not used.
    """
    accepted = event.payload
    report = accepted.report
    severity: Severity
    classifier: Literal["rules", "llm"]
    note: str | None = None
    llm_category = (
        _allowed_category(classification.category, config.llm.categories)
        if classification is not None
        else None
    )
    if classification is not None and llm_category is not None:
        severity, category, rule_id = classification.severity, llm_category, "llm"
        classifier, note = "llm", classification.note
    else:
        outcome, rule_id = _by_rules(report, config)
        severity, category, classifier = outcome.severity, outcome.category, "rules"
        if classification is not None:
            note = (
                f"The LLM answered category {classification.category!r}, which is not one of "
                f"triage.llm.categories ({', '.join(config.llm.categories)}); "
                f"classified by rule {rule_id!r} instead."
            )
    context = ExceptionContext(
        report=report,
        fingerprint=accepted.fingerprint,
        is_repeat=accepted.is_repeat,
        occurrences_in_window=accepted.occurrences_in_window,
        severity=severity,
        category=category,
    )
    payload = TriagedPayload(
        context=context,
        severity=severity,
        category=category,
        rule_id=rule_id,
        classifier=classifier,
        classifier_note=note,
    )
    return follow(event, ExceptionTriaged, "triage", payload, now)
