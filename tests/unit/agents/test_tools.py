"""The tools against a real loopback HTTP server: request shapes, headers, error classification."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from agents.tools import (
    NoopTool,
    NotifyTool,
    PermanentToolError,
    TicketTool,
    ToolError,
    TransientToolError,
    WebhookTool,
    build_tools,
    parse_retry_after,
)
from schemas.config import TenantConfig, ToolConfig
from schemas.events import (
    ExceptionContext,
    ExceptionPlanned,
    ExceptionReport,
    PlannedPayload,
    PlannedStep,
    Severity,
)
from tests.support.mock_http import MockHTTPServer, unused_url

KEY = "exc-1:plan-event:step-1"
LONG_MESSAGE = "Card declined by issuer " + "x" * 200


def planned(*steps: PlannedStep, message: str = LONG_MESSAGE) -> ExceptionPlanned:
    report = ExceptionReport(
        source="payments", error_type="CardDeclined", message=message, attributes={"order": "o-1"}
    )
    context = ExceptionContext(
        report=report,
        fingerprint="fp-1",
        is_repeat=False,
        occurrences_in_window=1,
        severity=Severity.high,
        category="payments",
    )
    return ExceptionPlanned(
        event_id=uuid.uuid4(),
        tenant_id="acme",
        exception_id="exc-1",
        sequence=5,
        occurred_at=datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        causation_id=uuid.uuid4(),
        correlation_id=uuid.uuid4(),
        payload=PlannedPayload(context=context, playbook_id="payments", steps=steps),
    )


def step(tool: str, action: str = "act", **params: Any) -> PlannedStep:
    return PlannedStep(step_id="step-1", tool=tool, action=action, params=params)


@pytest.fixture
def server() -> Iterator[MockHTTPServer]:
    with MockHTTPServer() as mock:
        yield mock


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


def config(kind: str, url: str, **extra: Any) -> ToolConfig:
    return ToolConfig.model_validate({"kind": kind, "url": url, **extra})


# ------------------------------------------------------------------------------ request shapes


async def test_webhook_posts_the_step_and_exception_summary(
    server: MockHTTPServer, client: httpx.AsyncClient
) -> None:
    tool = WebhookTool(
        "hook", config("webhook", f"{server.url}/hooks/a", headers={"X-Team": "pay"}), client
    )
    event = planned()
    detail = await tool.call(step("hook", "retry", order="o-1"), KEY, event)

    assert detail == {"status": 200}
    [request] = server.calls()
    assert (request.method, request.path) == ("POST", "/hooks/a")
    assert request.json == {
        "exception_id": "exc-1",
        "tenant_id": "acme",
        "step_id": "step-1",
        "action": "retry",
        "params": {"order": "o-1"},
        "severity": "high",
        "category": "payments",
        "source": "payments",
        "error_type": "CardDeclined",
        "message": LONG_MESSAGE,
    }
    assert request.headers["idempotency-key"] == KEY
    assert request.headers["CONTENT-TYPE"] == "application/json"
    assert request.headers["x-team"] == "pay"


async def test_ticket_posts_to_tickets_and_returns_the_ticket_id(
    server: MockHTTPServer, client: httpx.AsyncClient
) -> None:
    tool = TicketTool("tickets", config("ticket", f"{server.url}/desk/"), client)
    detail = await tool.call(step("tickets", "create", queue="payments"), KEY, planned())

    assert detail == {"status": 201, "ticket_id": "T-1"}
    [request] = server.calls()
    assert request.path == "/desk/tickets"
    assert request.headers["Idempotency-Key"] == KEY
    body = request.json
    assert body["title"] == f"[high] payments: {LONG_MESSAGE[:120]}"
    assert LONG_MESSAGE in body["description"]
    assert {k: body[k] for k in ("action", "params", "exception_id", "tenant_id")} == {
        "action": "create",
        "params": {"queue": "payments"},
        "exception_id": "exc-1",
        "tenant_id": "acme",
    }


async def test_notify_posts_to_notify_with_channel_default(
    server: MockHTTPServer, client: httpx.AsyncClient
) -> None:
    tool = NotifyTool("chat", config("notify", server.url), client)
    await tool.call(step("chat", "page", channel="#payments"), KEY, planned())
    await tool.call(step("chat", "page"), "other-key", planned())

    first, second = server.calls("/notify")
    assert first.json["channel"] == "#payments"
    assert second.json["channel"] == "default"
    assert first.json["exception_id"] == "exc-1"
    assert first.json["action"] == "page"
    assert "Card declined by issuer" in first.json["text"]
    assert server.calls_by_idempotency_key() == {KEY: 1, "other-key": 1}


async def test_noop_makes_no_request(server: MockHTTPServer) -> None:
    assert await NoopTool().call(step("noop"), KEY, planned()) == {"noop": True}
    assert server.calls() == []


async def test_build_tools_makes_one_tool_per_config_entry(
    server: MockHTTPServer, client: httpx.AsyncClient
) -> None:
    tenant = TenantConfig.model_validate(
        {
            "tenant_id": "acme",
            "tools": {
                "hook": {"kind": "webhook", "url": server.url},
                "desk": {"kind": "ticket", "url": server.url},
                "chat": {"kind": "notify", "url": server.url},
                "nothing": {"kind": "noop"},
            },
        }
    )
    tools = build_tools(tenant, client)
    assert {name: type(tool) for name, tool in tools.items()} == {
        "hook": WebhookTool,
        "desk": TicketTool,
        "chat": NotifyTool,
        "nothing": NoopTool,
    }
    assert all(tool.name == name for name, tool in tools.items())


# ------------------------------------------------------------------------------ classification


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
async def test_retryable_statuses_are_transient(
    server: MockHTTPServer, client: httpx.AsyncClient, status: int
) -> None:
    server.fail("/", status)
    tool = WebhookTool("hook", config("webhook", server.url), client)
    with pytest.raises(TransientToolError) as caught:
        await tool.call(step("hook"), KEY, planned())
    error = caught.value
    assert error.retryable
    assert error.status == status
    assert error.retry_after is None
    assert f"HTTP {status}" in error.message
    assert "'hook'" in error.message
    assert server.url in error.message


async def test_retry_after_in_seconds_is_parsed(
    server: MockHTTPServer, client: httpx.AsyncClient
) -> None:
    server.fail("/tickets", 429, retry_after=7)
    tool = TicketTool("desk", config("ticket", server.url), client)
    with pytest.raises(TransientToolError) as caught:
        await tool.call(step("desk"), KEY, planned())
    assert caught.value.retry_after == 7.0


async def test_retry_after_as_http_date_is_parsed(
    server: MockHTTPServer, client: httpx.AsyncClient
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    server.fail("/", 503, retry_after=format_datetime(when, usegmt=True))
    tool = WebhookTool("hook", config("webhook", server.url), client)
    with pytest.raises(TransientToolError) as caught:
        await tool.call(step("hook"), KEY, planned())
    assert caught.value.retry_after is not None
    assert 100 < caught.value.retry_after <= 120


def test_parse_retry_after_handles_past_dates_and_garbage() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("Sat, 01 Mar 2025 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Sat, 01 Mar 2025 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-5", now) is None
    assert parse_retry_after(None, now) is None


async def test_timeout_is_transient(server: MockHTTPServer, client: httpx.AsyncClient) -> None:
    server.delay("/", 2.0)
    tool = WebhookTool("hook", config("webhook", server.url, timeout_seconds=0.1), client)
    with pytest.raises(TransientToolError, match="timed out") as caught:
        await tool.call(step("hook"), KEY, planned())
    assert caught.value.status is None


async def test_connection_refused_is_transient(client: httpx.AsyncClient) -> None:
    url = unused_url()
    tool = WebhookTool("hook", config("webhook", url), client)
    with pytest.raises(TransientToolError) as caught:
        await tool.call(step("hook"), KEY, planned())
    assert url in caught.value.message
    assert caught.value.status is None


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422])
async def test_other_client_errors_are_permanent(
    server: MockHTTPServer, client: httpx.AsyncClient, status: int
) -> None:
    server.fail("/notify", status)
    tool = NotifyTool("chat", config("notify", server.url), client)
    with pytest.raises(PermanentToolError) as caught:
        await tool.call(step("chat"), KEY, planned())
    assert not caught.value.retryable
    assert caught.value.status == status
    assert f"HTTP {status}" in caught.value.message


@pytest.mark.parametrize(
    ("body", "complaint"),
    [({"ok": True}, "without an 'id'"), ("<html>created</html>", "without a JSON body")],
)
async def test_ticket_answer_without_an_id_is_permanent(
    server: MockHTTPServer, client: httpx.AsyncClient, body: Any, complaint: str
) -> None:
    server.respond("/tickets", 201, body)
    tool = TicketTool("desk", config("ticket", server.url), client)
    with pytest.raises(PermanentToolError, match=complaint) as caught:
        await tool.call(step("desk"), KEY, planned())
    assert caught.value.status == 201


def test_tool_errors_share_a_base_class() -> None:
    assert issubclass(TransientToolError, ToolError)
    assert issubclass(PermanentToolError, ToolError)
    error = TransientToolError("slow", status=503, retry_after=2.0)
    assert (error.message, error.status, error.retry_after, str(error)) == (
        "slow",
        503,
        2.0,
        "slow",
    )
