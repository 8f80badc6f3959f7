"""In-memory implementations of the runner's ports: no broker, no Faust, no event loop tricks.

They make a :class:`~app.worker.ports.StageContext` whose producer keeps what was sent, whose
changelog keeps which item each table write belonged to, and whose generation moves only when told.
The unit tests of the runner use them (tests/unit/worker), and so can anything that wants to run
stages over recorded events without Kafka.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from app.worker.items import Item, Outgoing
from app.worker.ports import KafkaHeaders


@dataclass(frozen=True)
class Sent:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


class MemoryProducer:
    """Keeps every record sent, in order. ``fail_next`` makes the next sends raise (as a broker
    that refuses would), to exercise a caller's handling of a failed send."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.fail_next = 0

    async def send(self, records: Sequence[Outgoing], headers: KafkaHeaders | None = None) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("the in-memory broker was told to refuse this send")
        for topic, key, value, _parent in records:
            self.sent.append(Sent(topic, key, value, dict(headers or ())))

    def to(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]


class MemoryChangelog:
    """Table writes are immediate in memory; this records which item is bound and how often the
    batch was settled."""

    def __init__(self) -> None:
        self.item: Item | None = None
        self.collecting = False
        self.settled = 0

    def bind(self, item: Item | None) -> None:
        self.item = item

    def bound(self) -> Item | None:
        return self.item

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        self.collecting = True
        try:
            yield
        finally:
            self.collecting = False

    async def settle(self) -> None:
        self.settled += 1


@dataclass
class Generation:
    """A rebalance counter that moves when :meth:`rebalance` is called."""

    count: int = 0

    def __call__(self) -> int:
        return self.count

    def rebalance(self) -> None:
        self.count += 1


@dataclass
class ManualClock:
    """A clock that moves only when told."""

    at: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


class Sleeps:
    """An ``asyncio.sleep`` stand-in that returns at once and remembers each delay asked for."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
