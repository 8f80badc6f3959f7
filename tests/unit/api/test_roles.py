"""Roles on API keys: every tenant route answers each role as the route's role requires.

The routes are read from the app itself, so a route added later is in the matrix without anyone
remembering to add it; :func:`expected_role` says what issue 15 gives each kind of route, and a route
it classifies wrongly fails here until someone decides.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from api.deps import get_producer, route_roles
from api.main import INGEST_ROUTES, create_api
from api.main import app as served_app
from app.telemetry import REGISTRY
from schemas.codec import decode
from schemas.config import ROLES, Role, role_allows
from schemas.events import ExceptionDiscardRequested, ExceptionRedriveRequested
from tests.support.mock_http import MockHTTPServer
from tests.unit.api.conftest import (
    ROLE_KEYS,
    FakeProducer,
    FakeReader,
    as_role,
    make_settings,
    report,
)

OPEN_PATHS = {"/healthz", "/readyz", "/metrics"}


def tenant_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route that serves a tenant's data: all but health and metrics
    (the docs and /openapi.json are not API routes)."""
    return sorted(
        (found.method, found.path)
        for found in route_roles(app.routes)
        if found.path not in OPEN_PATHS
    )


def expected_role(method: str, path: str) -> Role:
    """Issue 15: ingest needs a producer, every GET a viewer, configuration changes an admin, and
    every other action (approve, reject, redrive, discard, quarantine) an operator."""
    if method == "POST" and path in INGEST_ROUTES:
        return "producer"
    if method == "GET":
        return "viewer"
    if path.startswith("/v1/config"):
        return "admin"
    return "operator"


ROUTES = tenant_routes(served_app)

PATH_VALUES = {"exception_id": "exc-1", "stage": "tool"}
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/exceptions"): report(),
    ("POST", "/v1/exceptions:batch"): {"items": [report()]},
    ("POST", "/v1/exceptions/{exception_id}/discard"): {"reason": "refunded by hand"},
}
# What a key allowed on the route gets here: reads of an empty store, and worker reads with no
# worker listening. A route missing from this table must only not answer 401 or 403.
NORMAL = {
    ("POST", "/v1/exceptions"): 202,
    ("POST", "/v1/exceptions:batch"): 200,
    ("GET", "/v1/exceptions"): 200,
    ("GET", "/v1/exceptions/{exception_id}"): 404,
    ("GET", "/v1/exceptions/{exception_id}/events"): 404,
    ("GET", "/v1/dlq"): 503,
    ("GET", "/v1/dlq/{stage}/{exception_id}"): 503,
    ("GET", "/v1/pipeline/stats"): 503,
    ("POST", "/v1/exceptions/{exception_id}/redrive"): 503,
    ("POST", "/v1/exceptions/{exception_id}/discard"): 503,
}


def test_the_matrix_sees_the_routes_there_are_today() -> None:
    assert set(NORMAL) <= set(ROUTES)
    assert len(ROUTES) >= 10


async def send(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]
) -> httpx.Response:
    url = path.format(**{name: PATH_VALUES.get(name, "x") for name in _params(path)})
    body = BODIES.get((method, path), {} if method in ("POST", "PUT", "PATCH") else None)
    return await client.request(method, url, json=body, headers=headers)


def _params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def denials(reason: str) -> float:
    return REGISTRY.get_sample_value("sluice_api_denials_total", {"reason": reason}) or 0.0


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
async def test_each_role_gets_the_routes_answer_or_403_naming_the_role(
    client: httpx.AsyncClient,
    producer: FakeProducer,
    reader: FakeReader,
    method: str,
    path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    needed = expected_role(method, path)
    for role in ROLES:
        before = denials("role")
        caplog.clear()
        with caplog.at_level(logging.INFO):
            resp = await send(client, method, path, as_role(role))
        if role_allows(role, needed):
            assert resp.status_code not in (401, 403), (role, resp.text)
            if (method, path) in NORMAL:
                assert resp.status_code == NORMAL[method, path], (role, resp.text)
            continue
        assert resp.status_code == 403, (role, resp.text)
        assert resp.headers["content-type"] == "application/problem+json"
        problem = resp.json()
        assert problem["title"] == "Forbidden"
        assert f"needs a key with the {needed} role" in problem["detail"]
        assert f"has the {role} role" in problem["detail"]
        assert f"'acme {role}'" in problem["detail"]  # names the key, so its owner knows which
        assert denials("role") == before + 1
        # A refusal is a counted answer, not a log line.
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
async def test_a_missing_or_unknown_key_is_401_on_every_tenant_route(
    client: httpx.AsyncClient, producer: FakeProducer, method: str, path: str
) -> None:
    for headers, reason, says in (
        ({}, "missing_key", "The X-API-Key header is missing"),
        ({"X-API-Key": "not-a-key"}, "unknown_key", "is not valid"),
        ({"X-API-Key": ""}, "missing_key", "The X-API-Key header is missing"),
    ):
        before = denials(reason)
        resp = await send(client, method, path, headers)
        assert resp.status_code == 401, resp.text
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.headers["WWW-Authenticate"] == 'ApiKey header="X-API-Key"'
        assert says in resp.json()["detail"]
        assert denials(reason) == before + 1


async def test_health_and_metrics_need_no_key(client: httpx.AsyncClient) -> None:
    for path in sorted(OPEN_PATHS):
        assert (await client.get(path)).status_code in (200, 503), path  # readyz: no broker


async def test_the_metrics_page_has_the_denial_reasons_from_the_start(
    client: httpx.AsyncClient,
) -> None:
    text = (await client.get("/metrics")).text
    for reason in ("missing_key", "unknown_key", "role"):
        assert f'sluice_api_denials_total{{reason="{reason}"}}' in text


async def test_the_openapi_says_which_role_each_route_needs(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    for method, path in ROUTES:
        operation = doc["paths"][path][method.lower()]
        role = expected_role(method, path)
        assert operation["x-sluice-role"] == role, (method, path)
        assert f"**Role:** needs an API key with the {role} role" in operation["description"]
        assert operation["security"] == [{"ApiKey": []}]
        for status in ("401", "403"):
            content = operation["responses"][status]["content"]
            assert list(content) == ["application/problem+json"], (method, path, status)
            assert content["application/problem+json"]["schema"]["$ref"].endswith("/Problem")
    for path in OPEN_PATHS:
        assert "x-sluice-role" not in doc["paths"][path]["get"]
    assert "| `operator` |" in doc["info"]["description"]


# ---------------------------------------------------------------------------- who asked


@pytest.fixture
def workers() -> Iterator[MockHTTPServer]:
    with MockHTTPServer() as server:
        yield server


@pytest.fixture
async def ops(
    config_dir: Path, workers: MockHTTPServer
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeProducer]]:
    """The API reading dead letters from a mock worker, its sends kept by a fake producer."""
    api = create_api(make_settings(config_dir, worker_urls=[workers.url]))
    fake = FakeProducer()
    api.dependency_overrides[get_producer] = lambda: fake
    async with (
        api.router.lifespan_context(api),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as client,
    ):
        yield client, fake


def quarantined(exception_id: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "stage": "tool",
        "exception_id": exception_id,
        "tenant_id": "acme",
        "since": None,
        "head": {"key": None},
        "parked": [],
        "parked_count": 0,
    }
    return {"items": [entry]}


@pytest.mark.parametrize(
    ("action", "event_type"),
    [("redrive", ExceptionRedriveRequested), ("discard", ExceptionDiscardRequested)],
)
async def test_the_request_event_names_the_key_and_role_that_asked(
    ops: tuple[httpx.AsyncClient, FakeProducer],
    workers: MockHTTPServer,
    action: str,
    event_type: type,
) -> None:
    client, producer = ops
    workers.respond("/sluice/dlq", 200, quarantined("exc-1"))
    resp = await client.post(
        f"/v1/exceptions/exc-1/{action}",
        json={"reason": "webhook fixed"},
        headers=as_role("operator"),
    )
    assert resp.status_code == 202, resp.text
    [record] = producer.sent
    event = decode(record.value)
    assert isinstance(event, event_type)
    assert isinstance(event, ExceptionRedriveRequested | ExceptionDiscardRequested)
    assert event.payload.requested_by == "acme operator"
    assert event.payload.role == "operator"
    assert event.payload.reason == "webhook fixed"


async def test_the_body_cannot_claim_another_actor(
    ops: tuple[httpx.AsyncClient, FakeProducer], workers: MockHTTPServer
) -> None:
    client, producer = ops
    workers.respond("/sluice/dlq", 200, quarantined("exc-1"))
    resp = await client.post(
        "/v1/exceptions/exc-1/redrive",
        json={"reason": "x", "requested_by": "someone else"},
        headers=as_role("admin"),
    )
    assert resp.status_code == 422
    assert "requested_by" in resp.json()["detail"]
    assert producer.sent == []


def test_an_event_written_before_roles_still_decodes() -> None:
    old = {
        "event_id": "6f1c1f9e-8f7e-4d43-9a43-1c8f6f1b2a10",
        "tenant_id": "acme",
        "exception_id": "exc-1",
        "sequence": 1,
        "occurred_at": "2025-01-01T00:00:00Z",
        "causation_id": None,
        "correlation_id": "6f1c1f9e-8f7e-4d43-9a43-1c8f6f1b2a10",
        "event_type": "ExceptionRedriveRequested",
        "payload": {"stage": "tool", "requested_by": "api:acme", "reason": None},
    }
    event = decode(orjson.dumps(old))
    assert isinstance(event, ExceptionRedriveRequested)
    assert (event.payload.requested_by, event.payload.role) == ("api:acme", None)


def test_role_keys_cover_every_role() -> None:
    assert set(ROLE_KEYS) == set(ROLES)
