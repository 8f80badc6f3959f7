"""The HTTP API process: ingest and query endpoints in front of Kafka and the workers' tables.

``create_api(settings)`` builds the application; the module-level ``app`` is what ``sluice api`` serves
(``uvicorn api.main:app``). The lifespan loads the API keys (a configuration error stops the process
at startup, with the error's text) and watches their file for changes (``api.key_reload``), reads each
tenant's ``[limits]`` once (``api.limits``; a change needs a restart, as it does for the workers),
starts the Kafka producer in the background (the API starts
and answers 503 while the broker is unreachable) and opens the HTTP client to the workers; it closes them
on shutdown. A body size limit sits in front of everything (413), and every error is a problem document.

Telemetry (``app.telemetry``): logging per SLUICE_LOG_LEVEL / SLUICE_LOG_FORMAT; when the OTEL_*
variables turn tracing on, a server span per request (the parent of the ``send {topic}`` spans whose
traceparent goes to Kafka) and client spans for reads from workers, flushed at shutdown. Ingest
requests are counted by route and status code (``sluice_ingest_requests_total``) by a middleware
outside the body limit, so 413s count too; ``GET /metrics`` serves the Prometheus text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.body_limit import BodyLimitMiddleware
from api.deps import DENIAL_REASONS, ROLE_NEEDS, Runtime, route_roles
from api.idempotency import Idempotency
from api.key_reload import KeyFileWatcher, load_key_file
from api.limits import AuthFailureThrottle, IngestLimiter
from api.producer import KafkaEventProducer
from api.reader import WorkerReader
from api.routes import approvals, audit, exceptions, health, operations
from app.settings import Settings, get_settings
from app.telemetry import (
    instrument_fastapi,
    instrument_httpx,
    metrics,
    setup_logging,
    setup_tracing,
    shutdown_tracing,
)
from schemas.api import Problem
from schemas.config import ApiKeys, ConfigError, LimitsConfig, api_keys_path, load_tenant_limits

log = logging.getLogger("sluice.api")

_DESCRIPTION = """
Ingest operational exceptions and follow them through the Sluice pipeline
(intake, triage, policy, playbook, tools).

Every `/v1` request carries an API key of the tenant in `X-API-Key`; it decides the tenant, and every
read is scoped to it. Each key has a role, and each route says which it needs (`x-sluice-role`):

| role | may |
|---|---|
| `producer` | report exceptions (`POST /v1/exceptions`, `POST /v1/exceptions:batch`), nothing else |
| `viewer` | read everything of its tenant |
| `operator` | what a viewer may, and approve, reject, redrive and discard |
| `admin` | what an operator may, and change configuration and report exceptions |

A missing or unknown key answers **401**, a key whose role may not use the route **403**. A client
address with too many 401s gets **429** with `Retry-After` for a while, whatever key it sends; so does
a tenant reporting faster than its `[limits]` allow. Reports are
accepted with **202** once Kafka has acknowledged them; errors are
[RFC 9457](https://www.rfc-editor.org/rfc/rfc9457) problem documents.
"""


INGEST_ROUTES = frozenset({"/v1/exceptions", "/v1/exceptions:batch"})


class IngestMetricsMiddleware:
    """Counts every answer to a POST on an ingest route by route and status code; a request that
    raised past every handler counts as the 500 the server answers."""

    def __init__(self, app: ASGIApp, routes: frozenset[str] = INGEST_ROUTES) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path") if scope["type"] == "http" else None
        if scope.get("method") != "POST" or path not in self.routes:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            metrics.ingest_request(str(path), status)


def create_api(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    setup_logging(settings.log_level, json=settings.log_format == "json")
    setup_tracing("sluice-api")  # None, and nothing installed, unless OTEL_* asks for traces

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys_path = api_keys_path(settings.config_dir)
        try:
            api_keys, content = load_key_file(keys_path)
        except ConfigError as exc:
            log.error("The Sluice API cannot start: %s", exc)
            raise
        if not api_keys.keys:
            log.warning(
                "%s lists no API keys: every /v1 request will be refused with 401 until it does",
                keys_path,
            )
        try:
            limits = _tenant_limits(settings)
        except ConfigError as exc:
            log.error("The Sluice API cannot start: %s", exc)
            raise
        ingest_limits = IngestLimiter(limits)
        metrics.declare_api_denials(DENIAL_REASONS)
        metrics.declare_rate_limited(sorted(ingest_limits.limits))
        producer = KafkaEventProducer(settings)
        producer.start()
        reader = WorkerReader(settings)
        runtime = Runtime(
            settings=settings,
            api_keys=api_keys,
            producer=producer,
            reader=reader,
            idempotency=Idempotency(settings.idempotency_key_ttl_seconds),
            ingest_limits=ingest_limits,
            auth_throttle=AuthFailureThrottle(settings.auth_failures_per_minute),
        )
        app.state.runtime = runtime

        def use_keys(keys: ApiKeys) -> None:
            runtime.api_keys = keys

        watcher = KeyFileWatcher(keys_path, api_keys, content, use_keys)
        watching = asyncio.create_task(watcher.run(), name="api-keys-reload")
        try:
            yield
        finally:
            watching.cancel()
            with suppress(asyncio.CancelledError):
                await watching
            app.state.runtime = None
            await reader.close()
            await producer.close()
            shutdown_tracing()  # flushes the spans still queued

    api = FastAPI(
        title="Sluice",
        version="0.1.0",
        description=_DESCRIPTION,
        lifespan=lifespan,
    )
    errors.install(api)
    api.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    api.add_middleware(IngestMetricsMiddleware)
    instrument_fastapi(api)
    instrument_httpx()
    api.include_router(health.router)
    api.include_router(exceptions.router)
    api.include_router(operations.router)
    api.include_router(approvals.router)
    api.include_router(audit.router)

    generate = api.openapi

    def openapi() -> dict[str, Any]:
        schema = api.openapi_schema
        if schema is None:  # generate() caches what it returns, so this runs once
            schema = generate()
            _document_roles(schema, api.routes)
            _problem_media_type(schema)
        return schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


def _tenant_limits(settings: Settings) -> dict[str, LimitsConfig]:
    """Each tenant's ``[limits]``; none, with a warning, when there is no tenants folder (an API
    deployed with api_keys.toml alone keeps working, unlimited)."""
    folder = settings.config_dir / "tenants"
    if not folder.is_dir():
        log.warning(
            "%s does not exist: no tenant has ingest limits in this API process. Point "
            "SLUICE_CONFIG_DIR at the folder the workers use to apply each tenant's [limits].",
            folder,
        )
        return {}
    limits = load_tenant_limits(settings.config_dir)
    for tenant, limit in sorted(limits.items()):
        if limit.limited:
            log.info(
                "tenant %s may report %g exceptions a second, %d at once (per API process)",
                tenant,
                limit.ingest_per_second,
                limit.burst,
            )
    return limits


_ROLE_PROBLEMS = {
    "401": "X-API-Key is missing or not a valid key.",
    "403": "The key is valid, but its role may not use this route; the detail names the role needed.",
    "429": "Too many requests from this client address failed authentication; retry after "
    "Retry-After seconds (SLUICE_AUTH_FAILURES_PER_MINUTE).",
}


def _document_roles(schema: dict[str, Any], routes: Sequence[BaseRoute]) -> None:
    """State on each operation the role its route requires: ``x-sluice-role``, a sentence in the
    description, and the 401 and 403 answers. Read from the routes' dependencies, so the document
    says what is enforced."""
    problem = {"$ref": "#/components/schemas/Problem"}
    schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(
        "Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    )
    for found in route_roles(routes):
        operation = schema["paths"].get(found.path, {}).get(found.method.lower())
        if found.role is None or operation is None:  # open, or left out of the schema
            continue
        operation["x-sluice-role"] = found.role
        sentence = f"**Role:** needs an API key with {ROLE_NEEDS[found.role]}."
        above = operation.get("description", "").strip()
        operation["description"] = f"{above}\n\n{sentence}" if above else sentence
        responses = operation.setdefault("responses", {})
        for status, description in _ROLE_PROBLEMS.items():
            responses.setdefault(
                status,
                {"description": description, "content": {"application/json": {"schema": problem}}},
            )


def _problem_media_type(schema: dict[str, Any]) -> None:
    """Error answers are application/problem+json; FastAPI documents every model as application/json."""
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status.startswith(("4", "5")) and "application/json" in content:
                    media = content["application/json"]
                    if media.get("schema", {}).get("$ref", "").endswith("/Problem"):
                        content["application/problem+json"] = content.pop("application/json")


app = create_api()
