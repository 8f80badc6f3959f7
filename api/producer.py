"""The API's Kafka producer: acks=all and idempotent, connected lazily, bounded in time.

The API must start, and answer 503, while the broker is unreachable, so :class:`KafkaEventProducer`
connects in a background task that retries with backoff until the broker answers. A send that arrives
during the first attempt waits for it (within the send's deadline); after a failed attempt, sends fail
fast until the broker is reached. A send is successful only once the
broker acknowledged the record (acks=all), and every send is bounded by
``Settings.produce_timeout_seconds``: past it the route answers 503, never a false 202. A record answered
503 after a timeout may still reach Kafka later; its derived event id lets a retry with the same
Idempotency-Key produce the same event, which the pipeline's intake drops as a duplicate.

Each record is sent inside a ``send {topic}`` PRODUCER span whose W3C traceparent goes into the
record's headers (``app.telemetry``), so the worker's process spans join the request's trace; the time
spent waiting for acks feeds ``sluice_ingest_produce_seconds``.

Routes depend on the :class:`EventSender` protocol, so tests can stand a fake in for Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

from app.settings import Settings
from app.telemetry import SendSpan, metrics, start_send_span
from app.topics import TopicNames

log = logging.getLogger("sluice.api.producer")

_RECONNECT_MIN_SECONDS = 0.5
_RECONNECT_MAX_SECONDS = 5.0
_PROBE_SECONDS = 2.0


@dataclass(frozen=True)
class OutgoingRecord:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class SendFailure:
    """Why a record was not acknowledged: the status the API answers for it and a sentence."""

    status: int
    detail: str


class EventSender(Protocol):
    async def send_many(self, records: Sequence[OutgoingRecord]) -> list[SendFailure | None]:
        """Send every record, then wait for every ack; per record None (acked) or why not."""
        ...

    async def probe(self) -> str | None:
        """None when the broker answers now, else a sentence saying why it does not."""
        ...


class KafkaEventProducer:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._by_fingerprint = TopicNames(settings.topic_prefix).fingerprinted
        self._producer: Any = None
        self._connect_task: asyncio.Task[None] | None = None
        self._last_error = "The API has not connected to Kafka yet"
        # Set once the first connection attempt is over: a request arriving during startup waits
        # for it (within its deadline) instead of failing; later ones fail fast while disconnected.
        self._first_attempt = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._producer is not None

    def _new_producer(self) -> Any:
        s = self._settings
        return AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            client_id="sluice-api",
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=int(s.produce_timeout_seconds * 1000),
            # Let the broker, not a client default of 1 MiB, refuse what the API's body limit allows.
            max_request_size=max(1_048_576, s.max_body_bytes + 65_536),
        )

    def start(self) -> None:
        """Connect in the background; returns at once."""
        if self._connect_task is None:
            self._connect_task = asyncio.create_task(self._connect(), name="sluice-api-kafka")

    async def _connect(self) -> None:
        delay = _RECONNECT_MIN_SECONDS
        while True:
            producer = self._new_producer()
            try:
                await producer.start()
            except Exception as exc:  # unreachable, or any other start failure: retry
                await producer.stop()
                self._first_attempt.set()
                self._last_error = "Kafka is unreachable from the API"
                log.warning(
                    "Kafka at %s is unreachable (%s); retrying in %.1fs",
                    self._settings.kafka_bootstrap_servers,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_SECONDS)
                continue
            except BaseException:  # cancelled by close(): do not leave an unclosed producer behind
                await producer.stop()
                raise
            self._producer = producer
            self._first_attempt.set()
            log.info("connected to Kafka at %s", self._settings.kafka_bootstrap_servers)
            return

    async def close(self) -> None:
        if self._connect_task is not None:
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connect_task
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def probe(self) -> str | None:
        if self._producer is None:
            return f"{self._last_error}; the API retries in the background"
        try:
            async with asyncio.timeout(_PROBE_SECONDS):
                await self._producer.client.fetch_all_metadata()
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning(
                "Kafka at %s does not answer: %r", self._settings.kafka_bootstrap_servers, exc
            )
            return "Kafka does not answer the API's metadata requests"
        return None

    async def send_many(self, records: Sequence[OutgoingRecord]) -> list[SendFailure | None]:
        timeout = self._settings.produce_timeout_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._producer is None and self._connect_task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._first_attempt.wait()
        if self._producer is None:
            failure = SendFailure(503, f"{self._last_error}, so the report was not accepted.")
            return [failure] * len(records)
        producer = self._producer
        results: list[SendFailure | None] = [None] * len(records)
        pending: dict[int, asyncio.Future[Any]] = {}
        spans: dict[int, SendSpan] = {}
        started = time.perf_counter()
        # Send everything first (each send only queues the record), then wait for the acks together.
        # Each record gets its own `send {topic}` span, child of the request's span, whose
        # traceparent goes into the record's headers; the span ends when the broker acks.
        for i, record in enumerate(records):
            span = spans[i] = start_send_span(record.topic, record.key)
            if record.topic != self._by_fingerprint:  # every other topic is keyed by exception id
                span.set_ids(exception_id=record.key.decode("utf-8", "replace"))
            try:
                async with asyncio.timeout_at(deadline):
                    fut = await producer.send(
                        record.topic,
                        record.value,
                        key=record.key,
                        headers=span.inject(record.headers),
                    )
            except TimeoutError as exc:
                results[i] = self._timed_out(timeout)
                span.end(exc)
            except KafkaError as exc:
                results[i] = self._failed(exc)
                span.end(exc)
            else:
                fut.add_done_callback(_retrieve)
                span.end_when_done(fut)
                pending[i] = fut
        if pending:
            await asyncio.wait(pending.values(), timeout=max(0.0, deadline - loop.time()))
            metrics.produce_latency(time.perf_counter() - started)
        for i, fut in pending.items():
            if not fut.done():
                failure = self._timed_out(timeout)
                results[i] = failure
                spans[i].end(TimeoutError(failure.detail))
            elif fut.cancelled():
                results[i] = SendFailure(503, "The send to Kafka was cancelled.")
            elif (error := fut.exception()) is not None:
                results[i] = self._failed(error)
        return results

    def _timed_out(self, timeout: float) -> SendFailure:
        return SendFailure(
            503,
            f"Kafka did not acknowledge the report within {timeout:g}s, so it was not accepted.",
        )

    def _failed(self, exc: BaseException) -> SendFailure:
        if isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError):
            return SendFailure(
                413, f"Kafka refused the report as too large ({exc}); send a smaller report."
            )
        log.warning("send to Kafka failed: %r", exc)
        return SendFailure(
            503, f"Kafka did not accept the write ({type(exc).__name__}), so it was not accepted."
        )


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a late failure as seen: an ack that arrives after the deadline must not log an error."""
    if not fut.cancelled():
        fut.exception()
