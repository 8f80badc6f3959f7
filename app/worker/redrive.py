"""An operator's redrive or discard of a quarantine, carried out by the stage that holds it.

The request (``ExceptionRedriveRequested`` / ``ExceptionDiscardRequested``) arrives on the stage's
own input topic keyed by the exception id, so it is handled in order with the stage's events: a
redrive processes the dead-lettered event again, then the parked ones in their original order; a
discard drops the head and replays the parked ones. Either way the quarantine is lifted with an
``ExceptionQuarantineLifted`` note naming who asked and why.
"""

from __future__ import annotations

import logging
from typing import Protocol

from app.stores import ProcessedStore
from app.telemetry import SpanHandle
from app.worker.items import Item
from app.worker.outcomes import Detail, Outcome
from app.worker.quarantine import Quarantining, send_note
from schemas.events import (
    ExceptionDiscardRequested,
    ExceptionQuarantineLifted,
    ExceptionRedriveRequested,
    QuarantineLiftedPayload,
    follow,
)

log = logging.getLogger("sluice.pipeline")


class Redriving(Quarantining, Protocol):
    processed: ProcessedStore

    async def handle(
        self, item: Item, span: SpanHandle, redriven: bool = False, batched: bool = False
    ) -> bool: ...


async def operate(
    runner: Redriving,
    request: ExceptionRedriveRequested | ExceptionDiscardRequested,
    span: SpanHandle,
) -> None:
    """Replay the quarantine in order (redrive: its head first), then lift it."""
    ctx = runner.ctx
    await runner.flush()
    request_id = str(request.event_id)
    if runner.processed.seen(request_id):
        ctx.telemetry.record(runner.name, Outcome.DUPLICATE, span)
        return
    qid = request.exception_id
    q = runner.book.get(qid)
    if q is None:
        log.info(
            "%s: %s for %s, which is not quarantined here", runner.name, request.event_type, qid
        )
        runner.processed.mark(request_id, ctx.clock())
        return
    redrive = isinstance(request, ExceptionRedriveRequested)
    if "replaying" in q:  # a crash interrupted this request: go on where it stopped
        items = [Item.from_json(p) for p in q["replaying"]]
    else:
        items = [Item.from_json(q["head"])] if redrive else []
        items += [Item.from_json(p) for p in q["parked"]]
    for index, it in enumerate(items):
        # What is left to replay is recorded before each step, so a crash halfway loses no parked
        # event: the redelivered request resumes here, and replays of events that did finish are
        # dropped by the idempotency table.
        runner.book.save(qid, {**q, "replaying": [p.to_json() for p in items[index:]]})
        # Each replay is a span in the replayed event's own trace, next to its failure.
        with ctx.telemetry.span(runner.name, it) as replay:
            replay.add_event("sluice.redrive", {"sluice.request_id": request_id})
            ok = await runner.handle(it, replay, redriven=True)
        if not ok:
            # Dead-lettered again: it heads a new quarantine, the rest stay parked behind it.
            again = runner.book.get(qid)
            if again is not None:
                again.pop("replaying", None)
                again["parked"] = [{**p.to_json(), "event_id": None} for p in items[index + 1 :]]
                runner.book.save(qid, again)
            break
    else:
        runner.book.save(qid, None)
        payload = QuarantineLiftedPayload(
            stage=runner.name,
            action="redrive" if redrive else "discard",
            released=len(items) - (1 if redrive else 0),
            reason=request.payload.reason,
            requested_by=request.payload.requested_by,
        )
        note = follow(
            request, ExceptionQuarantineLifted, f"{runner.name}:lifted", payload, ctx.clock()
        )
        await send_note(ctx, note)
    outcome = Outcome.REDRIVEN if redrive else Outcome.DISCARDED
    ctx.telemetry.record(runner.name, outcome, span, Detail(dlq=runner.dlq, count=len(items)))
    runner.processed.mark(request_id, ctx.clock())
