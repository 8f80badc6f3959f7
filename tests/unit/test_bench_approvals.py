"""The bench's approvals phase (``--approvals``), its pure parts: the tenant rule that holds its
exceptions (and only those), the synthetic completions that grow the ``exceptions`` table, the
timed listing, the figures and the target. No broker, no processes, no wall-clock assertion."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from agents.policy import decide
from agents.triage import triage
from bench import workload
from schemas.codec import decode
from schemas.config import load_tenants
from schemas.events import Decision, ExceptionIngested
from tests import factories

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _decision(tmp_path: Path, value: bytes) -> Decision:
    """What the bench tenant's real triage and policy decide for one of the bench's events."""
    config = load_tenants(workload.write_config(tmp_path, None))[workload.TENANT]
    ingested = decode(value)
    assert isinstance(ingested, ExceptionIngested)
    accepted = factories.accepted(
        ingested.payload.report,
        tenant_id=ingested.tenant_id,
        exception_id=ingested.exception_id,
    )
    return decide(triage(accepted, config.triage, NOW), config.policy, NOW).payload.decision


def test_only_the_held_source_is_held_for_approval(tmp_path: Path) -> None:
    maker = workload.EventMaker("run1")
    # every other phase's events run to completion
    assert _decision(tmp_path, maker.make("thr", 1)[1]) == Decision.proceed
    held_key, held = maker.make("held", 1, source=workload.HELD_SOURCE)
    assert held_key == b"run1-held-000000001"
    event = decode(held)
    assert isinstance(event, ExceptionIngested) and event.payload.report.source == "held"
    assert _decision(tmp_path, held) == Decision.awaiting_approval


def test_held_exceptions_wait_longer_than_any_run(tmp_path: Path) -> None:
    config = load_tenants(workload.write_config(tmp_path, None))[workload.TENANT]
    (rule,) = config.policy.rules
    assert rule.then.approval_required_for == ("*",)
    assert rule.then.approval_timeout_seconds == workload.HELD_TIMEOUT_SECONDS >= 86_400
