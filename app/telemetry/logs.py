"""Structured logs that carry the trace: one stderr handler on the root logger, text or JSON.

Lines (JSON via orjson, or text) hold timestamp, level, logger, message, the current span's
trace_id/span_id, and tenant_id/exception_id/event_id/stage when given through ``extra=`` or
:func:`log_context`, so a log line leads to its trace and back. :func:`setup_logging` configures a
process directly; :func:`logging_config` gives the same as a dictConfig for runners (Faust's worker)
that configure logging themselves. Nothing here logs per event at INFO.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, TextIO

import orjson
from opentelemetry import trace

from app.telemetry.errors import TelemetryConfigError

__all__ = [
    "JsonFormatter",
    "StderrHandler",
    "TextFormatter",
    "log_context",
    "logging_config",
    "setup_logging",
]

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
    formatter = "app.telemetry.logs.JsonFormatter" if json else "app.telemetry.logs.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"sluice": {"()": formatter}},
        "handlers": {"sluice": {"()": "app.telemetry.logs.StderrHandler", "formatter": "sluice"}},
        "root": {"level": logging.getLevelName(_level(level)), "handlers": ["sluice"]},
    }
