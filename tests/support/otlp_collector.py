"""A real OTLP/HTTP trace collector on loopback, for tests that check what a process exports.

It listens on 127.0.0.1 with a free port and accepts ``POST /v1/traces`` with a protobuf body
(``application/x-protobuf``, what OTLPSpanExporter sends, gzip or not) or an OTLP/JSON body
(``application/json``, hex trace and span ids), decoded with opentelemetry-proto's
``ExportTraceServiceRequest``. Point a process at it with ``OTEL_EXPORTER_OTLP_ENDPOINT=<url>`` and
``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``; read what arrived with :meth:`OTLPCollector.spans`,
:meth:`OTLPCollector.traces` and :meth:`OTLPCollector.wait_for`.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeVar

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

T = TypeVar("T")


@dataclass(frozen=True)
class SpanEvent:
    name: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class CollectedSpan:
    """One exported span; ids are lowercase hex (32 digits for traces, 16 for spans)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str  # SERVER, CLIENT, PRODUCER, CONSUMER, INTERNAL
    attributes: dict[str, Any]
    events: list[SpanEvent]
    service_name: str | None
    status_code: str  # UNSET, OK, ERROR
    scope: str = ""
    received_at: float = field(default_factory=time.time)


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items if isinstance(kv, KeyValue)}


def _kind(kind: int) -> str:
    return Span.SpanKind.Name(kind).removeprefix("SPAN_KIND_")


def _spans_of(request: ExportTraceServiceRequest) -> list[CollectedSpan]:
    out = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = resource.get("service.name")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(
                    CollectedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        name=span.name,
                        kind=_kind(span.kind),
                        attributes=_attributes(span.attributes),
                        events=[SpanEvent(e.name, _attributes(e.attributes)) for e in span.events],
                        service_name=service if isinstance(service, str) else None,
                        status_code=span.status.StatusCode.Name(span.status.code).removeprefix(
                            "STATUS_CODE_"
                        ),
                        scope=scope_spans.scope.name,
                    )
                )
    return out


_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON writes trace and span ids as hex; protobuf's JSON mapping expects base64."""
    if isinstance(node, dict):
        return {
            k: (
                base64.b64encode(bytes.fromhex(v)).decode()
                if k in _ID_FIELDS and isinstance(v, str)
                else _hex_ids_to_base64(v)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_hex_ids_to_base64(v) for v in node]
    return node


def decode_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    if content_type.split(";")[0].strip() == "application/json":
        json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), request)
    else:
        request.ParseFromString(body)
    return request


class OTLPCollector:
    """Loopback OTLP/HTTP collector; use as a context manager or call start() and stop()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[CollectedSpan] = []
        self._requests = 0
        self._errors: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OTLPCollector:
        if self._server is not None:
            raise RuntimeError("the OTLP collector is already running")
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-collector",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> OTLPCollector:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the OTLP collector is not running; call start() first")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base endpoint, as OTEL_EXPORTER_OTLP_ENDPOINT wants it (the exporter adds /v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------------------ inspection

    def spans(self) -> list[CollectedSpan]:
        """Every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def traces(self) -> dict[str, list[CollectedSpan]]:
        """Spans received so far, grouped by trace id."""
        grouped: dict[str, list[CollectedSpan]] = {}
        for span in self.spans():
            grouped.setdefault(span.trace_id, []).append(span)
        return grouped

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    @property
    def errors(self) -> list[str]:
        """Bodies the collector could not decode (each answered 400)."""
        with self._lock:
            return list(self._errors)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._errors.clear()
            self._requests = 0

    def wait_for(
        self, predicate: Callable[[list[CollectedSpan]], T | None], timeout: float = 15.0
    ) -> T:
        """Poll until ``predicate(spans)`` returns something truthy and return it; fail with the
        spans that did arrive if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            result = predicate(spans)
            if result:
                return result
            if time.monotonic() >= deadline:
                seen = [(s.name, s.kind, s.trace_id[:8], s.parent_span_id) for s in spans]
                raise AssertionError(
                    f"the collector did not receive the expected spans within {timeout}s; "
                    f"got {len(spans)} in {self.requests} request(s): {seen}; errors: {self.errors}"
                )
            time.sleep(0.05)

    # ---------------------------------------------------------------------------- receiving

    def _receive(self, body: bytes, content_type: str) -> None:
        request = decode_request(body, content_type)
        spans = _spans_of(request)
        with self._lock:
            self._requests += 1
            self._spans.extend(spans)

    def _failed(self, error: str) -> None:
        with self._lock:
            self._errors.append(error)


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        owner: OTLPCollector,
    ) -> None:
        self.owner = owner
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # an exporter that gave up mid-request is not the collector's failure


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        content_type = self.headers.get("Content-Type") or "application/x-protobuf"
        if self.path.split("?", 1)[0] != "/v1/traces":
            self._answer(404, b"only /v1/traces is collected here", "text/plain")
            return
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            self.server.owner._receive(body, content_type)
        except Exception as exc:  # a malformed body: record it, answer 400 like a collector
            self.server.owner._failed(f"{type(exc).__name__}: {exc}")
            self._answer(400, str(exc).encode(), "text/plain")
            return
        if content_type.startswith("application/json"):
            self._answer(200, b"{}", "application/json")
        else:
            response = ExportTraceServiceResponse().SerializeToString()
            self._answer(200, response, "application/x-protobuf")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass
