"""Every list route checks ``cursor`` with the workers' codec: one it never handed out is a 422
naming ``cursor``, and no worker is asked (it was a 503 before: the worker's 400 read as "down")."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.worker.paging import encode_cursor
from tests.unit.api.conftest import api_client, auth
from tests.unit.api.test_reads import Worker, stand_in_worker

LISTS = ["/v1/exceptions", "/v1/approvals", "/v1/audit"]
NOT_OURS = [
    "0",
    "abc",
    "%%%",
    "e30",
    base64.urlsafe_b64encode(b'{"a": 1, "b": 2}').decode(),  # valid base64 and JSON, wrong shape
    base64.urlsafe_b64encode(b"[1, 2]").decode(),
]


@pytest.fixture
async def lists(
    tmp_path: Path, config_dir: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Worker]]:
    with stand_in_worker() as worker:
        async with api_client([worker.url], config_dir) as client:
            yield client, worker


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("cursor", NOT_OURS)
async def test_a_cursor_not_handed_out_is_422_naming_cursor(
    lists: tuple[httpx.AsyncClient, Worker], path: str, cursor: str
) -> None:
    client, worker = lists
    resp = await client.get(path, params={"cursor": cursor}, headers=auth())
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    [error] = resp.json()["errors"]
    assert error["field"] == "cursor"
    assert error["loc"] == ["query", "cursor"]
    assert "next_cursor" in error["msg"]
    assert "cursor" in resp.json()["detail"]
    assert worker.requests == []


@pytest.mark.parametrize("path", LISTS)
async def test_an_empty_cursor_is_422(lists: tuple[httpx.AsyncClient, Worker], path: str) -> None:
    client, _worker = lists
    resp = await client.get(path, params={"cursor": ""}, headers=auth())
    assert resp.status_code == 422
    assert [e["field"] for e in resp.json()["errors"]] == ["cursor"]


async def test_a_handed_out_cursor_is_passed_to_the_worker(
    lists: tuple[httpx.AsyncClient, Worker],
) -> None:
    client, worker = lists
    cursor = encode_cursor(("2026-01-15T09:30:00+00:00", "exc-1"))
    resp = await client.get("/v1/exceptions", params={"cursor": cursor}, headers=auth())
    assert resp.status_code == 200
    assert worker.requests[0][1]["cursor"] == cursor


async def test_a_worker_refusing_a_list_is_422_not_503(config_dir: Path) -> None:
    """A 400 means the query is wrong, so the next worker is not asked and the API says so."""
    with stand_in_worker() as refusing, stand_in_worker() as other:
        refusing.status = 400
        async with api_client([refusing.url, other.url], config_dir) as client:
            resp = await client.get("/v1/exceptions", headers=auth())
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert "Retry-After" not in resp.headers
    assert [e["loc"] for e in resp.json()["errors"]] == [["query", "query"]]
    assert other.requests == []
