"""The one error telemetry raises, shared by tracing and logging setup: both read environment
variables at startup, and a caller (the CLI, ``api.main``) wants one type to catch and report."""

from __future__ import annotations

__all__ = ["TelemetryConfigError"]


class TelemetryConfigError(ValueError):
    """An OTEL_* or SLUICE_LOG_* variable holds a value Sluice cannot use; the message says which."""
