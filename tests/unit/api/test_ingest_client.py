"""app.ingest_client against the real app (Kafka replaced by the in-memory producer)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from api.producer import SendFailure
from app.ingest_client import post_exceptions
from app.kafka_local import free_port
from schemas.codec import decode
from tests.unit.api.conftest import KEYS, FakeProducer, FakeReader, report


async def test_posts_each_report_and_returns_results_in_order(
    app: FastAPI, producer: FakeProducer, reader: FakeReader
) -> None:
    results = await post_exceptions(
        "http://sluice.test/",
        KEYS["acme"],
        [report(message="one"), report(message=""), report(message="three")],
        ["key-1", None, "key-3"],
        transport=httpx.ASGITransport(app=app),
    )
    assert [r["index"] for r in results] == [0, 1, 2]
    assert [r["status_code"] for r in results] == [202, 422, 202]
    assert [r["idempotency_key"] for r in results] == ["key-1", None, "key-3"]
    assert results[0]["status_url"] == f"/v1/exceptions/{results[0]['exception_id']}"
    assert results[1]["errors"][0]["field"] == "message"
    assert len(producer.sent) == 2


class QuickRetry(httpx.AsyncBaseTransport):
    """The app behind a transport that shortens Retry-After to 0 and heals Kafka after the first 503."""

    def __init__(self, app: FastAPI, producer: FakeProducer) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.producer = producer
        self.retry_after: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if "Retry-After" in response.headers:
            self.retry_after.append(response.headers["Retry-After"])
            response.headers["Retry-After"] = "0"
            self.producer.fail = None
        return response


async def test_retries_a_503_with_a_generated_key(
    app: FastAPI, producer: FakeProducer, reader: FakeReader
) -> None:
    producer.fail = SendFailure(503, "Kafka is unreachable from the API.")
    transport = QuickRetry(app, producer)
    [result] = await post_exceptions(
        "http://sluice.test", KEYS["acme"], [report()], retries=2, transport=transport
    )
    assert result["status_code"] == 202
    assert transport.retry_after == ["5"]
    assert result["idempotency_key"]
    assert decode(producer.sent[0].value).payload.idempotency_key == result["idempotency_key"]
    assert len(producer.sent) == 1


async def test_an_unreachable_api_is_reported_per_report() -> None:
    [result] = await post_exceptions(f"http://127.0.0.1:{free_port()}", "k", [report()])
    assert result["status_code"] is None
    assert "Cannot reach the Sluice API" in result["detail"]


async def test_key_count_must_match() -> None:
    with pytest.raises(ValueError, match="one per report"):
        await post_exceptions("http://x", "k", [report(), report()], ["only-one"])
