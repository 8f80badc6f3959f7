"""Sluice's observability: OpenTelemetry tracing, Prometheus metrics, structured logs.

One module per concept, so each stays small and none imports another in a circle:

- :mod:`app.telemetry.tracing`: whether this process traces, and the provider (``OTEL_*`` only);
- :mod:`app.telemetry.propagation`: W3C traceparent in and out of Kafka headers;
- :mod:`app.telemetry.spans`: the ``send``/``process`` span helpers and the retry, dead-letter and
  redrive span events;
- :mod:`app.telemetry.prometheus`: the process's Prometheus registry and :data:`metrics` (not
  named ``metrics``: the submodule would share its name with the instance exported here);
- :mod:`app.telemetry.logs`: the stderr handler, text or JSON lines carrying the trace ids;
- :mod:`app.telemetry.errors`: :class:`TelemetryConfigError`, raised by tracing and logging setup.

Callers import from here (``from app.telemetry import metrics, process_span``), not from the
modules, so the split can change without touching them. Importing starts nothing: no exporter, no
network; tracing starts only in :func:`setup_tracing`.

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

# Reached as attributes of the old single module (tests use telemetry.CollectorRegistry and
# telemetry.StderrHandler), so they stay here though they were never in __all__.
from prometheus_client import CollectorRegistry as CollectorRegistry

from app.telemetry.errors import TelemetryConfigError
from app.telemetry.logs import (
    JsonFormatter,
    TextFormatter,
    log_context,
    logging_config,
    setup_logging,
)
from app.telemetry.logs import StderrHandler as StderrHandler
from app.telemetry.prometheus import REGISTRY, Metrics, metrics, render_metrics
from app.telemetry.propagation import extract_context, inject_headers
from app.telemetry.spans import (
    Outcome,
    SendSpan,
    SpanHandle,
    annotate,
    dead_letter_event,
    process_span,
    redrive_event,
    retry_event,
    send_span,
    span_event,
    start_send_span,
)
from app.telemetry.tracing import (
    build_tracer_provider,
    get_tracer,
    instrument_fastapi,
    instrument_httpx,
    setup_tracing,
    shutdown_tracing,
    tracing_enabled,
    use_tracer_provider,
)

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
