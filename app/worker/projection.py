"""The projection: every event of an exception's history folded into its record in ``exceptions``.

The fold itself is pure (:func:`schemas.state.apply`). Here it runs a batch at a time: each
exception's record is read and validated once per batch, every event of the batch applied to it in
memory, and the result written once when the batch is flushed, under the last event that changed it
(whose partition is the exception's). Nothing is acked before the write, so a crash loses no event:
the batch is redelivered and the fold ignores the event ids a record already holds. Retention of
closed exceptions (:mod:`app.retention`) runs from the same writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, MutableMapping
from datetime import timedelta
from typing import Any

import orjson

from app.retention import Sweep
from app.stores import BytesMapping, Decoded, stored
from app.telemetry import Metrics
from app.worker.audit import audit_entry
from app.worker.items import Item, Output, StageError
from app.worker.ports import Changelog, Clock
from schemas.events import Event, ExceptionCompleted
from schemas.state import ExceptionRecord, apply

log = logging.getLogger("sluice.pipeline")

# A partition's stored (key, value) pairs in key order, from a key (None: the first).
Scan = Callable[[int, bytes | None], Iterable[tuple[bytes, bytes]]]


class Projection:
    """The projection stage's handler (:meth:`handle`) and its batch of folded records."""

    def __init__(
        self,
        *,
        exceptions: MutableMapping[bytes, bytes],
        fingerprints: BytesMapping,
        changelog: Changelog,
        clock: Clock,
        metrics: Metrics,
        written: Decoded[bytes, ExceptionRecord],
        retention_seconds: int = 0,
        sweep: Sweep | None = None,
        scan: Scan | None = None,
        audit: MutableMapping[str, bytes] | None = None,
    ) -> None:
        self.exceptions = exceptions
        self.fingerprints = fingerprints
        self.changelog = changelog
        self.clock = clock
        self.metrics = metrics
        self.records: dict[bytes, tuple[ExceptionRecord, Item | None]] = {}
        self.written = written  # the values last written, kept decoded
        self.retention_seconds = retention_seconds
        self.sweep = sweep
        self.scan = scan
        self.audit = audit  # event id -> the audit entry of an operator's action (app.worker.audit)
        self.entries: dict[str, tuple[dict[str, Any], Item | None]] = {}

    async def handle(self, event: Event, redriven: bool = False) -> list[Output]:
        key = event.exception_id.encode()
        record = self.get(key)
        if record is not None and record.state.tenant_id != event.tenant_id:
            raise StageError(
                f"event {event.event_id} claims tenant {event.tenant_id!r} for exception "
                f"{event.exception_id}, which belongs to another tenant; refusing to merge them"
            )
        updated = apply(record, event)
        if updated is not None:
            self.records[key] = (updated, self.changelog.bound())
            entry = audit_entry(event) if self.audit is not None else None
            if entry is not None:
                self.entries[entry["event_id"]] = (entry, self.changelog.bound())
            if isinstance(event, ExceptionCompleted):
                received = updated.state.received_at
                self.metrics.end_to_end((event.occurred_at - received).total_seconds())
        return []

    def get(self, key: bytes) -> ExceptionRecord | None:
        if key in self.records:
            return self.records[key][0]
        record = self.written.get(key)
        if record is not None:
            return record
        raw = stored(self.exceptions, key)
        return ExceptionRecord.model_validate_json(raw) if raw else None

    def discard(self) -> None:
        """Forget the batch's folds (the batch was abandoned and comes again)."""
        self.records.clear()
        self.entries.clear()

    def write(self) -> None:
        """Write the batch's folded records, each to its own event's changelog partition."""
        partitions: dict[int, Item] = {}
        for key, (record, item) in self.records.items():
            if item is not None:
                self.changelog.bind(item)
                partitions[item.partition] = item
            self.exceptions[key] = record.model_dump_json().encode()
            self.written.put(key, record)
        self.records.clear()
        for event_id, (entry, item) in self.entries.items():
            if item is not None:
                self.changelog.bind(item)
            assert self.audit is not None  # noqa: S101 - only filled when there is one
            self.audit[event_id] = orjson.dumps(entry)
        self.entries.clear()
        if self.retention_seconds and self.sweep is not None and self.scan is not None:
            for partition, item in partitions.items():
                if self.sweep.due(partition):
                    self.expire(partition, item)

    def expire(self, partition: int, item: Item) -> None:
        """Delete the closed exceptions past retention in the next slice of ``partition``'s store
        (app.retention), with their first-report fingerprints; ``item`` is one of the batch's from
        that partition, so the tombstones go to its changelog partition. Like every table write of
        the batch, they are acknowledged by Kafka before the batch is acked."""
        assert self.sweep is not None and self.scan is not None  # noqa: S101 - write() checked
        cutoff = self.clock() - timedelta(seconds=self.retention_seconds)
        start = self.sweep.start(partition)
        expired = self.sweep.slice(partition, self.scan(partition, start), cutoff)
        if not expired:
            return
        self.changelog.bind(item)
        for key in expired:
            del self.exceptions[key]
            self.written.discard(key)
            exception_id = key.decode()
            if exception_id in self.fingerprints:
                del self.fingerprints[exception_id]
        self.metrics.expired(len(expired))
        log.info(
            "retention: deleted %d closed exceptions unchanged for %ss from partition %d",
            len(expired),
            self.retention_seconds,
            partition,
        )
