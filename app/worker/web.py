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
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import httpx
import orjson
from faust.exceptions import NotReady
from faust.web import Request, Response, View

from app.admin import broker_problem
from app.rocks import cache_usage, table_memory
from app.telemetry import render_metrics, shutdown_tracing
from app.worker import approvals as held
from app.worker import audit, paging
from app.worker.approvals import Approvals
from app.worker.paging import Key, decode_cursor
from schemas.state import ExceptionRecord

if TYPE_CHECKING:
    from app.worker.wiring import Worker

MAX_LIMIT = 200


def _not_found(view: View, exception_id: str) -> Response:
    return view.json({"detail": f"exception {exception_id} not found"}, status=404)


def is_ready(app: Any) -> bool:
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


def _cursor_key(state: dict[str, Any]) -> Key:
    return (state["received_at"], state["exception_id"])


def local_page(table: Any, query: dict[str, str], limit: int) -> list[dict[str, Any]]:
    """Newest first, after the cursor, filtered: at most ``limit`` states from this worker."""
    tenant = query.get("tenant")
    after = decode_cursor(query["cursor"]) if query.get("cursor") else None
    wanted = {k: query[k] for k in ("status", "severity", "stage") if query.get(k)}
    items = []
    for raw in table.values():
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


def invalid_list_query(query: dict[str, str]) -> tuple[str, str] | None:
    """(parameter, why) of the first invalid parameter of a list query, or None. The API checks
    the same before asking, and passes a 400 on as a 422 naming ``field``."""
    try:
        int(query.get("limit", "50"))
    except ValueError:
        return "limit", "limit must be an integer"
    if query.get("cursor"):
        try:
            decode_cursor(query["cursor"])
        except ValueError as exc:
            return "cursor", f"{exc}; pass back a next_cursor of an earlier page"
    for bound in ("since", "until"):
        if query.get(bound):
            try:
                datetime.fromisoformat(query[bound])
            except ValueError:
                return bound, f"{bound} must be an ISO 8601 time"
    return None


# ------------------------------------------------------------------------------ dead letters

DLQ_FILTERS = ("stage", "exception_id", "error_class")


def _dlq_entry(q: dict[str, Any], include_raw: bool) -> dict[str, Any]:
    head = dict(q["head"])
    if not include_raw:
        head.pop("value", None)
    parked = [
        {k: p.get(k) for k in ("event_id", "topic", "partition", "offset")}
        | ({"value": p["value"]} if include_raw else {})
        for p in q["parked"]
    ]
    return {
        "stage": q["stage"],
        "exception_id": q["exception_id"],
        "tenant_id": q.get("tenant_id"),
        "since": q.get("since"),
        "head": head,
        "parked": parked,
        "parked_count": len(parked),
    }


def local_dlq(table: Any, query: dict[str, str]) -> list[dict[str, Any]]:
    """Quarantines held by this worker. ``tenant=*`` (operators on the worker port) sees all,
    including poison records whose tenant could not be read."""
    tenant = query.get("tenant")
    include_raw = query.get("raw") == "1"
    items = []
    for raw in table.values():
        q = orjson.loads(raw)
        if tenant != "*" and q.get("tenant_id") != tenant:
            continue
        if any(query.get(f) and _dlq_field(q, f) != query[f] for f in DLQ_FILTERS):
            continue
        items.append(_dlq_entry(q, include_raw))
    items.sort(key=lambda e: (e["since"] or "", e["exception_id"]))
    return items


def _dlq_field(q: dict[str, Any], name: str) -> Any:
    return q["head"].get("error_class") if name == "error_class" else q.get(name)


def register_views(worker: Worker) -> None:
    """The worker's web views, on its Faust app's web server."""
    app, settings, tables = worker.app, worker.settings, worker.tables

    def ready() -> bool:
        return is_ready(app)

    async def scatter(path: str, query: dict[str, str]) -> list[Any]:
        """This worker's answer to ``path?local=1`` plus every other worker's in the group."""
        hosts = {str(h) for h in app.router.tables_metadata()}
        me = str(app.conf.canonical_url)
        params = {**query, "local": "1"}

        async def one(host: str) -> Any:
            async with httpx.AsyncClient(timeout=settings.worker_read_timeout_seconds) as client:
                resp = await client.get(f"{host.rstrip('/')}{path}", params=params)
                resp.raise_for_status()
                return resp.json()

        return list(await asyncio.gather(*(one(h) for h in sorted(hosts - {me}))))

    def routable(exception_id: str) -> bool:
        """Whether the table router knows the worker owning ``exception_id``'s partition. Until
        the group's metadata arrives (a worker just started, a rebalance) Faust's router raises:
        a TypeError from the producer's partitioner, a KeyError for an unassigned partition."""
        try:
            app.router.key_store(tables.exceptions.name, exception_id)
        except (TypeError, KeyError, NotReady):
            return False
        return True

    @app.page("/sluice/exceptions/{exception_id}")
    class ExceptionView(View):
        async def get(self, request: Request, exception_id: str) -> Response:
            """A 503 with Retry-After while the owner cannot be known or reached, never a 500."""
            if not routable(exception_id):
                return _not_ready(self)
            try:
                # Faust types a routed handler as a plain function, not as a method.
                return await cast(Any, self).routed(request, exception_id)
            except (TimeoutError, aiohttp.ClientError) as exc:
                return self.json(
                    {"detail": f"the worker owning {exception_id} did not answer ({exc!r})"},
                    status=503,
                    headers={"Retry-After": "1"},
                )

        @app.table_route(table=tables.exceptions, match_info="exception_id")  # type: ignore[arg-type]
        async def routed(self, request: Request, exception_id: str) -> Response:
            raw = tables.exceptions.get(exception_id.encode())
            if raw is None:
                return _not_found(self, exception_id) if ready() else _not_ready(self)
            record = orjson.loads(raw)
            if record["state"]["tenant_id"] != request.query.get("tenant"):
                return _not_found(self, exception_id)  # another tenant's exception does not exist
            return self.bytes(raw, content_type="application/json")

    @app.page("/sluice/ready")
    class ReadyView(View):
        """Ready when the broker answers, partitions are assigned and tables are recovered."""

        async def get(self, request: Request) -> Response:
            problem = await broker_problem(settings)
            is_ok = ready() and problem is None
            assigned = app.consumer.assignment() if app.consumer else set()
            body = {"ready": is_ok, "assigned_partitions": len(assigned), "broker": problem or "ok"}
            return self.json(body, status=200 if is_ok else 503)

    @app.page("/sluice/dlq")
    class DeadLetterView(View):
        """Dead-lettered events and what is parked behind them, oldest first."""

        async def get(self, request: Request) -> Response:
            query = dict(request.query)
            if not ready():
                return _not_ready(self)
            if query.get("local") == "1":
                return self.json({"items": local_dlq(tables.quarantine, query)})
            items = local_dlq(tables.quarantine, query)
            for part in await scatter("/sluice/dlq", query):
                items.extend(part["items"])
            items.sort(key=lambda e: (e["since"] or "", e["exception_id"]))
            return self.json({"items": items})

    def paged(
        path: str,
        key: Callable[[dict[str, Any]], Key],
        newest_first: bool,
        local: Callable[[dict[str, str], int], list[dict[str, Any]]],
    ) -> None:
        """A list gathered from every worker (``?local=1``: this worker's part only)."""

        @app.page(path)
        class PagedView(View):
            async def get(self, request: Request) -> Response:
                query = dict(request.query)
                refused = invalid_list_query(query)
                if refused is not None:
                    field, detail = refused
                    return self.json({"detail": detail, "field": field}, status=400)
                limit = max(1, min(MAX_LIMIT, int(query.get("limit", "50"))))
                if not ready():
                    return _not_ready(self)
                if query.get("local") == "1":
                    # The gathering worker asks for one more than its page, to know if more remain.
                    wanted = max(1, min(MAX_LIMIT + 1, int(query.get("limit", "50"))))
                    return self.json({"items": local(query, wanted)})
                items = local(query, limit + 1)
                for part in await scatter(path, {**query, "limit": str(limit + 1)}):
                    items.extend(part["items"])
                return self.json(paging.page(items, key, limit, newest_first))

    approvals = Approvals(tables.approvals)
    paged(
        "/sluice/exceptions",
        _cursor_key,
        True,
        lambda query, limit: local_page(tables.exceptions, query, limit),
    )
    paged(
        "/sluice/approvals",
        held.listing_key,
        False,
        lambda query, limit: held.local_page(approvals, query, limit),
    )
    paged(
        "/sluice/audit",
        audit.listing_key,
        True,
        lambda query, limit: audit.local_page(tables.audit, query, limit),
    )

    def partition_lags() -> dict[Any, int]:
        """Records not yet committed, per assigned topic-partition of this worker."""
        consumer = app.consumer
        lags: dict[Any, int] = {}
        sources = set(worker.topics.all())  # not the changelogs it also reads while recovering
        for tp in consumer.assignment() if consumer else set():
            if tp.topic not in sources:
                continue
            highwater = consumer.highwater(tp)
            committed = cast(Any, consumer)._committed_offset.get(tp)  # no public accessor
            if highwater is not None:
                lags[tp] = max(0, highwater - (committed + 1 if committed is not None else 0))
        return lags

    def local_stats() -> dict[str, Any]:
        consumer = app.consumer
        assigned = consumer.assignment() if consumer else set()
        lag: dict[str, int] = {}
        for tp, behind in partition_lags().items():
            lag[tp.topic] = lag.get(tp.topic, 0) + behind
        depth: dict[str, int] = {}
        parked: dict[str, int] = {}
        for raw in tables.quarantine.values():
            q = orjson.loads(raw)
            depth[q["stage"]] = depth.get(q["stage"], 0) + 1
            parked[q["stage"]] = parked.get(q["stage"], 0) + len(q["parked"])
        return {
            "worker": str(app.conf.canonical_url),
            "ready": ready(),
            "assigned_partitions": len(assigned),
            "stages": {name: vars(stats) for name, stats in worker.stats.items()},
            "consumer_lag": lag,
            "dlq_depth": depth,
            "parked_now": parked,
        }

    @app.page("/sluice/stats")
    class StatsView(View):
        """This worker's counters (``?local=1``), or every worker's in the group."""

        async def get(self, request: Request) -> Response:
            if request.query.get("local") == "1":
                return self.json(local_stats())
            workers = [local_stats()]
            try:
                workers.extend(await scatter("/sluice/stats", {}))
            except httpx.HTTPError as exc:
                return self.json({"workers": workers, "unreachable": str(exc)}, status=207)
            return self.json({"workers": workers})

    def refresh_gauges() -> None:
        """At scrape time (cheap, not per event): DLQ depth per stage, consumer lag per partition
        and the tables' RocksDB memory."""
        metrics = worker.recorder.metrics
        stats = local_stats()
        for stage in worker.stats:
            metrics.set_dlq_depth(stage, stats["dlq_depth"].get(stage, 0))
        for tp, lag in partition_lags().items():
            metrics.set_consumer_lag(tp.topic, tp.partition, lag)
        metrics.set_table_memory(table_memory(app.tables), cache_usage())

    worker.recorder.metrics.on_scrape(refresh_gauges)

    @app.page("/metrics")
    class MetricsView(View):
        """Prometheus metrics of this worker."""

        async def get(self, request: Request) -> Response:
            body, content_type = render_metrics()
            return self.bytes(body, content_type=content_type.split(";")[0])

    @app.page("/sluice/live")
    class LiveView(View):
        """Liveness: the worker's event loop answers."""

        async def get(self, request: Request) -> Response:
            return self.json({"live": True})

    async def flush_spans(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        shutdown_tracing()

    app.on_before_shutdown.connect(flush_spans)
