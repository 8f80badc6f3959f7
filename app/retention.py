"""Retention of closed exceptions: what the projection deletes, and how far it has looked.

The ``exceptions`` table holds one record per exception (its state and whole history, about 2-5 KiB),
and nothing else ever removes one. So that a worker's tables stay bounded however long it runs, an
exception that reached a final status (:data:`CLOSED`) and saw no event for
``SLUICE_EXCEPTION_RETENTION_SECONDS`` is deleted, with a tombstone in the table's changelog.

The projection looks at a slice of a partition's store at a time (:class:`Sweep`), from where it
stopped the last time, and at most once per ``SLUICE_EXCEPTION_SWEEP_SECONDS`` per partition, so the
scan costs a few milliseconds now and then instead of one long stall. An exception that is open, in
quarantine or holding parked events is never deleted, whatever its age.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import orjson

from app.rocks import AtMostEvery

# Statuses after which no stage emits anything more for the exception (schemas.state.fold).
CLOSED = frozenset(
    {"resolved", "failed", "no_action", "suppressed", "discarded", "rejected", "approval_expired"}
)

# Faust keeps each partition's changelog offset in the store, under this key.
OFFSET_KEY = b"__faust\x00offset__"


def expired(raw: bytes, cutoff: datetime) -> bool:
    """Whether a stored ExceptionRecord is closed and last changed before ``cutoff``. A value that
    does not read as one is kept: the sweep runs inside the projection's batches, and one odd record
    must neither stop them nor be deleted on a guess."""
    try:
        state = orjson.loads(raw)["state"]
        return bool(
            state["status"] in CLOSED
            and not state.get("quarantine")
            and not state.get("parked")
            and datetime.fromisoformat(state["updated_at"]) < cutoff
        )
    except (orjson.JSONDecodeError, LookupError, TypeError, ValueError, AttributeError):
        return False


def scan(
    items: Iterator[tuple[bytes, bytes]], cutoff: datetime, limit: int
) -> tuple[list[bytes], bytes | None]:
    """Look at up to ``limit`` records of ``items`` (a store's, in key order): the keys of the
    expired ones, and the key to start from next time (None once the end is reached)."""
    found: list[bytes] = []
    for key, raw in itertools.islice(items, limit):
        if key != OFFSET_KEY and expired(raw, cutoff):
            found.append(key)
    following = next(items, None)
    return found, None if following is None else following[0]


@dataclass
class Sweep:
    """Per partition, when it was last swept and where the next slice starts."""

    interval: float
    limit: int = 250
    cursors: dict[int, bytes | None] = field(default_factory=dict)
    _due: AtMostEvery = field(init=False)

    def __post_init__(self) -> None:
        self._due = AtMostEvery(self.interval)

    def due(self, partition: int) -> bool:
        return self._due.due(partition)

    def start(self, partition: int) -> bytes | None:
        return self.cursors.get(partition)

    def slice(
        self, partition: int, items: Iterable[tuple[bytes, bytes]], cutoff: datetime
    ) -> list[bytes]:
        """The expired keys of the next slice of ``items`` (the partition's store from
        :meth:`start`), remembering where the slice after it starts."""
        found, self.cursors[partition] = scan(iter(items), cutoff, self.limit)
        return found
