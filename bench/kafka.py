"""The bench's own Kafka clients: the watcher that times records out of a topic, the producers
that send its events (flat out or paced), record timestamps read back, and a group's lag."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.procs import BenchError, Proc, echo
from bench.stats import rate
from bench.workload import phase_of


@dataclass
class Watcher:
    """Consumes a topic from its end and records when each key is first seen (per-key time only
    for the phases asked for; counts for all)."""

    bootstrap: str
    topic: str
    partitions: int  # this run created the topic, with this many partitions
    timed_phases: set[bytes] = field(default_factory=set)
    first_seen: dict[bytes, float] = field(default_factory=dict)
    first_seen_wall: dict[str, float] = field(default_factory=dict)
    counts: Counter[bytes] = field(default_factory=Counter)
    last_new: dict[bytes, float] = field(default_factory=dict)
    records: int = 0
    _keys: set[bytes] = field(default_factory=set)
    _consumer: Any = None
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        await self._consumer.start()
        tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, so nothing produced from here on is missed
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run(), name=f"watch-{self.topic}")

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
            now = time.perf_counter()
            wall = time.time()
            for records in batch.values():
                for rec in records:
                    self.records += 1
                    key = rec.key
                    if key is None or key in self._keys:
                        continue
                    self._keys.add(key)
                    phase = phase_of(key)
                    self.counts[phase] += 1
                    self.last_new[phase] = now
                    if phase in self.timed_phases:
                        self.first_seen[key] = now
                        self.first_seen_wall[key.decode()] = wall

    async def wait_for(
        self,
        phase: bytes,
        expected: int,
        within: float,
        label: str,
        every: float = 3.0,
        procs: Sequence[Proc] = (),
    ) -> bool:
        """Until ``expected`` distinct keys of ``phase`` were seen (True) or ``within`` s (False)."""
        start = time.perf_counter()
        deadline = start + within
        next_report = start + every
        done_at_start = self.counts[phase]
        while self.counts[phase] < expected:
            if self._task is not None and self._task.done():
                self._task.result()  # raises what killed the watcher
                raise BenchError("the completion watcher stopped")
            for proc in procs:
                if not proc.alive():
                    raise BenchError(
                        f"{proc.name} exited with {proc.popen.returncode} during {label} (killed "
                        f"by someone else?):\n{proc.log_tail()}"
                    )
            now = time.perf_counter()
            if now >= deadline:
                return False
            if now >= next_report:
                done = self.counts[phase]
                speed = rate(done - done_at_start, now - start)
                echo(f"{label}: {done:,}/{expected:,} done ({speed:,.0f}/s)")
                next_report = now + every
            await asyncio.sleep(0.02)
        return True

    def forget(self, phase: bytes) -> None:
        """Drop the per-key memory of a finished phase (the memory phase sees a million keys)."""
        self._keys = {k for k in self._keys if phase_of(k) != phase}

    async def stop(self) -> None:
        """Stop consuming (again is harmless: a phase may stop it before the run ends)."""
        task, consumer = self._task, self._consumer
        self._task = self._consumer = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if consumer is not None:
            await consumer.stop()


async def read_stamps(
    bootstrap: str, topics: Sequence[str], partitions: int, prefix: str
) -> list[dict[str, float]]:
    """Per topic: exception id -> record timestamp (epoch s) of its first record, for the exceptions
    whose id starts with ``prefix``, reading every partition from the start to its current end."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    out: list[dict[str, float]] = []
    try:
        for topic in topics:
            stamps: dict[str, float] = {}
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            remaining = {tp for tp in tps if ends[tp] > 0}
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=1000, max_records=20_000)
                for records in batch.values():
                    for rec in records:
                        try:
                            xid = orjson.loads(rec.value)["exception_id"]
                        except (orjson.JSONDecodeError, KeyError, TypeError):
                            continue
                        if xid.startswith(prefix) and xid not in stamps:
                            stamps[xid] = rec.timestamp / 1000
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
            out.append(stamps)
    finally:
        await consumer.stop()
    return out


async def group_lag(
    admin: Any, consumer: Any, group: str, partitions: int, topics: Collection[str] = ()
) -> int:
    """Records the consumer group ``group`` has not committed yet, over every partition of
    ``topics`` (default: every topic it has committed an offset in; a partition with none counts
    from its start); read with a started aiokafka admin client and consumer."""
    from aiokafka import TopicPartition

    committed = await admin.list_consumer_group_offsets(group)
    topics = set(topics) or {tp.topic for tp in committed}
    tps = [TopicPartition(topic, p) for topic in topics for p in range(partitions)]
    ends = await consumer.end_offsets(tps) if tps else {}
    offsets = {tp: meta.offset for tp, meta in committed.items()}
    return sum(max(0, end - max(0, offsets.get(tp, 0))) for tp, end in ends.items())


class GroupLag:
    """The lag of a consumer group (:func:`group_lag`), with its own admin client and consumer."""

    def __init__(self, bootstrap: str, group: str, partitions: int) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.partitions = partitions
        self._admin: Any = None
        self._consumer: Any = None

    async def __aenter__(self) -> GroupLag:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False
        )
        await self._admin.start()
        try:
            await self._consumer.start()
        except BaseException:
            await self._admin.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def lag(self, topics: Collection[str] = ()) -> int:
        return await group_lag(self._admin, self._consumer, self.group, self.partitions, topics)

    async def caught_up(self, within: float, topics: Collection[str] = ()) -> float | None:
        """The ``perf_counter`` time at which the group had committed every record of ``topics``
        (default: every topic it reads), or None if not within ``within`` s. Offsets are committed
        every few seconds, so it is late by up to that much."""
        deadline = time.perf_counter() + within
        while time.perf_counter() < deadline:
            if await self.lag(topics) == 0:
                return time.perf_counter()
            await asyncio.sleep(0.5)
        return None


def new_producer(bootstrap: str, **kwargs: Any) -> Any:
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=kwargs.pop("linger_ms", 2),
        max_batch_size=kwargs.pop("max_batch_size", 256 * 1024),
        **kwargs,
    )


async def produce(
    producer: Any,
    topic: str,
    records: Iterable[tuple[bytes, bytes]],
) -> int:
    """Send every record without waiting in between, then wait for every ack."""
    futures = [await producer.send(topic, value, key=key) for key, value in records]
    await asyncio.gather(*futures)
    return len(futures)


async def send_paced(
    producer: Any,
    topic: str,
    records: Sequence[tuple[bytes, bytes]],
    per_s: float,
) -> tuple[float, dict[bytes, float]]:
    """Send ``records`` at ``per_s`` a second, then wait for every ack. The seconds the sending
    took, and the ``perf_counter`` time at which each key was acknowledged."""
    acked: dict[bytes, float] = {}

    def on_ack(key: bytes) -> None:
        acked[key] = time.perf_counter()

    futures = []
    t0 = time.perf_counter()
    for i, (key, value) in enumerate(records):
        delay = t0 + i / per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        fut = await producer.send(topic, value, key=key)
        fut.add_done_callback(lambda f, k=key: on_ack(k) if not f.exception() else None)
        futures.append(fut)
    sent_s = time.perf_counter() - t0
    await asyncio.gather(*futures)
    return sent_s, acked


def seen_after_ack(watcher: Watcher, acked: dict[bytes, float]) -> list[float]:
    """Per key acked at ``acked[key]`` (perf_counter), the seconds until the watcher saw it."""
    return [watcher.first_seen[k] - acked[k] for k in acked if k in watcher.first_seen]


async def ensure(bootstrap: str, names: list[str], partitions: int) -> None:
    from app.admin import ensure_topics
    from app.settings import Settings

    settings = Settings.model_validate(
        {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "partitions": partitions}
    )
    await ensure_topics(settings, names)
