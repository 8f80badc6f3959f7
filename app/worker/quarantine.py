"""Dead letters and ordered quarantine.

When a stage cannot process an exception's event, the record goes to the stage's DLQ topic with its
raw bytes and the cause in headers, an ``ExceptionDeadLettered`` note goes to the operations topic,
and the exception is quarantined at that stage: table ``quarantine``, key ``<stage>:<exception id>``,
holding the dead-lettered record (the head) and, in order, every later event of the same exception
that reaches the stage (parked). Other exceptions keep flowing. :mod:`app.worker.redrive` lifts it.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol

import orjson

from app.stores import BytesMapping, stored
from app.telemetry import SpanHandle
from app.worker.items import DeadLetter, Item
from app.worker.outcomes import Detail, Outcome
from app.worker.ports import StageContext
from app.worker.registry import OPERATIONS, PROJECTION
from schemas.codec import encode
from schemas.events import (
    SLUICE_NAMESPACE,
    DeadLetteredPayload,
    EventBase,
    ExceptionDeadLettered,
    ExceptionParked,
    ParkedPayload,
    derive_event_id,
    follow,
)

log = logging.getLogger("sluice.pipeline")

MAX_MESSAGE = 4000


class QuarantineBook:
    """One stage's quarantines in the shared ``quarantine`` table (a JSON document per key)."""

    def __init__(self, stage: str, table: BytesMapping) -> None:
        self.stage = stage
        self.table = table

    def _key(self, qid: str) -> str:
        return f"{self.stage}:{qid}"

    def get(self, qid: str) -> dict[str, Any] | None:
        raw = stored(self.table, self._key(qid))
        return None if raw is None else dict(orjson.loads(raw))

    def save(self, qid: str, q: dict[str, Any] | None) -> None:
        if q is None:
            del self.table[self._key(qid)]
        else:
            self.table[self._key(qid)] = orjson.dumps(q)


def holds(quarantine: dict[str, Any], item: Item) -> bool:
    """Whether the quarantine already holds this very record (as its head or parked)."""
    where = (item.topic, item.partition, item.offset)
    held = [quarantine["head"], *quarantine["parked"]]
    return any((h["topic"], h["partition"], h["offset"]) == where for h in held)


class Quarantining(Protocol):
    """What dead-lettering, parking and redriving need of the stage's runner."""

    name: str
    dlq: str
    ctx: StageContext
    book: QuarantineBook

    async def flush(self) -> None: ...


async def send_note(ctx: StageContext, note: EventBase) -> None:
    """An operations note (dead letter, parked, lifted), keyed by its exception id."""
    outgoing = (ctx.topics.of(OPERATIONS), note.exception_id.encode(), encode(note), None)
    await ctx.producer.send([outgoing])


async def dead_letter(
    runner: Quarantining,
    qid: str | None,
    item: Item,
    event: EventBase | None,
    dead: DeadLetter,
    span: SpanHandle,
) -> None:
    """Send ``item`` to the stage's DLQ and quarantine its exception here (``qid``; None when even
    the key could not be read, so there is nothing to hold behind it)."""
    ctx = runner.ctx
    await runner.flush()  # what the batch holds for other exceptions goes out first, in order
    now = ctx.clock()
    at = now.isoformat()
    attempts = item.attempts + dead.attempts
    first = item.first_failure_at or at
    basis = event.event_id if event else uuid.uuid5(SLUICE_NAMESPACE, item.where)
    entry_id = str(derive_event_id(basis, f"{runner.name}:dlq:{attempts}"))
    message = dead.message[:MAX_MESSAGE]
    headers = {
        "sluice.original.topic": item.topic,
        "sluice.original.partition": str(item.partition),
        "sluice.original.offset": str(item.offset),
        "sluice.original.timestamp": str(item.timestamp),
        "sluice.stage": runner.name,
        "sluice.error.class": dead.error_class,
        "sluice.error.kind": dead.kind,
        "sluice.error.message": message,
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
    await ctx.producer.send(
        [(runner.dlq, item.key, item.value, None)], [(k, v.encode()) for k, v in headers.items()]
    )
    if event is not None:
        payload = DeadLetteredPayload(
            stage=runner.name,
            entry_id=entry_id,
            error_class=dead.error_class,
            error_kind=dead.kind,
            message=message,
            attempts=attempts,
            failed_event_id=event.event_id,
            original_topic=item.topic,
            original_partition=item.partition,
            original_offset=item.offset,
            dlq_topic=runner.dlq,
            first_failure_at=datetime.fromisoformat(first),
            last_failure_at=datetime.fromisoformat(at),
        )
        await send_note(
            ctx,
            follow(event, ExceptionDeadLettered, f"{runner.name}:dlq:{attempts}", payload, now),
        )
    if qid is not None:
        q = runner.book.get(qid) or {"parked": []}
        q.update(
            stage=runner.name,
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
                "message": message,
                "last_failure_at": at,
            },
        )
        runner.book.save(qid, q)
    detail = Detail(
        error_class=dead.error_class, kind=dead.kind, message=dead.message, dlq=runner.dlq
    )
    ctx.telemetry.record(runner.name, Outcome.DEAD_LETTERED, span, detail)
    log.warning(
        "%s: dead-lettered %s (%s %s: %s)",
        runner.name,
        item.where,
        dead.error_class,
        dead.kind,
        dead.message,
    )


async def park(
    runner: Quarantining, qid: str, item: Item, event: EventBase | None, span: SpanHandle
) -> None:
    """Hold ``item`` behind its exception's dead letter at this stage, in arrival order."""
    ctx = runner.ctx
    await runner.flush()
    q = runner.book.get(qid)
    if q is None:
        raise RuntimeError(f"{runner.name}: parking {item.where}, but {qid} is not quarantined")
    q["parked"].append({**item.to_json(), "event_id": str(event.event_id) if event else None})
    runner.book.save(qid, q)
    ctx.telemetry.record(runner.name, Outcome.PARKED, span)
    # The note tells the projection that a stage holds this event back. The projection reads the
    # operations topic itself, so a note about its own parking would come back to it, be parked
    # behind the same dead letter and make another note, for ever; its quarantine shows in the
    # DLQ listing instead.
    if event is not None and runner.name != PROJECTION.name:
        payload = ParkedPayload(
            stage=runner.name,
            parked_event_id=event.event_id,
            position=len(q["parked"]),
            original_topic=item.topic,
            original_offset=item.offset,
        )
        await send_note(
            ctx, follow(event, ExceptionParked, f"{runner.name}:parked", payload, ctx.clock())
        )
