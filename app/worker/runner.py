"""The loop every stage runs over a batch of its input records.

For each record, in order: decode it, drop an input event id the stage has already processed, and
call the stage's handler (around a pure function in agents/). Then, for the whole batch
(:meth:`StageRunner.flush`): send the outputs and wait for the broker's ack of every one, mark the
inputs processed, and wait until every table write of the batch is acknowledged. Only after that may
the inputs be acked (the caller does it, :mod:`app.worker.wiring`). That order is what makes
at-least-once delivery plus idempotency tables effectively-once:

- a crash before the outputs are acked leaves the input unmarked and uncommitted, so it is processed
  again and re-emits outputs with the same derived event ids, which the next stage drops;
- a crash after the mark was written to the changelog but before the offset commit redelivers the
  input, and the mark drops it: its outputs were already acked.

Nothing may escape the loop (Faust acks an event whose agent raised and never retries it): transient
failures are retried in place with backoff, everything else is dead-lettered with its cause and
quarantines the exception at this stage (:mod:`app.worker.quarantine`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from agents.tool import backoff_delay
from agents.tools import ToolError
from app.stores import ProcessedStore
from app.telemetry import SpanHandle
from app.worker.items import DeadLetter, Handler, Item, Outgoing, Output, StageError
from app.worker.outcomes import Detail, Outcome
from app.worker.ports import StageContext
from app.worker.quarantine import QuarantineBook, dead_letter, holds, park
from app.worker.redrive import operate
from app.worker.registry import ADDRESSED, PROJECTION, REQUESTS, Stage
from schemas.codec import PoisonEvent, decode, encode
from schemas.events import Event

# Failures worth retrying in place: the network or a dependency, not the event itself.
TRANSIENT = (OSError, TimeoutError, httpx.TransportError, ToolError)


@dataclass
class _Pending:
    """A batch's outputs (with the trace context of the span that made each) and the input event
    ids to mark processed once every output is acked."""

    outgoing: list[Outgoing] = field(default_factory=list)
    marks: list[tuple[Item, str]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)

    def add(self, outgoing: list[Outgoing], item: Item, event_id: str) -> None:
        self.outgoing.extend(outgoing)
        self.marks.append((item, event_id))
        self.ids.add(event_id)


class Unrecorded:
    """For the projection: its fold already ignores an event id it holds, so recording processed
    ids as well would only add a changelog write per history event."""

    def seen(self, event_id: str) -> bool:
        return False

    def mark(self, event_id: str, at: object) -> None:
        return None

    def expire(self, before: object) -> int:
        return 0


class StageRunner:
    """One stage's loop; see the module docstring for the order of its steps.

    ``on_flush`` runs when the batch's marks are written (the projection writes its folded records
    there) and ``on_discard`` when a batch is abandoned (it forgets them)."""

    def __init__(
        self,
        stage: Stage,
        handler: Handler,
        processed: ProcessedStore,
        ctx: StageContext,
        on_flush: Callable[[], None] | None = None,
        on_discard: Callable[[], None] | None = None,
    ) -> None:
        self.stage = stage
        self.name = stage.name
        self.handler = handler
        self.processed = processed
        self.ctx = ctx
        self.dlq = ctx.topics.dlq(stage.name)
        self.book = QuarantineBook(stage.name, ctx.quarantine)
        self.on_flush = on_flush
        self.on_discard = on_discard
        self._pending = _Pending()

    async def process(self, items: Sequence[Item], generation: int) -> bool:
        """Handle a batch in order, then send its outputs and write its marks. True when the batch
        may be acked: no rebalance happened since ``generation`` was read (as the batch was taken).

        A rebalance during the batch ends it early: the rest of its records may belong to another
        worker by now, which fetches them again, and handling them here as well would widen the
        window in which both call the same tool."""
        ctx = self.ctx
        self._pending = _Pending()
        try:
            with ctx.changelog.collect():
                for item in items:
                    if ctx.generation() != generation:
                        break
                    ctx.changelog.bind(item)  # its table writes go to its partition's changelog
                    with ctx.telemetry.span(self.name, item) as span:
                        await self.handle(item, span, batched=True)
                await self.flush()
        except BaseException:
            # Nothing of an unfinished batch is kept: its records are unacked and come again.
            self._pending = _Pending()
            if self.on_discard is not None:
                self.on_discard()
            raise
        return ctx.generation() == generation

    async def flush(self) -> None:
        """Send the pending outputs, wait for every ack, then mark their inputs processed, and wait
        until Kafka has acknowledged every table write made so far (marks included).

        Called at the end of a batch, and before anything that sends on its own (a dead letter, a
        parked event, an operator's request), so what an exception emits stays in order."""
        ctx = self.ctx
        pending, self._pending = self._pending, _Pending()
        if pending.outgoing:
            await ctx.producer.send(pending.outgoing)
        at = ctx.clock()
        # Each mark (and each record the projection writes) goes to the changelog partition of its
        # own event, so the bound item moves; it is put back for the caller, whose next table
        # writes (a dead letter's or a redrive's quarantine, a redriven tool step's ledger entry)
        # belong to the partition of the event it is handling, not to the batch's last one.
        handling = ctx.changelog.bound()
        try:
            for item, event_id in pending.marks:
                ctx.changelog.bind(item)
                self.processed.mark(event_id, at)
            if self.on_flush is not None:
                self.on_flush()
        finally:
            ctx.changelog.bind(handling)
        await ctx.changelog.settle()

    async def handle(
        self, item: Item, span: SpanHandle, redriven: bool = False, batched: bool = False
    ) -> bool:
        """Process one item; False when it was dead-lettered or parked instead. ``batched`` leaves
        its outputs and its processed mark to :meth:`flush`; otherwise they are done here."""
        ctx = self.ctx
        started = time.perf_counter()
        try:
            event = decode(item.value)
        except PoisonEvent as exc:
            qid = item.key.decode(errors="replace") if item.key else None
            quarantined = None if qid is None or redriven else self.book.get(qid)
            if quarantined is not None and qid is not None:
                if not holds(quarantined, item):
                    await park(self, qid, item, None, span)
                return False
            await dead_letter(
                self, qid, item, None, DeadLetter("poison", exc.kind, str(exc), 1), span
            )
            return False
        span.set_ids(
            tenant_id=event.tenant_id,
            exception_id=event.exception_id,
            event_id=str(event.event_id),
        )
        if isinstance(event, REQUESTS) and event.payload.stage == self.name:
            await operate(self, event, span)
            return True
        if (
            isinstance(event, ADDRESSED)
            and event.payload.stage != self.name
            and self.name != PROJECTION.name
        ):
            ctx.telemetry.record(self.name, Outcome.PASSED, span)
            return True  # addressed to another stage that shares the topic
        qid = event.exception_id
        quarantined = None if redriven else self.book.get(qid)
        if quarantined is not None:
            if holds(quarantined, item):  # redelivered after a crash: it is already recorded
                ctx.telemetry.record(self.name, Outcome.DUPLICATE, span)
                return False
            await park(self, qid, item, event, span)
            return False
        event_id = str(event.event_id)
        if event_id in self._pending.ids or self.processed.seen(event_id):
            ctx.telemetry.record(self.name, Outcome.DUPLICATE, span)
            return True
        try:
            outputs = await self._call(event, redriven, span)
        except DeadLetter as dead:
            await dead_letter(self, qid, item, event, dead, span)
            return False
        parent = span.context if span.recording else None
        outgoing: list[Outgoing] = [
            (ctx.topics.of(topic), key, encode(out), parent) for topic, key, out in outputs
        ]
        if batched:
            self._pending.add(outgoing, item, event_id)
        else:
            await ctx.producer.send(outgoing)
            self.processed.mark(event_id, ctx.clock())
        detail = Detail(seconds=time.perf_counter() - started, outputs=len(outgoing))
        ctx.telemetry.record(self.name, Outcome.PROCESSED, span, detail)
        return True

    async def _call(self, event: Event, redriven: bool, span: SpanHandle) -> list[Output]:
        """The handler, with transient failures retried in place (backoff with jitter, never sooner
        than a Retry-After the failure carries); anything
        else, or retries exhausted, becomes a :class:`DeadLetter` with its cause."""
        ctx = self.ctx
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.handler(event, redriven)
            except StageError as exc:
                ctx.telemetry.record(
                    self.name, Outcome.FAILED, span, Detail(error_class=exc.error_class)
                )
                raise DeadLetter(
                    exc.error_class, exc.kind, str(exc), exc.attempts or attempt
                ) from exc
            except TRANSIENT as exc:
                ctx.telemetry.record(
                    self.name, Outcome.FAILED, span, Detail(error_class="transient")
                )
                if attempt >= ctx.retry.max_attempts:
                    raise DeadLetter("transient", type(exc).__name__, str(exc), attempt) from exc
                # A dependency that said when to come back (HTTP Retry-After) is not asked sooner.
                retry_after = exc.retry_after if isinstance(exc, ToolError) else None
                delay = backoff_delay(attempt, ctx.retry, retry_after, ctx.rng)
                detail = Detail(
                    error_class="transient", message=str(exc), attempt=attempt, delay=delay
                )
                ctx.telemetry.record(self.name, Outcome.RETRIED, span, detail)
                await ctx.sleep(delay)
            except Exception as exc:  # a bug or bad data: retrying the same input cannot help
                ctx.telemetry.record(
                    self.name, Outcome.FAILED, span, Detail(error_class="permanent")
                )
                raise DeadLetter("permanent", type(exc).__name__, str(exc), attempt) from exc
