"""The projection's fold: history entries built without a second validation are the same entries."""

from __future__ import annotations

from datetime import UTC, datetime

from api import ingest
from schemas.api import ExceptionCreate
from schemas.state import ExceptionRecord, HistoryEntry, apply, entry_of
from tests.unit.api.conftest import report


def test_an_entry_built_from_an_event_equals_the_validated_entry_and_round_trips() -> None:
    body = ExceptionCreate.model_validate(report())
    event = ingest.build_event(
        "acme",
        "exc-1",
        body,
        body_hash=ingest.request_hash(body),
        idempotency_key="key-1",
        now=datetime(2026, 1, 15, 9, 30, tzinfo=UTC),
    )

    entry = entry_of(event)
    validated = HistoryEntry.model_validate(entry.model_dump())

    assert entry == validated
    assert entry.model_dump_json() == validated.model_dump_json()
    record = apply(None, event)
    assert record is not None
    stored = ExceptionRecord.model_validate_json(record.model_dump_json())
    assert stored == record
    assert stored.history[0].payload["report"]["message"] == body.message
