"""The Faust shell around the pure stages: topics, tables and one thin agent per stage.

Every agent runs the same loop (:class:`StageRunner`) over a batch of the records already fetched:
for each record, decode it, drop an input event id the stage has already processed and call the
stage's pure function (agents/*.py); then send the batch's output events and wait for the broker's
ack of every one, and only then mark the inputs as processed and ack them. That order is what makes
at-least-once delivery plus idempotency tables effectively-once:

- a crash before the outputs are acked leaves the input unmarked and uncommitted, so it is processed
  again and re-emits outputs with the same derived event ids, which the next stage drops;
- a crash after the mark was written to the changelog but before the offset commit redelivers the
  input, and the mark drops it: its outputs were already acked.

Faust acks an event whose agent raised and never retries it, so nothing may escape the loop: poison
records and failures go to the stage's DLQ topic with the raw bytes and the cause in headers, and a
send that fails is retried until it succeeds (the partition waits; nothing is skipped).

Agents run with concurrency=1: higher concurrency can commit past an in-flight event and breaks
per-key order (faust-streaming#606, robinhood/faust#422).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import time
import traceback
import uuid
import weakref
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import faust
import httpx
import orjson
from faust.streams import _current_event, current_event
from mode import BaseSignalT
from opentelemetry.context import Context

from agents.intake import FingerprintGroup, group, group_key, intake
from agents.llm import LLMClassifier
from agents.playbook import plan
from agents.policy import decide
from agents.tool import RetryPolicy, backoff_delay, execute
from agents.tools import Tool, ToolError, build_tools
from agents.triage import triage
from app.faust_app import app, settings, topics
from app.faust_worker import take_batches
from app.retention import Sweep
from app.rocks import Store
from app.stores import Decoded, MappingLedger, MappingProcessedStore, ProcessedStore
from app.telemetry import (
    SpanHandle,
    dead_letter_event,
    metrics,
    process_span,
    redrive_event,
    retry_event,
    start_send_span,
)
from schemas.codec import PoisonEvent, decode, encode
from schemas.config import TenantConfig, load_tenants
from schemas.events import (
    SLUICE_NAMESPACE,
    DeadLetteredPayload,
    Event,
    EventBase,
    ExceptionAccepted,
    ExceptionCompleted,
    ExceptionDeadLettered,
    ExceptionDecided,
    ExceptionDiscardRequested,
    ExceptionFingerprinted,
    ExceptionIngested,
    ExceptionParked,
    ExceptionPlanned,
    ExceptionQuarantineLifted,
    ExceptionRedriveRequested,
    ExceptionTriaged,
    ParkedPayload,
    QuarantineLiftedPayload,
    derive_event_id,
    follow,
)
from schemas.state import ExceptionRecord, apply

log = logging.getLogger("sluice.pipeline")

TENANTS: dict[str, TenantConfig] = load_tenants(settings.config_dir)


class StageError(Exception):
    """A failure processing one event. ``error_class`` is permanent (retrying the same input cannot
    help: wrong event type, unknown tenant) or transient (it might succeed later)."""

    def __init__(
        self,
        message: str,
        error_class: str = "permanent",
        kind: str = "stage_error",
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.kind = kind
        self.attempts = attempts


def now() -> datetime:
    return datetime.now(UTC)


def tenant(event: EventBase) -> TenantConfig:
    config = TENANTS.get(event.tenant_id)
    if config is None:
        raise StageError(
            f"tenant {event.tenant_id!r} has no configuration in {settings.config_dir}/tenants; "
            "add the tenant's TOML file, restart the workers and redrive the event"
        )
    return config


E = TypeVar("E", bound=EventBase)


def expect(event: Event, cls: type[E], stage: str) -> E:
    if not isinstance(event, cls):
        raise StageError(f"the {stage} stage reads {cls.__name__} events, got {event.event_type}")
    return event


# ------------------------------------------------------------------------------------------ topics


def _topic(name: str) -> faust.TopicT:
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        value_serializer="raw",
        partitions=settings.partitions,
        internal=True,
    )


ingested_topic = _topic(topics.ingested)
fingerprinted_topic = _topic(topics.fingerprinted)
accepted_topic = _topic(topics.accepted)
triaged_topic = _topic(topics.triaged)
decided_topic = _topic(topics.decided)
planned_topic = _topic(topics.planned)
completed_topic = _topic(topics.completed)
operations_topic = _topic(topics.operations)
history_topic = app.topic(
    *topics.history(), key_type=bytes, value_type=bytes, value_serializer="raw"
)

# ------------------------------------------------------------------------------------------ tables

_TTL_MS = settings.processed_ttl_seconds * 1000
# Idempotency and ledger entries expire: locally through RocksDB's TTL, and in the changelog through
# time retention (compaction alone would keep every key forever and restore it on recovery).
_EXPIRING = {"cleanup.policy": "compact,delete", "retention.ms": str(_TTL_MS)}


def _rocksdb(**extra: Any) -> dict[str, Any]:
    """The options of one table's RocksDB stores (a fresh dict: Faust pops keys out of it).

    A worker opens one RocksDB instance per table and partition (88 at the default 8 partitions).
    Their memory is bounded in app.rocks (the app's store): one cache and one memtable budget for all of them. These
    are each instance's own: memtable size and count, and open files (settings.table_*)."""
    return {
        "driver": "rocksdict",
        "write_buffer_size": settings.table_write_buffer_kib * 1024,
        "max_write_buffer_number": 2,
        "max_open_files": settings.table_max_open_files,
        **extra,
    }


# The changelog writes of the batch a stage is processing (each agent runs in its own task, so each
# sees its own list). A batch is acked only once all of them are acknowledged by Kafka: Faust's own
# flush before an offset commit gives up after 0.1 s without a send (ProducerBuffer.flush_atmost), so
# a commit could pass an input whose table write never reached the changelog, and after a crash the
# recovery from the changelog would then bring back the value before that write.
_batch_writes: ContextVar[list[asyncio.Future[Any]] | None] = ContextVar(
    "sluice_batch_writes", default=None
)


def stored(table: Any, key: Any) -> Any:
    """``table.get(key)`` for keys that are mostly absent (quarantines, first reports, new
    exceptions): Faust answers a missing key by raising KeyError through several frames, which a
    profile of the worker put among its ten costliest lines, while ``in`` answers it with one
    lookup. A key that is there costs two lookups instead of one."""
    return table[key] if key in table else None  # noqa: SIM401 - the point, see above


class AckedTable(faust.Table):
    """A table whose changelog writes can be awaited: those of the current batch (see
    :data:`_batch_writes`), and the latest one (the tool ledger's in-flight marker must be
    acknowledged by Kafka before the tool is called, or a crash could forget the call)."""

    last_write: asyncio.Future[Any] | None = None

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        fut = super().send_changelog(*args, **kwargs)
        self.last_write = fut
        writes = _batch_writes.get()
        if writes is not None:
            writes.append(fut)
        return fut


def _add(name: str, **kwargs: Any) -> Any:
    return app.tables.add(AckedTable(app, name=name, beacon=app.tables.beacon, **kwargs))


def _expiring_table(name: str) -> Any:
    """An expiring str -> bytes table."""
    return _add(
        name,
        key_type=str,
        value_type=bytes,
        options=_rocksdb(ttl=settings.processed_ttl_seconds),
        extra_topic_configs=_EXPIRING,
    )


def _table(name: str, key_type: type = str) -> Any:
    return _add(name, key_type=key_type, value_type=bytes, options=_rocksdb())


exceptions_table = _table("exceptions", key_type=bytes)  # exception id -> ExceptionRecord JSON
fingerprints_table = _table("exception-fingerprints")  # exception id -> fingerprint of 1st report
groups_table = _expiring_table("fingerprint-groups")  # tenant:fingerprint -> group + recent outputs


# idempotency key -> StepResult or an in-flight marker
ledger_table = _expiring_table("tool-ledger")
quarantine_table = _table("quarantine")  # <stage>:<exception id> -> dead letter + parked items


# ---------------------------------------------------------------------------------------- runner

Output = tuple[faust.TopicT, bytes, EventBase]
OperatorRequest = (ExceptionRedriveRequested, ExceptionDiscardRequested)
Handler = Callable[[Event, bool], Awaitable[list[Output]]]

PROJECTION = "projection"  # the stage that folds every topic's events into exception records

# Failures worth retrying in place: the network or a dependency, not the event itself.
TRANSIENT = (OSError, TimeoutError, httpx.TransportError, ToolError)


@dataclass
class StageStats:
    processed: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    parked: int = 0
    redriven: int = 0
    discarded: int = 0
    emitted: int = 0
    last_event_at: float | None = None


STATS: dict[str, StageStats] = {}


@dataclass(frozen=True)
class Item:
    """One input record as the stage saw it: live from Kafka, or replayed from the quarantine."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int
    timestamp: float | None
    attempts: int = 0  # failed attempts before this one (kept across redrives)
    first_failure_at: str | None = None
    headers: tuple[tuple[str, bytes], ...] = ()  # trace context: a replay joins the original trace

    @classmethod
    def of(cls, record: faust.EventT) -> Item:
        msg = record.message
        raw: Any = msg.headers.items() if isinstance(msg.headers, dict) else (msg.headers or ())
        headers = tuple(
            (str(k), v if isinstance(v, bytes) else str(v).encode())
            for k, v in raw
            if k in ("traceparent", "tracestate")
        )
        return cls(
            msg.key,
            msg.value or b"",
            msg.topic,
            msg.partition,
            msg.offset,
            msg.timestamp,
            headers=headers,
        )

    def span(self, stage: str) -> AbstractContextManager[SpanHandle]:
        return process_span(
            stage, self.topic, self.partition, self.offset, self.key, app.conf.id, self.headers
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "key": _b64(self.key),
            "value": _b64(self.value),
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp,
            "attempts": self.attempts,
            "first_failure_at": self.first_failure_at,
            "headers": [[k, v.decode()] for k, v in self.headers],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Item:
        return cls(
            key=_unb64(data["key"]),
            value=_unb64(data["value"]) or b"",
            topic=data["topic"],
            partition=data["partition"],
            offset=data["offset"],
            timestamp=data["timestamp"],
            attempts=data["attempts"],
            first_failure_at=data["first_failure_at"],
            headers=tuple((k, v.encode()) for k, v in data.get("headers", ())),
        )


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(data: str | None) -> bytes | None:
    return None if data is None else base64.b64decode(data)


class DeadLetter(Exception):
    """Raised inside the runner to route the current item to the DLQ."""

    def __init__(self, error_class: str, kind: str, message: str, attempts: int) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.kind = kind
        self.message = message
        self.attempts = attempts


Outgoing = tuple[faust.TopicT, bytes | None, bytes | None, Context | None]


@dataclass
class _Pending:
    """A batch's outputs (with the trace context of the span that made each) and the input event
    ids to mark processed once every output is acked."""

    outgoing: list[Outgoing] = field(default_factory=list)
    marks: list[tuple[faust.EventT, str]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)

    def add(self, outgoing: list[Outgoing], record: faust.EventT, event_id: str) -> None:
        self.outgoing.extend(outgoing)
        self.marks.append((record, event_id))
        self.ids.add(event_id)


@dataclass
class StageRunner:
    """The loop every stage agent runs; see the module docstring for the order of its steps.

    Ordered quarantine: when an exception's event is dead-lettered at this stage, the exception is
    quarantined here (table ``quarantine``, key ``<stage>:<exception id>``) and its later events at
    this stage are parked behind the dead letter, in order, while other exceptions keep flowing. An
    operator's ExceptionRedriveRequested (or ExceptionDiscardRequested) arrives on this stage's input
    topic with the same key, so it is handled in order too: the dead-lettered event is processed
    again (or dropped), then the parked ones in their original order, and the quarantine is lifted.
    """

    name: str
    handler: Handler
    processed: ProcessedStore
    dlq: faust.TopicT
    stats: StageStats = field(default_factory=StageStats)
    on_flush: Callable[[], None] | None = None  # the projection writes its folded records here
    on_discard: Callable[[], None] | None = None  # ... and forgets them here
    _pending: _Pending = field(default_factory=lambda: _Pending(), init=False, repr=False)

    def __post_init__(self) -> None:
        STATS[self.name] = self.stats

    async def run(self, stream: faust.StreamT[bytes]) -> None:
        # Records are taken in batches (app.faust_worker.take_batches): whatever is already fetched
        # (up to worker_batch_max) is processed in order, the batch's outputs are sent together and
        # their acks awaited once, and only then are the inputs marked processed and acked.
        #
        # Acks are manual: a batch is acked only if no rebalance happened while it was taken or
        # processed. Faust clears its buffers on a rebalance, and an ack arriving after that could
        # let it commit past the cleared (never processed) events of a partition whose committed
        # offset it has not recorded yet; unacked, the events are simply delivered again.
        async for generation, records in take_batches(
            stream, settings.worker_batch_max, _rebalance_count
        ):
            if drain.draining:
                await drain.stopped.wait()  # shutting down: leave them unacked for redelivery
            # A batch taken across a rebalance is not acked: its records are fetched again from
            # the committed offsets (app/consumer.py) by whichever worker owns them now.
            drain.in_flight += 1
            try:
                await self.process(records, generation)
                if rebalances.count == generation:
                    for taken in records:
                        taken.ack()
            finally:
                drain.in_flight -= 1
                if drain.in_flight == 0:
                    drain.idle.set()

    async def process(self, records: list[faust.EventT], generation: int) -> None:
        """Handle a batch of records in order, then send its outputs and write its marks.

        A rebalance during the batch ends it early: the rest of its records may belong to another
        worker by now, which fetches them again, and handling them here as well would widen the
        window in which both call the same tool."""
        self._pending = _Pending()
        token = _batch_writes.set([])
        try:
            for record in records:
                if rebalances.count != generation:
                    break
                # Table writes go to the changelog partition of the event being handled.
                _current_event.set(weakref.ref(record))
                item = Item.of(record)
                with item.span(self.name) as span:
                    await self.handle(item, span=span, batched=True)
            await self.flush()
        except BaseException:
            # Nothing of an unfinished batch is kept: its records are unacked and come again.
            self._pending = _Pending()
            if self.on_discard is not None:
                self.on_discard()
            raise
        finally:
            _batch_writes.reset(token)

    async def flush(self) -> None:
        """Send the pending outputs, wait for every ack, then mark their inputs processed, and wait
        until Kafka has acknowledged every table write made so far (marks included).

        Called at the end of a batch, and before anything that sends on its own (a dead letter, a
        parked event, an operator's request), so what an exception emits stays in order."""
        pending, self._pending = self._pending, _Pending()
        if pending.outgoing:
            await send_outgoing(pending.outgoing)
        at = now()
        # Each mark (and each record the projection writes) goes to the changelog partition of its
        # own event, so the current event moves; it is put back for the caller, whose next table
        # writes (a dead letter's or a redrive's quarantine, a redriven tool step's ledger entry)
        # belong to the partition of the event it is handling, not to the batch's last one.
        handling = _current_event.get(None)
        try:
            for record, event_id in pending.marks:
                _current_event.set(weakref.ref(record))
                self.processed.mark(event_id, at)
            if self.on_flush is not None:
                self.on_flush()
        finally:
            _current_event.set(handling)
        writes = _batch_writes.get()
        if writes:
            written = list(writes)
            writes.clear()
            await asyncio.gather(*written)
        if pending.marks:
            self.stats.processed += len(pending.marks)
            self.stats.emitted += len(pending.outgoing)
            self.stats.last_event_at = time.time()

    # -- the per-item path ----------------------------------------------------------------------

    async def handle(
        self, item: Item, span: SpanHandle, redriven: bool = False, batched: bool = False
    ) -> bool:
        """Process one item; False when it was dead-lettered or parked instead. ``batched`` leaves
        its outputs and its processed mark to :meth:`flush`; otherwise they are done here."""
        started = time.perf_counter()
        try:
            event = decode(item.value)
        except PoisonEvent as exc:
            qid = item.key.decode(errors="replace") if item.key else None
            quarantined = None if qid is None or redriven else self._quarantine(qid)
            if quarantined is not None and qid is not None:
                if not _holds(quarantined, item):
                    await self.park(qid, item, None, span)
                return False
            dead = DeadLetter("poison", exc.kind, str(exc), 1)
            await self.dead_letter(qid, item, None, dead, span)
            return False
        span.set_ids(
            tenant_id=event.tenant_id,
            exception_id=event.exception_id,
            event_id=str(event.event_id),
        )
        if isinstance(event, OperatorRequest) and event.payload.stage == self.name:
            await self.operate(event, span)
            return True
        if isinstance(event, OperatorRequest) and self.name != PROJECTION:
            span.set_outcome("processed")
            return True  # addressed to another stage that shares the topic
        qid = event.exception_id
        quarantined = None if redriven else self._quarantine(qid)
        if quarantined is not None:
            if _holds(quarantined, item):  # redelivered after a crash: it is already recorded
                self.stats.duplicates += 1
                span.set_outcome("duplicate")
                return False
            await self.park(qid, item, event, span)
            return False
        event_id = str(event.event_id)
        if event_id in self._pending.ids or self.processed.seen(event_id):
            self.stats.duplicates += 1
            metrics.duplicate(self.name)
            span.set_outcome("duplicate")
            return True
        try:
            outputs = await self._call(event, redriven)
        except DeadLetter as dead:
            await self.dead_letter(qid, item, event, dead, span)
            return False
        parent = span.context if span.recording else None
        outgoing: list[Outgoing] = [
            (topic, key, encode(out), parent) for topic, key, out in outputs
        ]
        record = current_event()
        if batched and record is not None:
            self._pending.add(outgoing, record, event_id)
        else:
            await send_outgoing(outgoing)
            self.processed.mark(event_id, now())
            self.stats.processed += 1
            self.stats.emitted += len(outputs)
            self.stats.last_event_at = time.time()
        metrics.processed(self.name, time.perf_counter() - started)
        span.set_outcome("processed")
        return True

    async def _call(self, event: Event, redriven: bool) -> list[Output]:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.handler(event, redriven)
            except StageError as exc:
                metrics.failed(self.name, exc.error_class)
                raise DeadLetter(
                    exc.error_class, exc.kind, str(exc), exc.attempts or attempt
                ) from exc
            except TRANSIENT as exc:
                metrics.failed(self.name, "transient")
                if attempt >= RETRY.max_attempts:
                    raise DeadLetter("transient", type(exc).__name__, str(exc), attempt) from exc
                self.stats.retried += 1
                metrics.retried(self.name)
                delay = backoff_delay(attempt, RETRY, None, _rng)
                retry_event(attempt, "transient", str(exc), delay)
                await asyncio.sleep(delay)
            except Exception as exc:  # a bug or bad data: retrying the same input cannot help
                metrics.failed(self.name, "permanent")
                raise DeadLetter("permanent", type(exc).__name__, str(exc), attempt) from exc

    # -- quarantine -----------------------------------------------------------------------------

    def _qkey(self, qid: str) -> str:
        return f"{self.name}:{qid}"

    def _quarantine(self, qid: str) -> dict[str, Any] | None:
        raw = stored(quarantine_table, self._qkey(qid))
        return None if raw is None else dict(orjson.loads(raw))

    def _save(self, qid: str, q: dict[str, Any] | None) -> None:
        if q is None:
            del quarantine_table[self._qkey(qid)]
        else:
            quarantine_table[self._qkey(qid)] = orjson.dumps(q)

    async def dead_letter(
        self,
        qid: str | None,
        item: Item,
        event: EventBase | None,
        dead: DeadLetter,
        span: SpanHandle,
    ) -> None:
        await self.flush()
        at = now().isoformat()
        attempts = item.attempts + dead.attempts
        first = item.first_failure_at or at
        basis = event.event_id if event else uuid.uuid5(SLUICE_NAMESPACE, _where(item))
        entry_id = str(derive_event_id(basis, f"{self.name}:dlq:{attempts}"))
        headers = {
            "sluice.original.topic": item.topic,
            "sluice.original.partition": str(item.partition),
            "sluice.original.offset": str(item.offset),
            "sluice.original.timestamp": str(item.timestamp),
            "sluice.stage": self.name,
            "sluice.error.class": dead.error_class,
            "sluice.error.kind": dead.kind,
            "sluice.error.message": dead.message[:4000],
            "sluice.error.stacktrace": traceback.format_exc()[-8000:],
            "sluice.error.attempts": str(attempts),
            "sluice.error.first_failure_at": first,
            "sluice.error.last_failure_at": at,
            "sluice.dlq.entry_id": entry_id,
        }
        if event is not None:
            headers["sluice.tenant_id"] = event.tenant_id
            headers["sluice.event_id"] = str(event.event_id)
        if qid is not None:
            headers["sluice.exception_id"] = qid
        outputs: list[tuple[faust.TopicT, bytes | None, bytes | None]] = []
        if event is not None:
            payload = DeadLetteredPayload(
                stage=self.name,
                entry_id=entry_id,
                error_class=dead.error_class,
                error_kind=dead.kind,
                message=dead.message[:4000],
                attempts=attempts,
                failed_event_id=event.event_id,
                original_topic=item.topic,
                original_partition=item.partition,
                original_offset=item.offset,
                dlq_topic=self.dlq.get_topic_name(),
                first_failure_at=datetime.fromisoformat(first),
                last_failure_at=datetime.fromisoformat(at),
            )
            note = follow(
                event, ExceptionDeadLettered, f"{self.name}:dlq:{attempts}", payload, now()
            )
            outputs.append((operations_topic, note.exception_id.encode(), encode(note)))
        await send_all(
            [(self.dlq, item.key, item.value)], [(k, v.encode()) for k, v in headers.items()]
        )
        await send_all(outputs)
        if qid is not None:
            q = self._quarantine(qid) or {"parked": []}
            q.update(
                stage=self.name,
                exception_id=qid,
                tenant_id=event.tenant_id if event else None,
                since=q.get("since") or at,
                head={
                    **replace(item, attempts=attempts, first_failure_at=first).to_json(),
                    "entry_id": entry_id,
                    "event_id": str(event.event_id) if event else None,
                    "event_type": getattr(event, "event_type", None),
                    "error_class": dead.error_class,
                    "error_kind": dead.kind,
                    "message": dead.message[:4000],
                    "last_failure_at": at,
                },
            )
            self._save(qid, q)
        self.stats.dead_lettered += 1
        metrics.dead_lettered(self.name, dead.error_class)
        dead_letter_event(self.dlq.get_topic_name(), dead.error_class, dead.kind, dead.message)
        span.set_outcome("dead_lettered")
        log.warning(
            "%s: dead-lettered %s (%s %s: %s)",
            self.name,
            _where(item),
            dead.error_class,
            dead.kind,
            dead.message,
        )

    async def park(self, qid: str, item: Item, event: EventBase | None, span: SpanHandle) -> None:
        await self.flush()
        q = self._quarantine(qid)
        assert q is not None  # noqa: S101 - callers checked
        q["parked"].append({**item.to_json(), "event_id": str(event.event_id) if event else None})
        self._save(qid, q)
        self.stats.parked += 1
        metrics.parked(self.name)
        span.set_outcome("parked")
        # The note tells the projection that a stage holds this event back. The projection reads
        # the operations topic itself, so a note about its own parking would come back to it, be
        # parked behind the same dead letter and make another note, for ever; its quarantine
        # shows in the DLQ listing instead.
        if event is not None and self.name != PROJECTION:
            payload = ParkedPayload(
                stage=self.name,
                parked_event_id=event.event_id,
                position=len(q["parked"]),
                original_topic=item.topic,
                original_offset=item.offset,
            )
            note = follow(event, ExceptionParked, f"{self.name}:parked", payload, now())
            await send_all([(operations_topic, note.exception_id.encode(), encode(note))])

    async def operate(
        self, request: ExceptionRedriveRequested | ExceptionDiscardRequested, span: SpanHandle
    ) -> None:
        """Redrive or discard: replay the quarantine in order, then lift it."""
        await self.flush()
        if self.processed.seen(str(request.event_id)):
            self.stats.duplicates += 1
            return
        qid = request.exception_id
        q = self._quarantine(qid)
        if q is None:
            log.info(
                "%s: %s for %s, which is not quarantined here", self.name, request.event_type, qid
            )
            self.processed.mark(str(request.event_id), now())
            return
        redrive = isinstance(request, ExceptionRedriveRequested)
        if "replaying" in q:  # a crash interrupted this request: go on where it stopped
            items = [Item.from_json(p) for p in q["replaying"]]
        else:
            items = [Item.from_json(q["head"])] if redrive else []
            items += [Item.from_json(p) for p in q["parked"]]
        redrive_event(self.name, self.dlq.get_topic_name(), len(items))
        span.set_outcome("processed")
        for index, it in enumerate(items):
            # What is left to replay is recorded before each step, so a crash halfway loses no
            # parked event: the redelivered request resumes here, and replays of events that did
            # finish are dropped by the idempotency table.
            self._save(qid, {**q, "replaying": [p.to_json() for p in items[index:]]})
            # Each replay is a span in the replayed event's own trace, next to its failure.
            with it.span(self.name) as replay:
                replay.add_event("sluice.redrive", {"sluice.request_id": str(request.event_id)})
                ok = await self.handle(it, replay, redriven=True)
            if not ok:
                # Dead-lettered again: it heads a new quarantine, the rest stay parked behind it.
                again = self._quarantine(qid)
                if again is not None:
                    again.pop("replaying", None)
                    again["parked"] = [
                        {**p.to_json(), "event_id": None} for p in items[index + 1 :]
                    ]
                    self._save(qid, again)
                break
        else:
            self._save(qid, None)
            payload = QuarantineLiftedPayload(
                stage=self.name,
                action="redrive" if redrive else "discard",
                released=len(items) - (1 if redrive else 0),
                reason=request.payload.reason,
                requested_by=request.payload.requested_by,
            )
            note = follow(request, ExceptionQuarantineLifted, f"{self.name}:lifted", payload, now())
            await send_all([(operations_topic, note.exception_id.encode(), encode(note))])
        if redrive:
            self.stats.redriven += 1
        else:
            self.stats.discarded += 1
        self.processed.mark(str(request.event_id), now())


def _holds(quarantine: dict[str, Any], item: Item) -> bool:
    """Whether the quarantine already holds this very record (as its head or parked)."""
    where = (item.topic, item.partition, item.offset)
    held = [quarantine["head"], *quarantine["parked"]]
    return any((h["topic"], h["partition"], h["offset"]) == where for h in held)


class _Drain:
    """Graceful stop: no agent starts another event, the events in flight finish (a tool call cut
    off mid-flight would be in doubt), then Faust stops. See :func:`drain_in_flight`."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.stopped = asyncio.Event()


drain = _Drain()


async def drain_in_flight(within: float) -> bool:
    """Stop taking events and wait up to ``within`` seconds for those in flight; True if all ended."""
    drain.draining = True
    if drain.in_flight:
        drain.idle.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drain.idle.wait(), within)
    return drain.in_flight == 0


class _Rebalances:
    """Counts partition revocations, assignments and completed table recoveries, to tell whether
    one happened meanwhile."""

    count = 0


rebalances = _Rebalances()


async def _on_rebalance(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    rebalances.count += 1


app.on_partitions_revoked.connect(_on_rebalance)
app.on_partitions_assigned.connect(_on_rebalance)
app.on_rebalance_complete.connect(_on_rebalance)


def _rebalance_count() -> int:
    return rebalances.count


def _where(item: Item) -> str:
    return f"{item.topic}[{item.partition}]@{item.offset}"


_rng = random.Random()  # noqa: S311 - backoff jitter, not security


async def send_all(
    items: list[tuple[faust.TopicT, bytes | None, bytes | None]],
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    """Send and wait for the broker's ack of every item (see :func:`send_outgoing`); the send spans
    are children of the current span."""
    await send_outgoing([(topic, key, value, None) for topic, key, value in items], headers)


async def send_outgoing(
    items: list[Outgoing], headers: list[tuple[str, bytes]] | None = None
) -> None:
    """Send every item, then wait for the broker's ack of each; retry until all succeed.

    Each item's send span is a child of its own context (the span of the input that produced it),
    or of the current span when that is None. ``force=True`` bypasses Faust's attachments (which
    would publish only when the input is acked, after our idempotency mark, and so could lose the
    output on a crash). A retry resends the whole list: the duplicates carry the same event ids and
    the next stage drops them.
    """
    if not items:
        return
    delay = 0.1
    while True:
        try:
            futures = []
            for topic, key, value, parent in items:
                sending = start_send_span(topic.get_topic_name(), key, context=parent)
                fut = asyncio.ensure_future(
                    await topic.send(
                        key=key, value=value, headers=sending.inject(headers or []), force=True
                    )
                )
                sending.end_when_done(fut)
                futures.append(fut)
            for fut in futures:
                await fut
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker is unreachable or refused: wait and send again
            log.warning("send failed (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def durable() -> None:
    """Wait until the tool ledger's latest write is acknowledged by Kafka."""
    write = cast(AckedTable, ledger_table).last_write
    if write is not None:
        await write


class _Unrecorded:
    """For the projection: its fold already ignores an event id it holds, so recording processed
    ids as well would only add a changelog write per history event."""

    def seen(self, event_id: str) -> bool:
        return False

    def mark(self, event_id: str, at: datetime) -> None:
        return None

    def expire(self, before: datetime) -> int:
        return 0


def _runner(
    name: str,
    handler: Handler,
    record_processed: bool = True,
    on_flush: Callable[[], None] | None = None,
    on_discard: Callable[[], None] | None = None,
) -> StageRunner:
    processed: Any = (
        MappingProcessedStore(_expiring_table(f"processed-{name}"))
        if record_processed
        else _Unrecorded()
    )
    return StageRunner(
        name, handler, processed, _topic(topics.dlq(name)), on_flush=on_flush, on_discard=on_discard
    )


# -------------------------------------------------------------------------------------- handlers


async def handle_intake(event: Event, redriven: bool = False) -> list[Output]:
    ingested = expect(event, ExceptionIngested, "intake")
    tenant(ingested)
    known = stored(fingerprints_table, ingested.exception_id)
    out = intake(ingested, known.decode() if known else None, now())
    if known is None:
        fingerprints_table[ingested.exception_id] = out.payload.fingerprint.encode()
    return [(fingerprinted_topic, group_key(out).encode(), out)]


_RECENT_OUTPUTS = 32
# tenant:fingerprint -> the group table's value, decoded
decoded_groups: Decoded[str, dict[str, Any]] = Decoded(
    settings.worker_decoded_cache, _rebalance_count
)


async def handle_group(event: Event, redriven: bool = False) -> list[Output]:
    """Count repeats of a fingerprint. The group state and the output are stored together, so a
    redelivered input (after a crash between the table write and the idempotency mark) resends the
    recorded output instead of counting the same event twice."""
    fingerprinted = expect(event, ExceptionFingerprinted, "group")
    config = tenant(fingerprinted)
    key = group_key(fingerprinted)
    stored = decoded_groups.get(key)
    if stored is None:
        raw = groups_table.get(key)
        stored = orjson.loads(raw) if raw else {"group": None, "recent": {}}
    eid = str(fingerprinted.event_id)
    if eid in stored["recent"]:
        accepted = ExceptionAccepted.model_validate(stored["recent"][eid])
    else:
        state = FingerprintGroup.model_validate(stored["group"]) if stored["group"] else None
        accepted, new_state = group(
            fingerprinted, state, config.intake.repeat_window_seconds, now()
        )
        recent = {**stored["recent"], eid: accepted.model_dump(mode="json")}
        while len(recent) > _RECENT_OUTPUTS:
            recent.pop(next(iter(recent)))
        stored = {"group": new_state.model_dump(mode="json"), "recent": recent}
        groups_table[key] = orjson.dumps(stored)
    decoded_groups.put(key, stored)
    return [(accepted_topic, accepted.exception_id.encode(), accepted)]


class _Clients:
    """Per-tenant HTTP clients, tools and classifiers, created on first use inside the worker's loop."""

    def __init__(self) -> None:
        self.http: httpx.AsyncClient | None = None
        self.tools: dict[str, dict[str, Tool]] = {}
        self.classifiers: dict[str, LLMClassifier] = {}

    def client(self) -> httpx.AsyncClient:
        if self.http is None:
            self.http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20)
            )
        return self.http

    def tools_for(self, config: TenantConfig) -> dict[str, Tool]:
        if config.tenant_id not in self.tools:
            self.tools[config.tenant_id] = build_tools(config, self.client())
        return self.tools[config.tenant_id]

    def classifier_for(self, config: TenantConfig) -> LLMClassifier | None:
        if not config.triage.llm.enabled:
            return None
        if config.tenant_id not in self.classifiers:
            self.classifiers[config.tenant_id] = LLMClassifier(config.triage.llm, self.client())
        return self.classifiers[config.tenant_id]

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None


clients = _Clients()


async def handle_triage(event: Event, redriven: bool = False) -> list[Output]:
    accepted = expect(event, ExceptionAccepted, "triage")
    config = tenant(accepted)
    classifier = clients.classifier_for(config)
    classification = await classifier.classify(accepted) if classifier else None
    out = triage(accepted, config.triage, now(), classification)
    return [(triaged_topic, out.exception_id.encode(), out)]


async def handle_policy(event: Event, redriven: bool = False) -> list[Output]:
    triaged = expect(event, ExceptionTriaged, "policy")
    out = decide(triaged, tenant(triaged).policy, now())
    return [(decided_topic, out.exception_id.encode(), out)]


async def handle_playbook(event: Event, redriven: bool = False) -> list[Output]:
    decided = expect(event, ExceptionDecided, "playbook")
    out = plan(decided, tenant(decided).playbooks, now())
    return [] if out is None else [(planned_topic, out.exception_id.encode(), out)]


RETRY = RetryPolicy(
    max_attempts=settings.tool_max_attempts,
    base_seconds=settings.tool_backoff_base_seconds,
    max_seconds=settings.tool_backoff_max_seconds,
)
ledger = MappingLedger(ledger_table)


async def handle_tool(event: Event, redriven: bool = False) -> list[Output]:
    """Run the plan. A step that still fails after its retries dead-letters the plan (nothing is
    emitted), so the exception is quarantined here until an operator redrives it; the ledger keeps
    the steps that did succeed, and the redrive does not call them again."""
    planned = expect(event, ExceptionPlanned, "tool")
    if planned.payload.awaiting_approval:
        return []  # the chain waits for an approval; the projection shows awaiting_approval
    out = await execute(
        planned,
        clients.tools_for(tenant(planned)),
        ledger,
        now,
        RETRY,
        durable=durable,
        retry_in_doubt=redriven,
    )
    if out.payload.outcome == "failed":
        failed = next(r for r in out.payload.results if r.status == "failed")
        raise StageError(
            f"step {failed.step_id!r} ({failed.tool}.{failed.action}) failed: "
            f"{failed.detail.get('message')}",
            error_class=str(failed.detail.get("error_class", "permanent")),
            kind=f"tool:{failed.tool}",
            attempts=int(failed.detail.get("attempts") or 1),
        )
    return [(completed_topic, out.exception_id.encode(), out)]


class _Folded:
    """The projection's records folded in the current batch: each exception's record is read and
    validated once per batch, every event of the batch applied to it in memory, and the result
    written once when the batch is flushed (under the last event that changed it, whose partition
    is the exception's). Nothing is acked before the write, so a crash loses no event: the batch is
    redelivered and the fold ignores the event ids a record already holds."""

    def __init__(self) -> None:
        self.records: dict[bytes, tuple[ExceptionRecord, faust.EventT | None]] = {}
        self.written: Decoded[bytes, ExceptionRecord] = Decoded(
            settings.worker_decoded_cache, _rebalance_count
        )
        self.sweep = Sweep(settings.exception_sweep_seconds)

    def get(self, key: bytes) -> ExceptionRecord | None:
        if key in self.records:
            return self.records[key][0]
        record = self.written.get(key)
        if record is not None:
            return record
        raw = stored(exceptions_table, key)
        return ExceptionRecord.model_validate_json(raw) if raw else None

    def put(self, key: bytes, record: ExceptionRecord) -> None:
        self.records[key] = (record, current_event())

    def write(self) -> None:
        partitions: dict[int, faust.EventT] = {}
        for key, (record, event) in self.records.items():
            if event is not None:
                _current_event.set(weakref.ref(event))
                partitions[event.message.partition] = event
            exceptions_table[key] = record.model_dump_json().encode()
            self.written.put(key, record)
        self.records.clear()
        if settings.exception_retention_seconds:
            for partition, event in partitions.items():
                if self.sweep.due(partition):
                    self.expire(partition, event)

    def expire(self, partition: int, event: faust.EventT) -> None:
        """Delete the closed exceptions past retention in the next slice of ``partition``'s store
        (app.retention), with their first-report fingerprints; ``event`` is one of the batch's from
        that partition, so the tombstones go to its changelog partition. Like every table write of
        the batch, they are acknowledged by Kafka before the batch is acked."""
        store = cast(Store, exceptions_table.data)
        cutoff = now() - timedelta(seconds=settings.exception_retention_seconds)
        start = self.sweep.start(partition)
        expired = self.sweep.slice(partition, store.items_from(partition, start), cutoff)
        if not expired:
            return
        _current_event.set(weakref.ref(event))
        for key in expired:
            del exceptions_table[key]
            self.written.discard(key)
            exception_id = key.decode()
            if exception_id in fingerprints_table:
                del fingerprints_table[exception_id]
        metrics.expired(len(expired))
        log.info(
            "retention: deleted %d closed exceptions unchanged for %ss from partition %d",
            len(expired),
            settings.exception_retention_seconds,
            partition,
        )


folded = _Folded()


async def handle_projection(event: Event, redriven: bool = False) -> list[Output]:
    key = event.exception_id.encode()
    record = folded.get(key)
    if record is not None and record.state.tenant_id != event.tenant_id:
        raise StageError(
            f"event {event.event_id} claims tenant {event.tenant_id!r} for exception "
            f"{event.exception_id}, which belongs to another tenant; refusing to merge them"
        )
    updated = apply(record, event)
    if updated is not None:
        folded.put(key, updated)
        if isinstance(event, ExceptionCompleted):
            metrics.end_to_end((event.occurred_at - updated.state.received_at).total_seconds())
    return []


# ---------------------------------------------------------------------------------------- agents

intake_runner = _runner("intake", handle_intake)
group_runner = _runner("group", handle_group)
triage_runner = _runner("triage", handle_triage)
policy_runner = _runner("policy", handle_policy)
playbook_runner = _runner("playbook", handle_playbook)
tool_runner = _runner("tool", handle_tool)
projection_runner = _runner(
    PROJECTION,
    handle_projection,
    record_processed=False,
    on_flush=folded.write,
    on_discard=folded.records.clear,
)


@app.agent(ingested_topic, concurrency=1)
async def take_in_exceptions(stream: faust.StreamT[bytes]) -> None:
    await intake_runner.run(stream)


@app.agent(fingerprinted_topic, concurrency=1)
async def group_repeats(stream: faust.StreamT[bytes]) -> None:
    await group_runner.run(stream)


@app.agent(accepted_topic, concurrency=1)
async def triage_exceptions(stream: faust.StreamT[bytes]) -> None:
    await triage_runner.run(stream)


@app.agent(triaged_topic, concurrency=1)
async def apply_policy(stream: faust.StreamT[bytes]) -> None:
    await policy_runner.run(stream)


@app.agent(decided_topic, concurrency=1)
async def choose_playbook(stream: faust.StreamT[bytes]) -> None:
    await playbook_runner.run(stream)


@app.agent(planned_topic, concurrency=1)
async def execute_tools(stream: faust.StreamT[bytes]) -> None:
    await tool_runner.run(stream)


@app.agent(history_topic, concurrency=1)
async def project_state(stream: faust.StreamT[bytes]) -> None:
    await projection_runner.run(stream)


async def _close_clients(
    sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
) -> None:
    await clients.close()


app.on_before_shutdown.connect(_close_clients)
