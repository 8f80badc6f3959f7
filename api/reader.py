"""The API's read path: exception state comes from the workers' tables, over HTTP.

The API holds no state. Any worker answers a read for any exception (it routes the request to the
worker that owns the exception's partition), so :class:`WorkerReader` tries ``Settings.worker_urls`` in
turn and uses the first that answers; when none does it raises :class:`WorkerUnavailable` (the routes
answer 503). The worker contract:

- ``GET {worker}/sluice/exceptions/{exception_id}?tenant=<t>`` -> 200 ``{"state", "history"}``, or 404
  when the exception is unknown or belongs to another tenant;
- ``GET {worker}/sluice/exceptions?tenant=<t>&status=&severity=&stage=&limit=&cursor=`` -> 200
  ``{"items", "next_cursor"}``.

Tenant scoping is also checked here, so a worker bug cannot leak another tenant's exception.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from api.errors import ApiProblem, unavailable
from api.paging import invalid_query
from app.settings import Settings
from app.telemetry import metrics
from schemas.api import ExceptionListPublic
from schemas.state import ExceptionRecord

log = logging.getLogger("sluice.api.reader")


class WorkerUnavailable(Exception):
    """No worker answered; the message says which were tried and why each failed."""


class WorkerRefused(Exception):
    """A worker answered 400: the query itself is invalid, so no other worker would answer it.
    ``field`` names the parameter (the worker's ``field``, else ``query``)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


class ExceptionReader(Protocol):
    async def get_exception(self, tenant_id: str, exception_id: str) -> ExceptionRecord | None:
        """The exception's state and history, or None when the tenant has no such exception."""
        ...

    async def list_exceptions(
        self,
        tenant_id: str,
        *,
        status: str | None = None,
        severity: str | None = None,
        stage: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> ExceptionListPublic: ...


class _NotFound(Exception):
    pass


class WorkerReader:
    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._urls = [u.rstrip("/") for u in settings.worker_urls]
        self._client = httpx.AsyncClient(
            timeout=settings.worker_read_timeout_seconds, transport=transport
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def get_exception(self, tenant_id: str, exception_id: str) -> ExceptionRecord | None:
        path = f"/sluice/exceptions/{quote(exception_id, safe='')}"
        try:
            data = await self._get(path, {"tenant": tenant_id}, not_found_is_answer=True)
        except _NotFound:
            return None
        try:
            record = ExceptionRecord.model_validate(data)
        except ValidationError as exc:
            raise WorkerUnavailable(
                f"The worker's answer for exception {exception_id} is not a valid record ({exc})."
            ) from exc
        if record.state.tenant_id != tenant_id or record.state.exception_id != exception_id:
            log.warning(
                "worker answered exception %s of tenant %s for a read of %s by tenant %s",
                record.state.exception_id,
                record.state.tenant_id,
                exception_id,
                tenant_id,
            )
            return None
        return record

    async def list_exceptions(
        self,
        tenant_id: str,
        *,
        status: str | None = None,
        severity: str | None = None,
        stage: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> ExceptionListPublic:
        params: dict[str, str | int] = {"tenant": tenant_id, "limit": limit}
        for name, value in (
            ("status", status),
            ("severity", severity),
            ("stage", stage),
            ("cursor", cursor),
        ):
            if value is not None:
                params[name] = value
        data = await self._get("/sluice/exceptions", params, not_found_is_answer=False)
        try:
            page = ExceptionListPublic.model_validate(data)
        except ValidationError as exc:
            raise WorkerUnavailable(f"The worker's list answer is not valid ({exc}).") from exc
        items = [s for s in page.items if s.tenant_id == tenant_id]
        if len(items) != len(page.items):
            log.warning("worker listed exceptions of other tenants for tenant %s", tenant_id)
            page = ExceptionListPublic(items=items, next_cursor=page.next_cursor)
        return page

    async def _get(
        self, path: str, params: dict[str, str | int], *, not_found_is_answer: bool
    ) -> Any:
        return await first_answer(
            self._client, self._urls, path, params, not_found_is_answer=not_found_is_answer
        )


class WorkerHealth:
    """Whether each worker answered its last read, so that a worker that is down is logged once
    (WARNING, with why) and once more when it is back (INFO), not at every read: every failed read
    is counted in ``sluice_api_worker_unavailable_total{worker}``."""

    def __init__(self) -> None:
        self._down: dict[str, str] = {}

    def failed(self, url: str, why: str) -> str:
        """Record a failed read of ``url``; the failure as ``url: why``."""
        metrics.worker_unavailable(url)
        if url not in self._down:
            log.warning("worker %s unavailable: %s", url, why)
        self._down[url] = why
        return f"{url}: {why}"

    def answered(self, url: str) -> None:
        if self._down.pop(url, None) is not None:
            log.info("worker %s back", url)

    def is_down(self, url: str) -> bool:
        return url in self._down


HEALTH = WorkerHealth()
"""The API process's view of its workers (one per process, like its metrics)."""


async def worker_get(settings: Settings, path: str, params: Mapping[str, str | int]) -> Any:
    """The first worker's answer to a list (``path`` gathers from the whole group); 207 counts (a
    worker gathered what it could from the others); none answering is a 503 with Retry-After, a
    worker refusing the query a 422 naming the parameter."""
    async with httpx.AsyncClient(timeout=settings.worker_read_timeout_seconds) as client:
        try:
            return await first_answer(
                client, settings.worker_urls, path, params, accepted=(200, 207)
            )
        except WorkerUnavailable as exc:
            raise unavailable(str(exc)) from exc
        except WorkerRefused as exc:
            raise refused(exc) from exc


def refused(exc: WorkerRefused) -> ApiProblem:
    """A worker's 400 as the API's 422 naming the parameter."""
    return invalid_query(exc.field, exc.detail[:1].upper() + exc.detail[1:])


async def first_answer(
    client: httpx.AsyncClient,
    urls: Sequence[str],
    path: str,
    params: Mapping[str, str | int],
    *,
    accepted: Collection[int] = (200,),
    not_found_is_answer: bool = False,
    health: WorkerHealth | None = None,
) -> Any:
    """The JSON of the first worker (in ``urls`` order) that answers ``GET path``.

    A status in ``accepted`` is an answer; a 404 is one only when ``not_found_is_answer`` (single
    reads), and raises :class:`_NotFound`. When no worker answers, :class:`WorkerUnavailable` says
    which were tried and why each failed. Each worker's failures are counted and its changes of
    state logged once, by ``health`` (the process's :data:`HEALTH` by default)."""
    health = health or HEALTH
    failures: list[str] = []
    for url in urls:
        base = url.rstrip("/")
        try:
            resp = await client.get(base + path, params=dict(params))
        except httpx.HTTPError as exc:
            failures.append(health.failed(base, str(exc) or type(exc).__name__))
            continue
        if resp.status_code == 404 and not_found_is_answer:
            health.answered(base)
            raise _NotFound
        if resp.status_code == 400:
            health.answered(base)
            raise _refusal(resp)
        if resp.status_code not in accepted:
            failures.append(health.failed(base, f"HTTP {resp.status_code}"))
            continue
        try:
            data = resp.json()
        except ValueError:
            failures.append(health.failed(base, "the answer is not JSON"))
            continue
        health.answered(base)
        return data
    raise WorkerUnavailable(
        "No Sluice worker answered ("
        + ("; ".join(failures) or "SLUICE_WORKER_URLS is empty")
        + ")."
    )


def _refusal(resp: httpx.Response) -> WorkerRefused:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    return WorkerRefused(
        str(body.get("field") or "query"),
        str(body.get("detail") or "the workers refused the query's parameters"),
    )
