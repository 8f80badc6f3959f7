"""The read routes against a stand-in worker: a real loopback HTTP server answering the worker contract
(``GET /sluice/exceptions/{id}?tenant=`` and ``GET /sluice/exceptions?tenant=&...``)."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
from fastapi import FastAPI

from api import ingest
from app.kafka_local import free_port
from app.worker.paging import encode_cursor
from schemas.api import ExceptionCreate
from schemas.state import ExceptionRecord, HistoryEntry, entry_of, fold
from tests.unit.api.conftest import api_client, auth, report


def make_record(tenant: str, exception_id: str, events: int = 1) -> ExceptionRecord:
    body = ExceptionCreate.model_validate(report())
    first = ingest.build_event(
        tenant,
        exception_id,
        body,
        body_hash=ingest.request_hash(body),
        idempotency_key=None,
        now=datetime(2026, 1, 15, 9, 30, tzinfo=UTC),
    )
    history = [entry_of(first)]
    for seq in range(2, events + 1):
        history.append(
            HistoryEntry(
                event_id=ingest.ingested_event_id(tenant, f"{exception_id}-{seq}"),
                event_type="ExceptionAccepted",
                sequence=seq,
                occurred_at=first.occurred_at + timedelta(seconds=seq),
                causation_id=history[-1].event_id,
                correlation_id=first.event_id,
                payload={
                    "fingerprint": "fp",
                    "is_repeat": False,
                },
            )
        )
    return ExceptionRecord(state=fold(exception_id, tenant, history), history=history)


@dataclass
class Worker:
    """What the stand-in worker holds and what it was asked."""

    url: str
    records: dict[str, ExceptionRecord] = field(default_factory=dict)
    page: dict[str, Any] = field(default_factory=lambda: {"items": [], "next_cursor": None})
    status: int | None = None  # force this status on every answer
    ignore_tenant: bool = False  # a buggy worker that serves any tenant's exception
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)


@contextmanager
def stand_in_worker() -> Iterator[Worker]:
    """A loopback HTTP server answering the worker contract from a :class:`Worker`'s records."""
    state = Worker(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            state.requests.append((parts.path, query))
            if state.status is not None:
                return self._answer(state.status, {"detail": "forced"})
            if parts.path == "/sluice/exceptions":
                return self._answer(200, state.page)
            prefix = "/sluice/exceptions/"
            if parts.path.startswith(prefix):
                record = state.records.get(unquote(parts.path[len(prefix) :]))
                if record is not None and (
                    state.ignore_tenant or record.state.tenant_id == query.get("tenant")
                ):
                    return self._answer(200, record.model_dump(mode="json"))
                return self._answer(404, {"detail": "unknown exception"})
            return self._answer(404, {"detail": "no such route"})

        def _answer(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def worker() -> Iterator[Worker]:
    with stand_in_worker() as state:
        yield state


@pytest.fixture
async def reads(worker: Worker, config_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The API with a dead worker first in SLUICE_WORKER_URLS, then the stand-in."""
    closed = f"http://127.0.0.1:{free_port()}"
    async with api_client([closed, worker.url], config_dir) as client:
        yield client


async def test_read_passes_the_tenant_and_answers_the_state(
    reads: httpx.AsyncClient, worker: Worker
) -> None:
    worker.records["exc-1"] = make_record("acme", "exc-1")
    resp = await reads.get("/v1/exceptions/exc-1", headers=auth("acme"))
    assert resp.status_code == 200
    state = resp.json()
    assert state["exception_id"] == "exc-1"
    assert state["tenant_id"] == "acme"
    assert state["status"] == "received"
    assert state["source"] == "payments-gateway"
    assert worker.requests == [("/sluice/exceptions/exc-1", {"tenant": "acme"})]


async def test_another_tenants_exception_is_404_like_an_unknown_one(
    reads: httpx.AsyncClient, worker: Worker
) -> None:
    worker.records["exc-1"] = make_record("acme", "exc-1")
    theirs = await reads.get("/v1/exceptions/exc-1", headers=auth("globex"))
    unknown = await reads.get("/v1/exceptions/exc-404", headers=auth("globex"))
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.headers["content-type"] == "application/problem+json"
    assert theirs.json()["detail"].replace("exc-1", "X") == unknown.json()["detail"].replace(
        "exc-404", "X"
    )
    assert worker.requests[0] == ("/sluice/exceptions/exc-1", {"tenant": "globex"})
    events = await reads.get("/v1/exceptions/exc-1/events", headers=auth("globex"))
    assert events.status_code == 404


async def test_a_worker_answering_another_tenant_does_not_leak(
    reads: httpx.AsyncClient, worker: Worker
) -> None:
    worker.ignore_tenant = True
    worker.records["exc-1"] = make_record("acme", "exc-1")
    resp = await reads.get("/v1/exceptions/exc-1", headers=auth("globex"))
    assert resp.status_code == 404


async def test_events_are_the_ordered_history(reads: httpx.AsyncClient, worker: Worker) -> None:
    record = make_record("acme", "exc-2", events=3)
    worker.records["exc-2"] = record
    resp = await reads.get("/v1/exceptions/exc-2/events", headers=auth("acme"))
    assert resp.status_code == 200
    events = resp.json()
    assert [e["sequence"] for e in events] == [1, 2, 3]
    assert [e["event_type"] for e in events] == [
        "ExceptionIngested",
        "ExceptionAccepted",
        "ExceptionAccepted",
    ]
    assert events[0]["event_id"] == str(record.history[0].event_id)
    assert events[0]["payload"]["report"]["message"] == "Card declined for order 1042"


async def test_ids_are_url_encoded_for_the_worker(reads: httpx.AsyncClient, worker: Worker) -> None:
    worker.records["odd id?x=1"] = make_record("acme", "odd id?x=1")
    resp = await reads.get("/v1/exceptions/odd%20id%3Fx%3D1", headers=auth("acme"))
    assert resp.status_code == 200
    assert resp.json()["exception_id"] == "odd id?x=1"
    assert worker.requests[0] == ("/sluice/exceptions/odd%20id%3Fx%3D1", {"tenant": "acme"})


CURSOR = encode_cursor(("2026-01-15T09:30:00+00:00", "exc-2"))


async def test_list_passes_filters_and_cursor_through(
    reads: httpx.AsyncClient, worker: Worker
) -> None:
    worker.page = {
        "items": [make_record("acme", "exc-3").state.model_dump(mode="json")],
        "next_cursor": "opaque-2",
    }
    resp = await reads.get(
        "/v1/exceptions",
        params={
            "status": "in_progress",
            "severity": "high",
            "stage": "triage",
            "limit": 2,
            "cursor": CURSOR,
        },
        headers=auth("acme"),
    )
    assert resp.status_code == 200
    page = resp.json()
    assert [s["exception_id"] for s in page["items"]] == ["exc-3"]
    assert page["next_cursor"] == "opaque-2"
    assert worker.requests == [
        (
            "/sluice/exceptions",
            {
                "tenant": "acme",
                "status": "in_progress",
                "severity": "high",
                "stage": "triage",
                "limit": "2",
                "cursor": CURSOR,
            },
        )
    ]


async def test_list_defaults_and_other_tenants_items_dropped(
    reads: httpx.AsyncClient, worker: Worker
) -> None:
    worker.page = {
        "items": [
            make_record("acme", "mine").state.model_dump(mode="json"),
            make_record("globex", "theirs").state.model_dump(mode="json"),
        ],
        "next_cursor": None,
    }
    resp = await reads.get("/v1/exceptions", headers=auth("acme"))
    assert resp.status_code == 200
    assert resp.json() == {
        "items": [make_record("acme", "mine").state.model_dump(mode="json")],
        "next_cursor": None,
    }
    assert worker.requests == [("/sluice/exceptions", {"tenant": "acme", "limit": "50"})]


async def test_a_worker_answering_an_error_is_skipped_for_the_next(
    worker: Worker, config_dir: Path
) -> None:
    worker.records["exc-1"] = make_record("acme", "exc-1")
    with stand_in_worker() as failing:
        failing.status = 500
        async with api_client([failing.url, worker.url], config_dir) as client:
            resp = await client.get("/v1/exceptions/exc-1", headers=auth("acme"))
            assert resp.status_code == 200
            assert len(failing.requests) == len(worker.requests) == 1
            worker.status = 503
            resp = await client.get("/v1/exceptions/exc-1", headers=auth("acme"))
            assert resp.status_code == 503


async def test_no_worker_answering_is_503_with_retry_after(config_dir: Path) -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    async with api_client(dead, config_dir) as client:
        for path in ("/v1/exceptions/exc-1", "/v1/exceptions/exc-1/events", "/v1/exceptions"):
            resp = await client.get(path, headers=auth("acme"))
            assert resp.status_code == 503, path
            assert resp.headers["Retry-After"] == "5"
            assert "no Sluice worker answered" in resp.json()["detail"]


async def test_reads_need_no_broker(app: FastAPI, client: httpx.AsyncClient) -> None:
    """The app fixture's Kafka is a closed port; reads only need a worker (here: none -> 503)."""
    resp = await client.get("/v1/exceptions/x", headers=auth())
    assert resp.status_code == 503
