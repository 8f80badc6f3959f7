"""Whether this process traces, and through which provider: OpenTelemetry setup from OTEL_* only.

Tracing is off unless configured (``OTEL_TRACES_EXPORTER``, or an OTLP endpoint): then no provider is
installed, :data:`_state` keeps no tracer, and every span helper in :mod:`app.telemetry.spans` returns
a shared no-op handle after one attribute check, so the hot path pays next to nothing. That check
reads ``_state`` here, the one place that knows the tracer; setup, tests
(:func:`use_tracer_provider`) and shutdown change it in place and never rebind it.

Exporters are imported only when a provider is built, so importing this module starts nothing.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Tracer

from app.telemetry.errors import TelemetryConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "INSTRUMENTATION_NAME",
    "build_tracer_provider",
    "get_tracer",
    "instrument_fastapi",
    "instrument_httpx",
    "setup_tracing",
    "shutdown_tracing",
    "tracing_enabled",
    "use_tracer_provider",
]

INSTRUMENTATION_NAME: Final = "sluice"


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
