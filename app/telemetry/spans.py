"""Sluice's span helpers: the ``send {topic}`` and ``process {topic}`` spans, and span events.

Span names and ``messaging.*`` attributes follow the OpenTelemetry messaging semantic conventions;
``sluice.*`` attributes carry the domain (stage, tenant, exception, outcome). A stage wraps each
record in :func:`process_span` (parent: the record's traceparent, see
:mod:`app.telemetry.propagation`) and each output send in :func:`start_send_span`, injected into the
record and ended at the broker's ack. Failures land on the current (process) span as
``sluice.retry`` / ``sluice.dead_letter`` / ``sluice.redrive`` events (:func:`retry_event`,
:func:`dead_letter_event`, :func:`redrive_event`).

Every helper asks :mod:`app.telemetry.tracing` for the tracer first and, while tracing is off,
returns a shared no-op handle, so the hot path pays one attribute check.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from app.telemetry.propagation import HeadersLike, KafkaHeaders, extract_context, inject_headers
from app.telemetry.tracing import _state

__all__ = [
    "Outcome",
    "SendSpan",
    "SpanHandle",
    "annotate",
    "dead_letter_event",
    "process_span",
    "redrive_event",
    "retry_event",
    "send_span",
    "span_event",
    "start_send_span",
]

Outcome = Literal["processed", "duplicate", "dead_lettered", "parked", "failed"]
"""What a stage did with one input record; the ``sluice.outcome`` attribute of its process span."""

# Attribute names: OpenTelemetry messaging semantic conventions, then Sluice's own.
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_DESTINATION: Final = "messaging.destination.name"
MESSAGING_PARTITION: Final = "messaging.destination.partition.id"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_CONSUMER_GROUP: Final = "messaging.consumer.group.name"
MESSAGING_KAFKA_KEY: Final = "messaging.kafka.message.key"
MESSAGING_KAFKA_OFFSET: Final = "messaging.kafka.offset"
ERROR_TYPE: Final = "error.type"
SLUICE_STAGE: Final = "sluice.stage"
SLUICE_TENANT_ID: Final = "sluice.tenant_id"
SLUICE_EXCEPTION_ID: Final = "sluice.exception_id"
SLUICE_EVENT_ID: Final = "sluice.event_id"
SLUICE_OUTCOME: Final = "sluice.outcome"

# Span event names.
EVENT_RETRY: Final = "sluice.retry"
EVENT_DEAD_LETTER: Final = "sluice.dead_letter"
EVENT_REDRIVE: Final = "sluice.redrive"


def _key_text(key: bytes | str | None) -> str | None:
    if key is None:
        return None
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key


def _set_ids(
    span: Span, tenant_id: str | None, exception_id: str | None, event_id: str | None
) -> None:
    if tenant_id is not None:
        span.set_attribute(SLUICE_TENANT_ID, tenant_id)
    if exception_id is not None:
        span.set_attribute(SLUICE_EXCEPTION_ID, exception_id)
    if event_id is not None:
        span.set_attribute(SLUICE_EVENT_ID, event_id)


class SpanHandle:
    """What the span helpers yield: the span, with setters for Sluice's attributes. While tracing
    is off it wraps a non-recording span and every method does nothing."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    @property
    def recording(self) -> bool:
        return self.span.is_recording()

    @property
    def context(self) -> Context:
        """A context with this span current: the parent for spans started elsewhere."""
        return trace.set_span_in_context(self.span)

    def set_ids(
        self,
        *,
        tenant_id: str | None = None,
        exception_id: str | None = None,
        event_id: str | None = None,
    ) -> None:
        """sluice.tenant_id / sluice.exception_id / sluice.event_id (searchable in Jaeger)."""
        if self.span.is_recording():
            _set_ids(self.span, tenant_id, exception_id, event_id)

    def set_outcome(self, outcome: Outcome) -> None:
        self.span.set_attribute(SLUICE_OUTCOME, outcome)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self.span.set_attribute(key, value)

    def add_event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        self.span.add_event(name, attributes)

    def record_error(self, exc: BaseException, error_class: str | None = None) -> None:
        """Mark the span failed: the exception as an event, status ERROR, ``error.type``."""
        if not self.span.is_recording():
            return
        self.span.record_exception(exc)
        self.span.set_attribute(ERROR_TYPE, error_class or type(exc).__qualname__)
        self.span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))

    def inject(self, headers: Sequence[tuple[str, bytes]]) -> KafkaHeaders:
        """``headers`` plus this span's traceparent (see :func:`inject_headers`)."""
        if not self.span.get_span_context().is_valid:
            return list(headers)
        return inject_headers(headers, self.context)


class SendSpan(SpanHandle):
    """A ``send {topic}`` span: inject it into the record, end it when the broker acked."""

    __slots__ = ("_deferred", "_ended")

    def __init__(self, span: Span) -> None:
        super().__init__(span)
        self._ended = False
        self._deferred = False

    def set_delivery(self, partition: int, offset: int | None = None) -> None:
        """Where the broker put the record (known once it acked)."""
        self.span.set_attribute(MESSAGING_PARTITION, str(partition))
        if offset is not None:
            self.span.set_attribute(MESSAGING_KAFKA_OFFSET, offset)

    def end(self, error: BaseException | None = None) -> None:
        """End the span, failed if ``error``; later calls do nothing."""
        if self._ended or not self.span.is_recording():
            return
        self._ended = True
        if error is not None:
            self.record_error(error)
        self.span.end()

    def end_when_done(self, future: asyncio.Future[Any]) -> None:
        """End the span when ``future`` (aiokafka's or Faust's send future) resolves, with the
        partition and offset of its RecordMetadata, or the error."""
        if not self.span.is_recording():
            return
        self._deferred = True
        future.add_done_callback(self._on_done)

    def _on_done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self.end(asyncio.CancelledError("the send was cancelled"))
            return
        error = future.exception()
        if error is None:
            metadata = future.result()
            partition = getattr(metadata, "partition", None)
            if isinstance(partition, int):
                offset = getattr(metadata, "offset", None)
                self.set_delivery(partition, offset if isinstance(offset, int) else None)
        self.end(error)


_NOOP = SpanHandle(INVALID_SPAN)
_NOOP_SEND = SendSpan(INVALID_SPAN)


def _send_attributes(
    topic: str, key: bytes | str | None, partition: int | None
) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        MESSAGING_SYSTEM: "kafka",
        MESSAGING_DESTINATION: topic,
        MESSAGING_OPERATION_TYPE: "send",
        MESSAGING_OPERATION_NAME: "send",
    }
    key_text = _key_text(key)
    if key_text is not None:
        attributes[MESSAGING_KAFKA_KEY] = key_text
    if partition is not None:
        attributes[MESSAGING_PARTITION] = str(partition)
    return attributes


def start_send_span(
    topic: str,
    key: bytes | str | None,
    partition: int | None = None,
    *,
    context: Context | None = None,
) -> SendSpan:
    """Start a ``send {topic}`` PRODUCER span without making it current, for sends whose acks are
    awaited together: ``headers = span.inject(headers)``, send, then ``span.end_when_done(fut)``
    (or ``span.end(error)``). Its parent is ``context``, by default the current span."""
    tracer = _state.tracer
    if tracer is None:
        return _NOOP_SEND
    span = tracer.start_span(
        f"send {topic}",
        context=context,
        kind=SpanKind.PRODUCER,
        attributes=_send_attributes(topic, key, partition),
    )
    return SendSpan(span)


@contextmanager
def send_span(
    topic: str, key: bytes | str | None, partition: int | None = None
) -> Iterator[SendSpan]:
    """A ``send {topic}`` PRODUCER span, current inside the block (so :func:`inject_headers` picks
    it up), ended at the end of the block (with the error, if the block raised) unless
    :meth:`SendSpan.end_when_done` handed its end to the send's future."""
    handle = start_send_span(topic, key, partition)
    if handle is _NOOP_SEND:
        yield handle
        return
    with trace.use_span(
        handle.span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    ):
        try:
            yield handle
        except Exception as exc:
            handle.end(exc)
            raise
        finally:
            if not handle._deferred:
                handle.end()


@contextmanager
def process_span(
    stage: str,
    topic: str,
    partition: int | None,
    offset: int | None,
    key: bytes | str | None,
    consumer_group: str | None,
    headers: HeadersLike,
) -> Iterator[SpanHandle]:
    """A ``process {topic}`` CONSUMER span around one record's processing, current inside the block.

    Its parent is the trace context in the record's ``headers`` (the producer's send span), so a
    stage's span joins the exception's trace. Carries messaging.* attributes and sluice.stage; set
    the tenant, exception and outcome through the yielded handle. An exception escaping the block
    is recorded and marks the span failed.
    """
    tracer = _state.tracer
    if tracer is None:
        yield _NOOP
        return
    attributes: dict[str, AttributeValue] = {
        MESSAGING_SYSTEM: "kafka",
        MESSAGING_DESTINATION: topic,
        MESSAGING_OPERATION_TYPE: "process",
        MESSAGING_OPERATION_NAME: "process",
        SLUICE_STAGE: stage,
    }
    if partition is not None:
        attributes[MESSAGING_PARTITION] = str(partition)
    if offset is not None:
        attributes[MESSAGING_KAFKA_OFFSET] = offset
    key_text = _key_text(key)
    if key_text is not None:
        attributes[MESSAGING_KAFKA_KEY] = key_text
    if consumer_group:
        attributes[MESSAGING_CONSUMER_GROUP] = consumer_group
    with tracer.start_as_current_span(
        f"process {topic}",
        context=extract_context(headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield SpanHandle(span)


def annotate(
    *, tenant_id: str | None = None, exception_id: str | None = None, event_id: str | None = None
) -> None:
    """Set sluice.tenant_id / exception_id / event_id on the current span (an API request's server
    span, say), so the trace can be found by them."""
    span = trace.get_current_span()
    if span.is_recording():
        _set_ids(span, tenant_id, exception_id, event_id)


def span_event(name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
    """Add an event to the current span; nothing when no span is recording."""
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes)


def retry_event(
    attempt: int, error_class: str, message: str, delay_seconds: float | None = None
) -> None:
    """``sluice.retry`` on the current span: attempt ``attempt`` failed and another follows."""
    if not trace.get_current_span().is_recording():
        return
    attributes: dict[str, AttributeValue] = {
        "sluice.attempt": attempt,
        "sluice.error.class": error_class,
        "sluice.error.message": message[:1000],
    }
    if delay_seconds is not None:
        attributes["sluice.retry.delay_seconds"] = delay_seconds
    span_event(EVENT_RETRY, attributes)


def dead_letter_event(dlq_topic: str, error_class: str, kind: str, message: str) -> None:
    """``sluice.dead_letter`` on the current span: the record went to ``dlq_topic``."""
    if not trace.get_current_span().is_recording():
        return
    span_event(
        EVENT_DEAD_LETTER,
        {
            "sluice.dlq.topic": dlq_topic,
            "sluice.error.class": error_class,
            "sluice.error.kind": kind,
            "sluice.error.message": message[:1000],
        },
    )


def redrive_event(from_topic: str, to_topic: str, count: int = 1) -> None:
    """``sluice.redrive`` on the current span: ``count`` records moved from a DLQ (or parking)
    back into ``to_topic``."""
    span_event(
        EVENT_REDRIVE,
        {"sluice.redrive.from": from_topic, "sluice.redrive.to": to_topic, "sluice.count": count},
    )
