"""Sluice's observability in one module: OpenTelemetry tracing, Prometheus metrics, structured logs.

Both processes use it the same way. At startup: :func:`setup_logging` (``SLUICE_LOG_FORMAT``) and
:func:`setup_tracing` (the standard ``OTEL_*`` variables only); at shutdown :func:`shutdown_tracing`,
which flushes the spans still queued. The API does this in ``api.main``; the worker calls the same
functions. Nothing here imports Faust or FastAPI, so either process can use any of it.

Tracing is off unless configured (``OTEL_TRACES_EXPORTER``, or an OTLP endpoint): then no provider is
installed and every span helper returns a shared no-op handle after one attribute check, so the hot
path pays next to nothing. One trace per ingested exception is stitched together through Kafka
headers: a ``send {topic}`` PRODUCER span injects the W3C ``traceparent`` (and ``tracestate``) into
the record it wraps (:meth:`SendSpan.inject`, :func:`inject_headers`), and the stage that consumes
the record opens a ``process {topic}`` CONSUMER span whose parent is that header
(:func:`process_span`). Span names and ``messaging.*`` attributes follow the OpenTelemetry messaging
semantic conventions; ``sluice.*`` attributes carry the domain (stage, tenant, exception, outcome).
The aiokafka instrumentation is deliberately not used: it would inject a second traceparent.

A stage loop in the worker (Faust), for example::

    msg = record.message                                  # faust.EventT -> its Kafka message
    with process_span(stage, msg.topic, msg.partition, msg.offset, msg.key, app.conf.id,
                      msg.headers) as span, log_context(stage=stage):
        started = time.perf_counter()
        event = decode(record.value)
        span.set_ids(tenant_id=event.tenant_id, exception_id=event.exception_id,
                     event_id=str(event.event_id))
        if already_processed:                             # idempotency table hit
            span.set_outcome("duplicate"); metrics.duplicate(stage); return
        ...
        for topic, key, value in outputs:                 # each output: its own send span
            send = start_send_span(topic.get_topic_name(), key)
            fut = await topic.send(key=key, value=value, headers=send.inject(headers), force=True)
            send.end_when_done(fut)                       # ends at the broker's ack
        span.set_outcome("processed")
        metrics.processed(stage, time.perf_counter() - started)

On a failure: ``metrics.failed(stage, error_class)`` for every failed attempt; before another attempt
``retry_event(...)`` + ``metrics.retried(stage)``; when the record goes to the DLQ
``dead_letter_event(...)`` + ``metrics.dead_lettered(stage, error_class)`` + ``set_outcome(
"dead_lettered")``; a record held behind a quarantined one ``metrics.parked(stage)`` +
``set_outcome("parked")``; a redrive ``redrive_event(...)``. These span events land on the current
(process) span.

Metrics live in one :class:`~prometheus_client.CollectorRegistry` per process (:data:`REGISTRY`),
changed only through the typed methods of :data:`metrics`; :func:`render_metrics` returns the body and
content type for whatever web framework serves ``/metrics``.

Logs: one handler on the root logger, text or JSON lines (orjson) with timestamp, level, logger,
message, the current span's trace_id/span_id, and tenant_id/exception_id/event_id/stage when given
through ``extra=`` or :func:`log_context`. Nothing here logs per event at INFO.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO

import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "REGISTRY",
    "JsonFormatter",
    "Metrics",
    "Outcome",
    "SendSpan",
    "SpanHandle",
    "TelemetryConfigError",
    "TextFormatter",
    "annotate",
    "build_tracer_provider",
    "dead_letter_event",
    "extract_context",
    "get_tracer",
    "inject_headers",
    "instrument_fastapi",
    "instrument_httpx",
    "log_context",
    "logging_config",
    "metrics",
    "process_span",
    "redrive_event",
    "render_metrics",
    "retry_event",
    "send_span",
    "setup_logging",
    "setup_tracing",
    "shutdown_tracing",
    "span_event",
    "start_send_span",
    "tracing_enabled",
    "use_tracer_provider",
]

log = logging.getLogger("sluice.telemetry")

INSTRUMENTATION_NAME: Final = "sluice"

# ------------------------------------------------------------------------------------ tracing setup


class TelemetryConfigError(ValueError):
    """An OTEL_* or SLUICE_LOG_* variable holds a value Sluice cannot use; the message says which."""


@dataclass
class _Tracing:
    tracer: Tracer | None = None
    provider: TracerProvider | None = None  # set only when setup_tracing installed it


_state = _Tracing()

_OTLP_PROTOCOLS = ("http/protobuf", "grpc")


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def build_tracer_provider(service_name: str) -> TracerProvider | None:
    """A TracerProvider configured from the standard OTEL_* variables, or None when tracing is off.

    Off when OTEL_SDK_DISABLED=true, when OTEL_TRACES_EXPORTER is ``none``, and when neither
    OTEL_TRACES_EXPORTER nor an OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set. OTEL_TRACES_EXPORTER is a comma-separated list of
    ``otlp`` and ``console``; OTLP speaks OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL, ``http/protobuf``
    (the default) or ``grpc``. ``service_name`` applies unless OTEL_SERVICE_NAME (or service.name in
    OTEL_RESOURCE_ATTRIBUTES) names the service. Installs nothing: see :func:`setup_tracing`.
    """
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return None
    names = [n.strip().lower() for n in _env("OTEL_TRACES_EXPORTER").split(",") if n.strip()]
    if not names:
        if not (_env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")):
            return None
        names = ["otlp"]
    exporters = [_exporter(name) for name in dict.fromkeys(names) if name != "none"]
    if not exporters:
        return None
    provider = TracerProvider(resource=_resource(service_name))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter(out=sys.stdout)  # today's stdout, not the one at import
    if name != "otlp":
        raise TelemetryConfigError(
            f"OTEL_TRACES_EXPORTER names {name!r}, which Sluice does not ship; use otlp, console "
            "or none (or a comma-separated list of them)."
        )
    protocol = (
        _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter()
    raise TelemetryConfigError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL is {protocol!r}, which Sluice cannot export with; "
        f"use one of {', '.join(_OTLP_PROTOCOLS)}."
    )


def _resource(service_name: str) -> Resource:
    # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, and falls back to
    # "unknown_service:<exe>"; attributes passed to it would override the environment instead.
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    return resource


def setup_tracing(service_name: str) -> TracerProvider | None:
    """Configure tracing from the OTEL_* variables for this process; None when tracing is off.

    When on, the provider becomes the global one (so instrumentations use it too) and Sluice's span
    helpers start recording. Idempotent: a second call returns the provider already installed. Call
    :func:`shutdown_tracing` on the way out to flush the spans still queued (the SDK also shuts the
    provider down at interpreter exit).
    """
    if _state.provider is not None:
        return _state.provider
    provider = build_tracer_provider(service_name)
    if provider is None:
        return None
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)  # the global can be set once per process
    use_tracer_provider(provider)
    _state.provider = provider
    return provider


def use_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Route Sluice's span helpers through ``provider`` (None: off) without touching the global
    provider. For tests (an in-memory exporter) and for embedding Sluice in a traced process."""
    _state.tracer = None if provider is None else provider.get_tracer(INSTRUMENTATION_NAME)
    _state.provider = None


def shutdown_tracing() -> None:
    """Flush and shut down the provider :func:`setup_tracing` installed; tracing is off after."""
    provider = _state.provider
    _state.tracer = None
    _state.provider = None
    if provider is not None:
        provider.shutdown()


def tracing_enabled() -> bool:
    return _state.tracer is not None


def get_tracer() -> Tracer:
    """The tracer behind Sluice's helpers, for spans of your own (tool calls, say); a no-op tracer
    while tracing is off."""
    return _state.tracer or trace.NoOpTracer()


def instrument_fastapi(app: FastAPI, excluded_urls: str = "/healthz,/readyz,/metrics") -> None:
    """Server spans for every request to ``app`` (route-named, e.g. ``POST /v1/exceptions``), if
    tracing is on. Call before the app starts serving."""
    if _state.provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_state.provider,
        excluded_urls=excluded_urls,
        exclude_spans=["receive", "send"],  # one span per request, not one per ASGI message
    )


def instrument_httpx() -> None:
    """Client spans and traceparent on every httpx request of this process, if tracing is on
    (the API's reads from workers, the worker's tool calls). Idempotent."""
    if _state.provider is None:
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    instrumentor = HTTPXClientInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=_state.provider)


# -------------------------------------------------------------------------------------- propagation

KafkaHeaders = list[tuple[str, bytes]]
HeadersLike = Mapping[str, bytes | str] | Sequence[tuple[str, bytes | str | None]] | None

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def inject_headers(
    headers: Sequence[tuple[str, bytes]], context: Context | None = None
) -> KafkaHeaders:
    """``headers`` plus the W3C traceparent/tracestate of ``context`` (default: the current one).

    Returns a new list; the input is not changed. When there is a span to propagate, any
    traceparent/tracestate already in ``headers`` is replaced, so a record never carries two; when
    there is none (tracing off, no current span), the headers are returned as they were.
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    if "traceparent" not in carrier:
        return list(headers)
    kept = [(k, v) for k, v in headers if k.lower() not in _TRACE_HEADERS]
    return kept + [(k, v.encode()) for k, v in carrier.items()]


def extract_context(headers: HeadersLike) -> Context:
    """The trace context carried by a Kafka record's headers (a list of ``(key, value)`` pairs as
    aiokafka gives them, or a mapping as Faust's ``event.headers``); an empty context when there
    is none. Header names match case-insensitively; the first traceparent wins."""
    carrier: dict[str, str] = {}
    if headers:
        items = headers.items() if isinstance(headers, Mapping) else headers
        for key, value in items:
            name = key.lower()
            if name in _TRACE_HEADERS and name not in carrier and value is not None:
                carrier[name] = (
                    value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                )
    return _PROPAGATOR.extract(carrier)


# ------------------------------------------------------------------------------------- span helpers

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


# ------------------------------------------------------------------------------------------ metrics

REGISTRY = CollectorRegistry(auto_describe=True)
"""This process's one Prometheus registry (process, platform and GC collectors included)."""
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

_STAGE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_END_TO_END_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
_PRODUCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Sluice's Prometheus metrics, changed only through these methods (labels stay consistent)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._scrape_callbacks: list[Callable[[], None]] = []
        # Worker
        self.events_processed = Counter(
            "sluice_events_processed",
            "Input events a stage processed to completion (outputs acked, input marked).",
            ["stage"],
            registry=registry,
        )
        self.events_failed = Counter(
            "sluice_events_failed",
            "Failed processing attempts, whether then retried or dead-lettered.",
            ["stage", "error_class"],
            registry=registry,
        )
        self.events_retried = Counter(
            "sluice_events_retried",
            "Processing attempts scheduled again.",
            ["stage"],
            registry=registry,
        )
        self.events_dead_lettered = Counter(
            "sluice_events_dead_lettered",
            "Records a stage sent to its DLQ topic.",
            ["stage", "error_class"],
            registry=registry,
        )
        self.events_duplicates = Counter(
            "sluice_events_duplicates",
            "Input events dropped because the stage had already processed their id.",
            ["stage"],
            registry=registry,
        )
        self.events_parked = Counter(
            "sluice_events_parked",
            "Events held back behind a dead-lettered event of the same exception.",
            ["stage"],
            registry=registry,
        )
        self.exceptions_expired = Counter(
            "sluice_exceptions_expired",
            "Closed exceptions deleted from the worker's tables after their retention.",
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "sluice_stage_processing_seconds",
            "Time a stage spent on one input event, decode to idempotency mark.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.end_to_end_seconds = Histogram(
            "sluice_end_to_end_seconds",
            "From ingestion (the API's ExceptionIngested) to the exception's completion.",
            buckets=_END_TO_END_BUCKETS,
            registry=registry,
        )
        self.dlq_depth = Gauge(
            "sluice_dlq_depth",
            "Records waiting in a stage's DLQ topic.",
            ["stage"],
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "sluice_consumer_lag",
            "Records between the committed offset and the end of a partition.",
            ["topic", "partition"],
            registry=registry,
        )
        self.table_bytes = Gauge(
            "sluice_table_bytes",
            "What RocksDB reports for a table's partitions on this worker, summed: memtables,"
            " table readers (index and filters held outside the cache) and SST files on disk.",
            ["table", "kind"],
            registry=registry,
        )
        self.table_keys = Gauge(
            "sluice_table_keys_estimate",
            "RocksDB's estimate of the keys in a table's partitions on this worker.",
            ["table"],
            registry=registry,
        )
        self.table_cache_bytes = Gauge(
            "sluice_table_cache_bytes",
            "The worker's one RocksDB cache (capacity, usage, pinned) and memtable budget"
            " (write_buffers_limit, write_buffers_usage), shared by every table partition.",
            ["kind"],
            registry=registry,
        )
        # API
        self.ingest_requests = Counter(
            "sluice_ingest_requests",
            "Ingest requests answered, by route and HTTP status code.",
            ["route", "status_code"],
            registry=registry,
        )
        self.ingest_produce_seconds = Histogram(
            "sluice_ingest_produce_seconds",
            "Time the API waited for Kafka to acknowledge a request's records.",
            buckets=_PRODUCE_BUCKETS,
            registry=registry,
        )

    # --- worker
    def declare_stages(self, stages: Sequence[str]) -> None:
        """Create every per-stage series at zero, so rates and alerts work before the first event."""
        for stage in stages:
            self.events_processed.labels(stage)
            self.events_retried.labels(stage)
            self.events_duplicates.labels(stage)
            self.events_parked.labels(stage)
            self.stage_seconds.labels(stage)

    def processed(self, stage: str, seconds: float) -> None:
        """One input event processed to completion in ``seconds``."""
        self.events_processed.labels(stage).inc()
        self.stage_seconds.labels(stage).observe(seconds)

    def failed(self, stage: str, error_class: str) -> None:
        """One processing attempt failed (call it for every failed attempt)."""
        self.events_failed.labels(stage, error_class).inc()

    def retried(self, stage: str) -> None:
        """A failed attempt will be made again."""
        self.events_retried.labels(stage).inc()

    def dead_lettered(self, stage: str, error_class: str) -> None:
        """A record went to the stage's DLQ."""
        self.events_dead_lettered.labels(stage, error_class).inc()

    def duplicate(self, stage: str) -> None:
        """An already-processed event id was dropped."""
        self.events_duplicates.labels(stage).inc()

    def parked(self, stage: str) -> None:
        """An event was parked behind its exception's dead-lettered event."""
        self.events_parked.labels(stage).inc()

    def expired(self, count: int) -> None:
        """``count`` closed exceptions were deleted after their retention."""
        self.exceptions_expired.inc(count)

    def end_to_end(self, seconds: float) -> None:
        """An exception completed ``seconds`` after it was ingested."""
        self.end_to_end_seconds.observe(seconds)

    def set_dlq_depth(self, stage: str, depth: int) -> None:
        self.dlq_depth.labels(stage).set(depth)

    def set_consumer_lag(self, topic: str, partition: int, lag: int) -> None:
        self.consumer_lag.labels(topic, str(partition)).set(lag)

    def set_table_memory(
        self, tables: Mapping[str, Mapping[str, int]], shared: Mapping[str, int]
    ) -> None:
        """Record what app.rocks reports: per table (memory and keys) and the shared budget."""
        for table, figures in tables.items():
            for kind in ("memtables", "table_readers", "sst_files"):
                self.table_bytes.labels(table, kind).set(figures[kind])
            self.table_keys.labels(table).set(figures["keys_estimate"])
        for kind, value in shared.items():
            self.table_cache_bytes.labels(kind.removeprefix("cache_")).set(value)

    def forget_consumer_lag(self, topic: str, partition: int) -> None:
        """Drop a partition's lag series (the partition was revoked from this worker)."""
        with suppress(KeyError):
            self.consumer_lag.remove(topic, str(partition))

    # --- API
    def ingest_request(self, route: str, status_code: int) -> None:
        """An ingest request answered ``status_code`` (``route`` is the route template)."""
        self.ingest_requests.labels(route, str(status_code)).inc()

    def produce_latency(self, seconds: float) -> None:
        """The API waited ``seconds`` for Kafka's acks of one request's records."""
        self.ingest_produce_seconds.observe(seconds)

    # --- exposition
    def on_scrape(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` before every render: refresh gauges that are cheap to compute at scrape
        time rather than on every event (consumer lag, DLQ depth). A failing callback is logged and
        skipped."""
        self._scrape_callbacks.append(callback)

    def render(self) -> tuple[bytes, str]:
        for callback in self._scrape_callbacks:
            try:
                callback()
            except Exception:
                log.warning("a metrics scrape callback failed", exc_info=True)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


metrics = Metrics(REGISTRY)
"""The process's metrics: ``metrics.processed(stage, seconds)``, ``metrics.dead_lettered(...)``..."""


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus text exposition of :data:`REGISTRY`: (body, content type) for a /metrics
    endpoint of any web framework."""
    return metrics.render()


# ------------------------------------------------------------------------------------------ logging

CONTEXT_FIELDS: Final = ("tenant_id", "exception_id", "event_id", "stage")
_LOG_CONTEXT: ContextVar[Mapping[str, str]] = ContextVar(
    "sluice_log_context", default=MappingProxyType({})
)


@contextmanager
def log_context(
    *,
    tenant_id: str | None = None,
    exception_id: str | None = None,
    event_id: str | None = None,
    stage: str | None = None,
) -> Iterator[None]:
    """Every log line inside the block carries these fields (``extra=`` on a call still wins)."""
    given = {
        "tenant_id": tenant_id,
        "exception_id": exception_id,
        "event_id": event_id,
        "stage": stage,
    }
    fields = {**_LOG_CONTEXT.get(), **{k: v for k, v in given.items() if v is not None}}
    token = _LOG_CONTEXT.set(fields)
    try:
        yield
    finally:
        _LOG_CONTEXT.reset(token)


def _context_fields(record: logging.LogRecord) -> dict[str, str]:
    fields: dict[str, str] = {}
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        fields["trace_id"] = trace.format_trace_id(span_context.trace_id)
        fields["span_id"] = trace.format_span_id(span_context.span_id)
    scoped = _LOG_CONTEXT.get()
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is None:
            value = scoped.get(name)
        if value is not None:
            fields[name] = str(value)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (UTC), level, logger, message, trace_id/span_id of the
    current span, tenant_id/exception_id/event_id/stage, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_context_fields(record),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(data, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message`` and, when known, ``[trace_id=… tenant_id=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _context_fields(record)
        if not fields:
            return line
        context = " ".join(f"{k}={v}" for k, v in fields.items())
        head, sep, tail = line.partition("\n")  # keep a traceback below the context
        return f"{head} [{context}]{sep}{tail}"


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time of the record (not at creation), so a
    replaced stderr (test capture, uvicorn reloads) never leaves it writing to a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def _level(level: str) -> int:
    levels = logging.getLevelNamesMapping()
    number = levels.get(level.strip().upper())
    if number is None:
        raise TelemetryConfigError(
            f"The log level {level!r} is not one of {', '.join(sorted(levels))}; set "
            "SLUICE_LOG_LEVEL to one of them."
        )
    return number


def _formatter(json: bool) -> logging.Formatter:
    return JsonFormatter() if json else TextFormatter()


def setup_logging(level: str = "WARNING", json: bool = False) -> None:
    """One handler on the root logger writing to stderr, text or JSON lines (SLUICE_LOG_FORMAT).

    Idempotent: a second call replaces the handler the first one added and leaves other handlers
    (a test runner's) alone. With JSON, uvicorn's loggers are routed through it too, so every line
    of the process is JSON.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, StderrHandler):
            root.removeHandler(old)
    handler = StderrHandler()
    handler.setFormatter(_formatter(json))
    root.addHandler(handler)
    root.setLevel(_level(level))
    if json:
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True


def logging_config(level: str = "WARNING", json: bool = False) -> dict[str, Any]:
    """The same configuration as :func:`setup_logging`, as a :func:`logging.config.dictConfig`
    dict: for a runner that configures logging itself, e.g. ``faust.Worker(app,
    logging_config=logging_config(...))`` (mode clears the root handlers and applies it)."""
    formatter = "app.telemetry.JsonFormatter" if json else "app.telemetry.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"sluice": {"()": formatter}},
        "handlers": {"sluice": {"()": "app.telemetry.StderrHandler", "formatter": "sluice"}},
        "root": {"level": logging.getLevelName(_level(level)), "handlers": ["sluice"]},
    }
