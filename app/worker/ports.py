"""The small typed protocols a stage runner is handed, and the bundle it gets them in.

The runner (:mod:`app.worker.runner`) reads no module globals: what it needs comes in a
:class:`StageContext`, as quix-streams hands its processing functions a context. In the worker those
are Kafka and Faust (:mod:`app.worker.wiring`); in unit tests and tools that replay history they are
the in-memory implementations of :mod:`app.worker.memory`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from agents.tool import RetryPolicy
from app.stores import BytesMapping
from app.telemetry import SpanHandle
from app.topics import TopicNames
from app.worker.items import Item, Outgoing
from app.worker.outcomes import Detail, Outcome
from schemas.config import TenantConfig

Clock = Callable[[], datetime]
KafkaHeaders = Sequence[tuple[str, bytes]]


class Producer(Protocol):
    """Sends records and waits for the broker's acknowledgement of every one."""

    async def send(self, records: Sequence[Outgoing], headers: KafkaHeaders | None = None) -> None:
        """Send every record, then wait for each ack; retry until all are acked (nothing is
        skipped). A retry may send a record twice: the copies carry the same event id."""
        ...


class Changelog(Protocol):
    """Where a stage's table writes go, and when they are durable.

    Faust writes a table change to the changelog partition of the event being handled; ``bind``
    says which item that is from now on (None: none). Writes made inside ``collect()`` are the
    batch's, and ``settle()`` waits until the broker has acknowledged every one of them."""

    def bind(self, item: Item | None) -> None: ...

    def bound(self) -> Item | None: ...

    def collect(self) -> AbstractContextManager[None]: ...

    async def settle(self) -> None: ...


class Tenants(Protocol):
    """Each tenant's configuration (rules, policy, playbooks, tools)."""

    @property
    def where(self) -> str:
        """Where the configurations come from, for error messages."""
        ...

    def get(self, tenant_id: str) -> TenantConfig | None: ...


class Telemetry(Protocol):
    """Spans around each item, and the record of each outcome (stat, metric, span)."""

    def span(self, stage: str, item: Item) -> AbstractContextManager[SpanHandle]: ...

    def record(
        self, stage: str, outcome: Outcome, span: SpanHandle | None, detail: Detail | None = None
    ) -> None: ...


@dataclass
class StageContext:
    """What every stage runner of a worker shares."""

    producer: Producer
    changelog: Changelog
    quarantine: BytesMapping  # <stage>:<exception id> -> dead letter and parked items (JSON)
    telemetry: Telemetry
    topics: TopicNames
    clock: Clock
    generation: Callable[[], int]  # moves on at every rebalance and completed table recovery
    retry: RetryPolicy
    rng: random.Random = field(default_factory=random.Random)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
