"""GET /v1/pipeline/stats sums what the workers report, through the first worker that answers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.kafka_local import free_port
from tests.support.mock_http import MockHTTPServer
from tests.unit.api.conftest import api_client, auth


def worker(name: str, processed: int, **extra: Any) -> dict[str, Any]:
    counters = {
        "processed": processed,
        "duplicates": 1,
        "retried": 2,
        "dead_lettered": 3,
        "parked": 4,
        "redriven": 5,
        "discarded": 6,
        "emitted": processed,
        "last_event_at": 1_700_000_000.0 + processed,
    }
    return {
        "worker": name,
        "ready": True,
        "assigned_partitions": 12,
        "stages": {"intake": counters, "tool": counters},
        "consumer_lag": {"unit.ingested": 7, "unit.planned": 1},
        "dlq_depth": {"tool": 2},
        "parked_now": {"tool": 3},
        **extra,
    }


@pytest.fixture
def workers() -> Iterator[MockHTTPServer]:
    with MockHTTPServer() as server:
        yield server


@pytest.fixture
async def client(config_dir: Path, workers: MockHTTPServer) -> AsyncIterator[httpx.AsyncClient]:
    dead = f"http://127.0.0.1:{free_port()}"  # listed first and refusing connections
    async with api_client([dead, workers.url], config_dir) as client:
        yield client


async def test_stats_sum_every_workers_counters(
    client: httpx.AsyncClient, workers: MockHTTPServer
) -> None:
    # a worker gathering from the others answers 207 when one of them did not answer
    body = {"workers": [worker("w0", 10), worker("w1", 20, ready=False)], "unreachable": "w2"}
    workers.respond("/sluice/stats", 207, body)

    resp = await client.get("/v1/pipeline/stats", headers=auth())

    assert resp.status_code == 200, resp.text
    stats = resp.json()
    assert stats["stages"]["intake"] == {
        "processed": 30,
        "duplicates": 2,
        "retried": 4,
        "dead_lettered": 6,
        "parked": 8,
        "redriven": 10,
        "discarded": 12,
        "dlq_depth": 0,
        "parked_now": 0,
        "consumer_lag": 14,
    }
    assert stats["stages"]["tool"]["dlq_depth"] == 4
    assert stats["stages"]["tool"]["parked_now"] == 6
    assert stats["stages"]["tool"]["consumer_lag"] == 2
    assert stats["stages"]["triage"]["processed"] == 0  # every stage is listed
    assert [(w["worker"], w["ready"], w["last_event_at"]) for w in stats["workers"]] == [
        ("w0", True, 1_700_000_010.0),
        ("w1", False, 1_700_000_020.0),
    ]


async def test_no_worker_answering_is_a_503_that_names_each(
    client: httpx.AsyncClient, workers: MockHTTPServer
) -> None:
    workers.respond("/sluice/stats", 500, {"error": "boom"})

    resp = await client.get("/v1/pipeline/stats", headers=auth())

    assert resp.status_code == 503
    assert resp.headers["Retry-After"]
    detail = resp.json()["detail"]
    assert "No Sluice worker answered" in detail
    assert f"{workers.url}: HTTP 500" in detail
    assert "127.0.0.1" in detail.split(";")[0]  # the refused one is named too
