"""W3C trace context in Kafka headers: how one ingested exception stays one trace across stages.

A ``send {topic}`` PRODUCER span injects ``traceparent`` (and ``tracestate``) into the record it
wraps (:func:`inject_headers`), and the stage that consumes the record takes its parent from those
headers (:func:`extract_context`). The aiokafka instrumentation is deliberately not used: it would
inject a second traceparent. Pure functions of headers and context: no provider needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["HeadersLike", "KafkaHeaders", "extract_context", "inject_headers"]

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
