"""The tools a playbook step can call, one small class per kind of endpoint.

The tool stage's core (:mod:`agents.tool`) sees only the :class:`Tool` protocol and the two error
classes: a :class:`TransientToolError` is worth retrying (timeouts, connection errors, 408, 429, 5xx),
a :class:`PermanentToolError` is not (other 4xx, answers that make no sense). Every HTTP call carries
the step's ``Idempotency-Key`` so an endpoint that honours it turns Sluice's at-least-once delivery
into effectively-once side effects. :func:`build_tools` turns a tenant's ``[tools]`` table into tools
that share one ``httpx.AsyncClient`` (one connection pool per worker).
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

import httpx
import orjson

from schemas.config import TenantConfig, ToolConfig
from schemas.events import ExceptionPlanned, PlannedStep


class ToolError(Exception):
    """A tool call that did not succeed; ``retryable`` says whether calling again may help."""

    retryable: ClassVar[bool] = False

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


class TransientToolError(ToolError):
    """The endpoint may succeed later: timeouts, connection errors, HTTP 408, 429 and 5xx."""

    retryable = True


class PermanentToolError(ToolError):
    """Calling again with the same request will fail the same way: other 4xx, invalid answers."""

    retryable = False


class Tool(Protocol):
    name: str

    async def call(
        self, step: PlannedStep, idempotency_key: str, event: ExceptionPlanned
    ) -> dict[str, Any]:
        """Run ``step`` once and return a small JSON-able detail dict, or raise a ToolError."""
        ...


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 10.2.3).

    None when absent or unreadable, since a garbled header should not block a retry forever.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if 0 <= seconds < float("inf") else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _is_transient_status(status: int) -> bool:
    return status in (408, 429) or 500 <= status <= 599


class _HttpTool:
    """What the HTTP tools share: headers, timeout, JSON encoding and error classification."""

    kind: ClassVar[str]

    def __init__(self, name: str, config: ToolConfig, client: httpx.AsyncClient) -> None:
        if not config.url:
            raise ValueError(f"tool {name!r} ({self.kind}) needs a url in its [tools] entry")
        self.name = name
        self.config = config
        self.url = config.url.rstrip("/")
        self._client = client

    def _describe(self, url: str) -> str:
        return f"Tool {self.name!r} ({self.kind}) POST {url}"

    async def _post(self, url: str, body: Mapping[str, Any], key: str) -> httpx.Response:
        headers = {
            **self.config.headers,
            "Idempotency-Key": key,
            "Content-Type": "application/json",
        }
        what = self._describe(url)
        try:
            response = await self._client.post(
                url,
                content=orjson.dumps(body, default=str),
                headers=headers,
                timeout=self.config.timeout_seconds,
            )
        except httpx.TimeoutException as exc:
            raise TransientToolError(
                f"{what} timed out after {self.config.timeout_seconds:g}s ({type(exc).__name__})."
            ) from exc
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
            raise PermanentToolError(
                f"{what} cannot be sent ({exc}); check the tool's url and headers."
            ) from exc
        except httpx.TransportError as exc:
            raise TransientToolError(
                f"{what} failed to connect or was cut off: {str(exc) or type(exc).__name__}."
            ) from exc
        except httpx.InvalidURL as exc:
            raise PermanentToolError(f"{what}: the url is invalid ({exc}).") from exc
        status = response.status_code
        if 200 <= status <= 299:
            return response
        reason = f"HTTP {status} {response.reason_phrase}".rstrip()
        if _is_transient_status(status):
            raise TransientToolError(
                f"{what} answered {reason}; the endpoint may accept it later.",
                status=status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        raise PermanentToolError(
            f"{what} answered {reason}; the request was refused and will not be retried.",
            status=status,
        )


def _summary(event: ExceptionPlanned) -> tuple[str, str, str]:
    """Severity, category and message of the exception, with placeholders before triage."""
    context = event.payload.context
    severity = context.severity.value if context.severity is not None else "unknown"
    category = context.category or "uncategorized"
    return severity, category, context.report.message


class WebhookTool(_HttpTool):
    """POSTs the whole step and exception summary to one url; any 2xx is success."""

    kind = "webhook"

    async def call(
        self, step: PlannedStep, idempotency_key: str, event: ExceptionPlanned
    ) -> dict[str, Any]:
        context = event.payload.context
        body = {
            "exception_id": event.exception_id,
            "tenant_id": event.tenant_id,
            "step_id": step.step_id,
            "action": step.action,
            "params": step.params,
            "severity": context.severity.value if context.severity is not None else None,
            "category": context.category,
            "source": context.report.source,
            "error_type": context.report.error_type,
            "message": context.report.message,
        }
        response = await self._post(self.url, body, idempotency_key)
        return {"status": response.status_code}


class TicketTool(_HttpTool):
    """Opens a ticket at ``{url}/tickets``; the ticket system's id goes into the step's detail."""

    kind = "ticket"

    async def call(
        self, step: PlannedStep, idempotency_key: str, event: ExceptionPlanned
    ) -> dict[str, Any]:
        severity, category, message = _summary(event)
        report = event.payload.context.report
        body = {
            "title": f"[{severity}] {category}: {message[:120]}",
            "description": (
                f"{report.error_type} from {report.source} "
                f"(exception {event.exception_id}, tenant {event.tenant_id}, "
                f"seen {event.payload.context.occurrences_in_window} time(s) in window).\n\n"
                f"{message}"
            ),
            "action": step.action,
            "params": step.params,
            "exception_id": event.exception_id,
            "tenant_id": event.tenant_id,
        }
        url = f"{self.url}/tickets"
        response = await self._post(url, body, idempotency_key)
        try:
            answer = response.json()
        except ValueError as exc:
            raise PermanentToolError(
                f"{self._describe(url)} answered HTTP {response.status_code} without a JSON body; "
                'a ticket endpoint must answer {"id": ...}.',
                status=response.status_code,
            ) from exc
        ticket_id = answer.get("id") if isinstance(answer, dict) else None
        if ticket_id is None:
            raise PermanentToolError(
                f"{self._describe(url)} answered HTTP {response.status_code} without an 'id'; "
                'a ticket endpoint must answer {"id": ...}.',
                status=response.status_code,
            )
        return {"status": response.status_code, "ticket_id": ticket_id}


class NotifyTool(_HttpTool):
    """Sends a one-line message to a channel through ``{url}/notify``."""

    kind = "notify"

    async def call(
        self, step: PlannedStep, idempotency_key: str, event: ExceptionPlanned
    ) -> dict[str, Any]:
        severity, category, message = _summary(event)
        channel = step.params.get("channel", "default")
        body = {
            "channel": channel,
            "text": f"[{severity}] {category}: {message[:500]} (exception {event.exception_id})",
            "exception_id": event.exception_id,
            "action": step.action,
        }
        response = await self._post(f"{self.url}/notify", body, idempotency_key)
        return {"status": response.status_code, "channel": channel}


class NoopTool:
    """Does nothing and succeeds: for dry runs and playbooks that only record a decision."""

    # Nothing outside Sluice changes, so the tool stage needs no durable intent before calling it.
    side_effects = False

    def __init__(self, name: str = "noop") -> None:
        self.name = name

    async def call(
        self, step: PlannedStep, idempotency_key: str, event: ExceptionPlanned
    ) -> dict[str, Any]:
        return {"noop": True}


_HTTP_KINDS: dict[str, Callable[[str, ToolConfig, httpx.AsyncClient], Tool]] = {
    cls.kind: cls for cls in (WebhookTool, TicketTool, NotifyTool)
}


def build_tools(config: TenantConfig, client: httpx.AsyncClient) -> dict[str, Tool]:
    """One tool per entry of the tenant's ``[tools]`` table, keyed by the name steps refer to."""
    tools: dict[str, Tool] = {}
    for name, tool_config in config.tools.items():
        if tool_config.kind == "noop":
            tools[name] = NoopTool(name)
        else:
            tools[name] = _HTTP_KINDS[tool_config.kind](name, tool_config, client)
    return tools
