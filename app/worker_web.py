"""The worker's read endpoints: exception state, history and lists, answered whichever worker owns
the exception's partition.

A read for one exception is routed by Faust's table router to the worker that holds the exception's
partition (``app.table_route``), so the API can ask any worker. A list is a scatter-gather: the
worker that receives it asks every worker in the group for its own partitions (``?local=1``) and
merges the pages. These endpoints are for the API process, not for end users: the tenant comes in
the query string and is trusted, because the API authenticated it.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, cast

import httpx
import orjson
from faust.web import Request, Response, View

from app.faust_app import app, settings
from app.pipeline import STATS, exceptions_table
from schemas.state import ExceptionRecord

MAX_LIMIT = 200


def _not_found(view: View, exception_id: str) -> Response:
    return view.json({"detail": f"exception {exception_id} not found"}, status=404)


def is_ready() -> bool:
    """Partitions assigned and tables recovered: until then an absent key proves nothing."""
    assigned = app.consumer.assignment() if app.consumer else set()
    recovered = bool(cast(Any, app.tables).recovery.completed.is_set())
    return bool(assigned) and recovered and not app.rebalancing


def _not_ready(view: View) -> Response:
    return view.json(
        {"detail": "this worker is still recovering its tables or rebalancing; retry shortly"},
        status=503,
        headers={"Retry-After": "1"},
    )


@app.page("/sluice/exceptions/{exception_id}")
class ExceptionView(View):
    @app.table_route(table=exceptions_table, match_info="exception_id")  # type: ignore[arg-type]
    async def get(self, request: Request, exception_id: str) -> Response:
        raw = exceptions_table.get(exception_id.encode())
        if raw is None:
            return _not_found(self, exception_id) if is_ready() else _not_ready(self)
        record = orjson.loads(raw)
        if record["state"]["tenant_id"] != request.query.get("tenant"):
            return _not_found(self, exception_id)  # another tenant's exception does not exist
        return self.bytes(raw, content_type="application/json")


def _cursor_key(state: dict[str, Any]) -> tuple[str, str]:
    return (state["received_at"], state["exception_id"])


def encode_cursor(key: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).decode()


def decode_cursor(cursor: str) -> tuple[str, str]:
    received_at, exception_id = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
    return (str(received_at), str(exception_id))


def local_page(query: dict[str, str], limit: int) -> list[dict[str, Any]]:
    """Newest first, after the cursor, filtered: at most ``limit`` states from this worker."""
    tenant = query.get("tenant")
    after = decode_cursor(query["cursor"]) if query.get("cursor") else None
    wanted = {k: query[k] for k in ("status", "severity", "stage") if query.get(k)}
    items = []
    for raw in exceptions_table.values():
        state = ExceptionRecord.model_validate_json(raw).state.model_dump(mode="json")
        if state["tenant_id"] != tenant:
            continue
        if any(state.get(k) != v for k, v in wanted.items()):
            continue
        if after is not None and _cursor_key(state) >= after:
            continue
        items.append(state)
    items.sort(key=_cursor_key, reverse=True)
    return items[:limit]


@app.page("/sluice/exceptions")
class ExceptionListView(View):
    async def get(self, request: Request) -> Response:
        query = dict(request.query)
        try:
            limit = max(1, min(MAX_LIMIT, int(query.get("limit", "50"))))
            if query.get("cursor"):
                decode_cursor(query["cursor"])
        except (ValueError, TypeError):
            return self.json({"detail": "limit must be an integer and cursor opaque"}, status=400)
        if not is_ready():
            return _not_ready(self)
        if query.get("local") == "1":
            return self.json({"items": local_page(query, limit)})
        hosts = list(app.router.table_metadata(exceptions_table.name).keys())
        me = str(app.conf.canonical_url)
        pages = await asyncio.gather(
            *(self._page_from(h, query, limit) for h in hosts if str(h) != me)
        )
        items = [*local_page(query, limit), *(i for page in pages for i in page)]
        items.sort(key=_cursor_key, reverse=True)
        more = len(items) > limit
        items = items[:limit]
        next_cursor = encode_cursor(_cursor_key(items[-1])) if more and items else None
        return self.json({"items": items, "next_cursor": next_cursor})

    async def _page_from(self, host: str, query: dict[str, str], limit: int) -> list[Any]:
        params = {**query, "local": "1", "limit": str(limit)}
        async with httpx.AsyncClient(timeout=settings.worker_read_timeout_seconds) as client:
            resp = await client.get(f"{str(host).rstrip('/')}/sluice/exceptions", params=params)
            resp.raise_for_status()
            items: list[Any] = resp.json()["items"]
            return items


@app.page("/sluice/ready")
class ReadyView(View):
    """Ready when partitions are assigned and the tables have been recovered from changelogs."""

    async def get(self, request: Request) -> Response:
        ready = is_ready()
        assigned = app.consumer.assignment() if app.consumer else set()
        body = {"ready": ready, "assigned_partitions": len(assigned)}
        return self.json(body, status=200 if ready else 503)


@app.page("/sluice/stats")
class StatsView(View):
    async def get(self, request: Request) -> Response:
        return self.json({name: vars(stats) for name, stats in STATS.items()})
