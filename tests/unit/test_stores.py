"""Contract tests for the stores: every backend (dict and RocksDB) passes the same tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from rocksdict import Rdict

from app.stores import Decoded, MappingLedger, MappingProcessedStore
from schemas.events import StepResult

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@dataclass
class Backend:
    """One mapping to run the contract against; ``reopen`` closes it and returns a fresh handle on
    the same data (None for backends that do not persist)."""

    name: str
    mapping: Any
    reopen: Callable[[], Any] | None = None


@pytest.fixture(params=["memory", "rocksdb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        yield Backend("memory", {})
        return
    yield from _rocksdb(tmp_path)


@pytest.fixture
def persistent(tmp_path: Path) -> Iterator[Backend]:
    """Only RocksDB persists, so the reopen tests run against it alone."""
    yield from _rocksdb(tmp_path)


def _rocksdb(tmp_path: Path) -> Iterator[Backend]:
    path = str(tmp_path / "store")
    handles = [Rdict(path)]

    def reopen() -> Rdict:
        handles[-1].close()
        handles.append(Rdict(path))
        return handles[-1]

    yield Backend("rocksdb", handles[0], reopen)
    handles[-1].close()


def result(step_id: str = "s1", **detail: Any) -> StepResult:
    return StepResult(
        step_id=step_id,
        tool="tickets",
        action="open",
        idempotency_key=f"exc-1:event:{step_id}",
        status="succeeded",
        detail={"status": 201, "ticket_id": "T-1", **detail},
    )


# --------------------------------------------------------------------------- processed store


def test_unmarked_id_is_not_seen_and_marked_id_is(backend: Backend) -> None:
    store = MappingProcessedStore(backend.mapping)
    assert not store.seen("e1")
    store.mark("e1", T0)
    assert store.seen("e1")
    assert not store.seen("e2")


def test_marking_twice_keeps_one_entry_and_the_first_time(backend: Backend) -> None:
    store = MappingProcessedStore(backend.mapping)
    store.mark("e1", T0)
    store.mark("e1", T0 + timedelta(days=2))
    assert store.seen("e1")
    assert len(list(backend.mapping.keys())) == 1
    # Kept at the first mark: expiring just after it forgets the id despite the later re-mark.
    assert store.expire(T0 + timedelta(seconds=1)) == 1
    assert not store.seen("e1")


def test_processed_expire_removes_only_older_entries(backend: Backend) -> None:
    store = MappingProcessedStore(backend.mapping)
    store.mark("old-1", T0)
    store.mark("old-2", T0 + timedelta(minutes=1))
    store.mark("new", T0 + timedelta(hours=1))
    assert store.expire(T0 + timedelta(minutes=30)) == 2
    assert not store.seen("old-1")
    assert not store.seen("old-2")
    assert store.seen("new")
    assert store.expire(T0 + timedelta(minutes=30)) == 0


def test_processed_store_refuses_naive_timestamps(backend: Backend) -> None:
    store = MappingProcessedStore(backend.mapping)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.mark("e1", datetime(2025, 3, 1, 12, 0))  # noqa: DTZ001 - the point of the test
    assert not store.seen("e1")


# ------------------------------------------------------------------------------------ ledger


def test_ledger_get_of_unknown_key_is_none(backend: Backend) -> None:
    assert MappingLedger(backend.mapping).get("nope") is None


def test_ledger_round_trip_returns_an_equal_result(backend: Backend) -> None:
    ledger = MappingLedger(backend.mapping)
    stored = result(nested={"a": [1, 2.5, None, "x"]})
    ledger.put("k1", stored, T0)
    assert ledger.get("k1") == stored


def test_ledger_expire_removes_only_older_entries(backend: Backend) -> None:
    ledger = MappingLedger(backend.mapping)
    ledger.put("old", result("s1"), T0)
    ledger.put("new", result("s2"), T0 + timedelta(days=1))
    assert ledger.expire(T0 + timedelta(hours=1)) == 1
    assert ledger.get("old") is None
    assert ledger.get("new") == result("s2")


def test_ledger_compares_timestamps_across_timezones(backend: Backend) -> None:
    ledger = MappingLedger(backend.mapping)
    plus_two = timezone(timedelta(hours=2))
    # 13:00+02:00 is 11:00 UTC: older than T0 (12:00 UTC) although its wall clock reads later.
    ledger.put("k", result(), datetime(2025, 3, 1, 13, 0, tzinfo=plus_two))
    assert ledger.expire(T0) == 1
    assert ledger.get("k") is None


# ------------------------------------------------------------------------------- persistence


def test_processed_ids_survive_reopening(persistent: Backend) -> None:
    assert persistent.reopen is not None
    MappingProcessedStore(persistent.mapping).mark("e1", T0)
    reopened = MappingProcessedStore(persistent.reopen())
    assert reopened.seen("e1")
    # The mark time persisted too: expiry still works after the reopen.
    assert reopened.expire(T0 + timedelta(seconds=1)) == 1


def test_ledger_results_survive_reopening(persistent: Backend) -> None:
    assert persistent.reopen is not None
    MappingLedger(persistent.mapping).put("k1", result(), T0)
    reopened = MappingLedger(persistent.reopen())
    assert reopened.get("k1") == result()
    assert reopened.expire(T0 + timedelta(seconds=1)) == 1


# ------------------------------------------------------------------------------- in flight


def test_ledger_in_flight_marker_lifecycle(backend: Backend) -> None:
    ledger = MappingLedger(backend.mapping)
    assert ledger.in_flight("k") is None
    ledger.begin("k", T0)
    assert ledger.in_flight("k") == T0, "the marker says when the call began"
    assert ledger.get("k") is None, "an intent is not a result"
    ledger.put("k", result(), T0)
    assert ledger.in_flight("k") is None
    assert ledger.get("k") == result()
    ledger.abandon("k")  # a recorded result is never dropped by abandon
    assert ledger.get("k") == result()
    ledger.begin("k2", T0)
    ledger.abandon("k2")
    assert ledger.in_flight("k2") is None
    assert ledger.get("k2") is None


def test_decoded_values_are_kept_up_to_the_size_least_recently_used_out_first() -> None:
    decoded: Decoded[str, dict[str, int]] = Decoded(2, lambda: 0)
    decoded.put("a", {"n": 1})
    decoded.put("b", {"n": 2})
    assert decoded.get("a") == {"n": 1}  # "a" is now the most recently used
    decoded.put("c", {"n": 3})

    assert decoded.get("b") is None
    assert decoded.get("a") == {"n": 1}
    assert decoded.get("c") == {"n": 3}


def test_decoded_values_are_dropped_when_partitions_move() -> None:
    generation = [0]
    decoded: Decoded[str, str] = Decoded(10, lambda: generation[0])
    decoded.put("exception-1", "before the rebalance")

    generation[0] += 1  # a rebalance: recovery may have written another value into the table

    assert decoded.get("exception-1") is None
    decoded.put("exception-1", "after")
    assert decoded.get("exception-1") == "after"


def test_a_decoded_cache_of_size_zero_keeps_nothing() -> None:
    decoded: Decoded[str, str] = Decoded(0, lambda: 0)
    decoded.put("a", "x")
    assert decoded.get("a") is None


def test_a_discarded_value_is_read_from_the_table_again() -> None:
    decoded: Decoded[str, str] = Decoded(10, lambda: 0)
    decoded.put("a", "x")
    decoded.put("b", "y")

    decoded.discard("a")
    decoded.discard("never-put")

    assert decoded.get("a") is None
    assert decoded.get("b") == "y"
