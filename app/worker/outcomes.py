"""Every outcome of a stage's work, and what each one records: a stat, a metric, a span mark.

One table (:data:`OUTCOMES`) says, for each outcome, which :class:`StageStats` field it counts,
which Prometheus series it moves and how it marks the process span (the ``sluice.outcome``
attribute, a span event). :class:`Recorder` is the only writer of all three, so they cannot drift
apart: the runner says *what happened* and never touches a counter itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from app.telemetry import (
    Metrics,
    SpanHandle,
    dead_letter_event,
    process_span,
    redrive_event,
    retry_event,
)
from app.telemetry import Outcome as SpanOutcome

if TYPE_CHECKING:
    from app.worker.items import Item


class Outcome(StrEnum):
    PROCESSED = "processed"  # handled; outputs sent (or pending in the batch)
    PASSED = "passed"  # an operator's request for another stage that shares this topic
    DUPLICATE = "duplicate"  # already processed (or already held in quarantine): dropped
    FAILED = "failed"  # one attempt failed; a retry or a dead letter follows
    RETRIED = "retried"  # a failed attempt will be made again after a backoff
    DEAD_LETTERED = "dead_lettered"  # sent to the stage's DLQ; the exception is quarantined
    PARKED = "parked"  # held back behind its exception's dead letter
    REDRIVEN = "redriven"  # an operator's redrive replayed a quarantine
    DISCARDED = "discarded"  # an operator's discard dropped a quarantine


@dataclass(slots=True)
class Detail:
    """What an outcome's record may need beyond the stage."""

    seconds: float = 0.0  # PROCESSED: time spent on the event
    outputs: int = 0  # PROCESSED: events emitted
    error_class: str = ""  # FAILED, RETRIED, DEAD_LETTERED
    kind: str = ""  # DEAD_LETTERED
    message: str = ""  # RETRIED, DEAD_LETTERED
    attempt: int = 0  # RETRIED
    delay: float | None = None  # RETRIED
    dlq: str = ""  # DEAD_LETTERED, REDRIVEN, DISCARDED: the stage's DLQ topic
    count: int = 0  # REDRIVEN, DISCARDED: records replayed or dropped


@dataclass
class StageStats:
    """Per-stage counters served at /sluice/stats (the Prometheus series carry the same counts)."""

    processed: int = 0
    duplicates: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    parked: int = 0
    redriven: int = 0
    discarded: int = 0
    emitted: int = 0
    last_event_at: float | None = None


@dataclass(frozen=True)
class Marks:
    """One outcome's record: the stats field it counts, the metric it moves, and the span's
    ``sluice.outcome`` and event."""

    stat: str | None
    metric: Callable[[Metrics, str, Detail], None] | None
    span_outcome: SpanOutcome | None
    span_event: Callable[[str, Detail], None] | None = None


def _redrive_event(stage: str, d: Detail) -> None:
    redrive_event(stage, d.dlq, d.count)


OUTCOMES: Mapping[Outcome, Marks] = {
    Outcome.PROCESSED: Marks(
        "processed", lambda m, stage, d: m.processed(stage, d.seconds), "processed"
    ),
    Outcome.PASSED: Marks(None, None, "processed"),
    Outcome.DUPLICATE: Marks("duplicates", lambda m, stage, d: m.duplicate(stage), "duplicate"),
    Outcome.FAILED: Marks("failed", lambda m, stage, d: m.failed(stage, d.error_class), None),
    Outcome.RETRIED: Marks(
        "retried",
        lambda m, stage, d: m.retried(stage),
        None,
        lambda stage, d: retry_event(d.attempt, d.error_class, d.message, d.delay),
    ),
    Outcome.DEAD_LETTERED: Marks(
        "dead_lettered",
        lambda m, stage, d: m.dead_lettered(stage, d.error_class),
        "dead_lettered",
        lambda stage, d: dead_letter_event(d.dlq, d.error_class, d.kind, d.message),
    ),
    Outcome.PARKED: Marks("parked", lambda m, stage, d: m.parked(stage), "parked"),
    Outcome.REDRIVEN: Marks(
        "redriven", lambda m, stage, d: m.redriven(stage), "processed", _redrive_event
    ),
    Outcome.DISCARDED: Marks(
        "discarded", lambda m, stage, d: m.discarded(stage), "processed", _redrive_event
    ),
}

_NO_DETAIL = Detail()


@dataclass
class Recorder:
    """The worker's :class:`~app.worker.ports.Telemetry`: process spans, and each outcome's marks
    from :data:`OUTCOMES`. ``stats`` holds one :class:`StageStats` per stage that recorded
    anything (and every stage passed to :meth:`declare`)."""

    metrics: Metrics
    consumer_group: str | None = None
    stats: dict[str, StageStats] = field(default_factory=dict)

    def declare(self, stages: list[str]) -> None:
        for stage in stages:
            self.stats.setdefault(stage, StageStats())
        self.metrics.declare_stages(stages)

    def span(self, stage: str, item: Item) -> AbstractContextManager[SpanHandle]:
        return process_span(
            stage,
            item.topic,
            item.partition,
            item.offset,
            item.key,
            self.consumer_group,
            item.headers,
        )

    def record(
        self, stage: str, outcome: Outcome, span: SpanHandle | None, detail: Detail | None = None
    ) -> None:
        d = detail or _NO_DETAIL
        marks = OUTCOMES[outcome]
        stats = self.stats.get(stage)
        if stats is None:
            stats = self.stats[stage] = StageStats()
        if outcome is Outcome.PROCESSED:  # the one outcome of almost every event: no getattr
            stats.processed += 1
            stats.emitted += d.outputs
            stats.last_event_at = time.time()
        elif marks.stat is not None:
            setattr(stats, marks.stat, getattr(stats, marks.stat) + 1)
        if marks.metric is not None:
            marks.metric(self.metrics, stage, d)
        if span is not None:
            if marks.span_outcome is not None:
                span.set_outcome(marks.span_outcome)
            if marks.span_event is not None:
                marks.span_event(stage, d)
