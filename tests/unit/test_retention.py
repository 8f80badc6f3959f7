"""Retention of closed exceptions: which stored records are deleted, and how a partition is walked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from app.retention import OFFSET_KEY, Sweep, expired, scan

CUTOFF = datetime(2026, 11, 1, tzinfo=UTC)
OLD = (CUTOFF - timedelta(seconds=1)).isoformat()
NEW = (CUTOFF + timedelta(seconds=1)).isoformat()


def record(status: str, updated_at: str = OLD, **state: Any) -> bytes:
    """A stored ExceptionRecord, reduced to the fields retention reads (and a history)."""
    body = {"status": status, "updated_at": updated_at, "quarantine": None, "parked": 0, **state}
    return orjson.dumps({"state": body, "history": [{"event_type": "ExceptionIngested"}]})


@pytest.mark.parametrize("status", ["resolved", "failed", "no_action", "suppressed", "discarded"])
def test_a_closed_exception_unchanged_since_before_the_cutoff_has_expired(status: str) -> None:
    assert expired(record(status), CUTOFF)


def test_a_closed_exception_changed_after_the_cutoff_is_kept() -> None:
    assert not expired(record("resolved", NEW), CUTOFF)


@pytest.mark.parametrize(
    "status", ["received", "in_progress", "awaiting_approval", "dead_lettered"]
)
def test_an_open_exception_is_kept_however_old(status: str) -> None:
    assert not expired(record(status), CUTOFF)


def test_a_closed_exception_still_in_quarantine_or_holding_parked_events_is_kept() -> None:
    quarantine = {"stage": "tool", "error_class": "transient"}
    assert not expired(record("failed", quarantine=quarantine), CUTOFF)
    assert not expired(record("failed", parked=2), CUTOFF)


def test_timestamps_in_another_offset_compare_as_instants() -> None:
    # 2026-10-31T23:59:59-01:00 reads as before the cutoff's day, but is 00:59:59 UTC: after it.
    later = (CUTOFF + timedelta(minutes=59, seconds=59)).astimezone(timezone(timedelta(hours=-1)))
    assert later.isoformat() == "2026-10-31T23:59:59-01:00"

    assert not expired(record("resolved", later.isoformat()), CUTOFF)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"history": []}',
        b'{"state": {"status": "resolved"}}',
        b'{"state": {"status": "resolved", "updated_at": "yesterday"}}',
        b'{"state": {"status": "resolved", "updated_at": "2026-10-01T00:00:00"}}',  # naive
        b'{"state": {"status": ["resolved"], "updated_at": "2026-10-01T00:00:00Z"}}',
    ],
)
def test_a_value_that_does_not_read_as_a_record_is_kept_without_an_error(raw: bytes) -> None:
    assert not expired(raw, CUTOFF)


def _store(records: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return sorted(records.items())


def test_a_scan_looks_at_most_at_its_limit_and_says_where_to_go_on() -> None:
    items = _store(
        {
            b"a": record("resolved"),
            b"b": record("in_progress"),
            b"c": record("resolved"),
            b"d": record("resolved"),
        }
    )

    found, following = scan(iter(items), CUTOFF, limit=3)

    assert found == [b"a", b"c"]
    assert following == b"d"


def test_a_scan_that_reaches_the_end_starts_over_next_time() -> None:
    items = _store({b"a": record("resolved"), b"b": record("resolved", NEW)})

    assert scan(iter(items), CUTOFF, limit=5) == ([b"a"], None)


def test_faust_s_offset_entry_is_never_taken_for_a_record() -> None:
    items = _store({OFFSET_KEY: b"1234", b"a": record("resolved")})

    assert scan(iter(items), CUTOFF, limit=5) == ([b"a"], None)


def test_a_sweep_walks_each_partition_in_slices_and_wraps_around() -> None:
    store = {
        0: _store({b"a": record("resolved"), b"b": record("resolved"), b"c": record("resolved")}),
        1: _store({b"x": record("resolved")}),
    }
    sweep = Sweep(interval=10.0, limit=2)

    def from_cursor(partition: int) -> list[tuple[bytes, bytes]]:
        start = sweep.start(partition)
        return [kv for kv in store[partition] if start is None or kv[0] >= start]

    assert sweep.slice(0, from_cursor(0), CUTOFF) == [b"a", b"b"]
    assert sweep.slice(1, from_cursor(1), CUTOFF) == [b"x"]
    assert sweep.slice(0, from_cursor(0), CUTOFF) == [b"c"]
    assert sweep.slice(0, from_cursor(0), CUTOFF) == [b"a", b"b"]  # from the start again


def test_a_partition_is_swept_at_most_once_per_interval() -> None:
    sweep = Sweep(interval=3600.0)

    assert sweep.due(0)
    assert not sweep.due(0)
    assert sweep.due(1)
