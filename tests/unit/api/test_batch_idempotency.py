"""Idempotency-Key on POST /v1/exceptions:batch: the same key and body answer the first results and
send nothing again; another body is 422; a retry in flight is 409; a failed item is sent again."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import orjson

from api import ingest
from api.idempotency import batch_exception_id
from api.producer import SendFailure
from app.settings import Settings
from schemas.api import ExceptionCreate
from schemas.state import ExceptionRecord, entry_of, fold
from tests.unit.api.conftest import FakeProducer, FakeReader, auth, report

URL = "/v1/exceptions:batch"
BATCH = {"items": [report(), report(message=None), report(message="second")]}


def keyed(key: str) -> dict[str, str]:
    return auth(**{"Idempotency-Key": key})


async def test_a_retried_batch_gets_the_first_answer(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    first = await client.post(URL, json=BATCH, headers=keyed("batch-1"))
    assert first.status_code == 200, first.text
    assert [r["status_code"] for r in first.json()["results"]] == [202, 422, 202]
    assert "Idempotent-Replayed" not in first.headers
    assert len(producer.sent) == 2
    sent = [orjson.loads(r.value)["payload"] for r in producer.sent]
    assert {p["idempotency_key"] for p in sent} == {"batch-1"}

    again = await client.post(URL, json=BATCH, headers=keyed('"batch-1"'))
    assert again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(producer.sent) == 2  # nothing sent twice


async def test_the_same_key_with_another_batch_is_422(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    assert (await client.post(URL, json=BATCH, headers=keyed("batch-2"))).status_code == 200
    other = {"items": [report(message="another")]}
    resp = await client.post(URL, json=other, headers=keyed("batch-2"))
    assert resp.status_code == 422
    assert resp.headers["content-type"] == "application/problem+json"
    assert "different request body" in resp.json()["detail"]
    assert len(producer.sent) == 2


async def test_a_batch_key_is_separate_from_the_single_routes(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    single = await client.post("/v1/exceptions", json=report(), headers=keyed("k"))
    batch = await client.post(URL, json={"items": [report()]}, headers=keyed("k"))
    assert single.status_code == 202
    assert batch.status_code == 200
    assert batch.json()["results"][0]["exception_id"] != single.json()["exception_id"]


async def test_a_retry_while_the_batch_is_in_flight_is_409(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    producer.gate = asyncio.Event()
    first = asyncio.create_task(client.post(URL, json=BATCH, headers=keyed("slow")))
    while producer.calls == 0:
        await asyncio.sleep(0.01)
    second = await client.post(URL, json=BATCH, headers=keyed("slow"))
    assert second.status_code == 409
    assert "still being processed" in second.json()["detail"]
    producer.gate.set()
    assert (await first).status_code == 200
    assert len(producer.sent) == 2


async def test_items_not_accepted_are_sent_again_with_the_same_ids(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    producer.fail = SendFailure(503, "Kafka is unreachable from the API, so it was not accepted.")
    failed = await client.post(URL, json=BATCH, headers=keyed("batch-3"))
    assert [r["status_code"] for r in failed.json()["results"]] == [503, 422, 503]
    assert failed.headers["Retry-After"] == "5"
    producer.fail = None
    ok = await client.post(URL, json=BATCH, headers=keyed("batch-3"))
    assert [r["status_code"] for r in ok.json()["results"]] == [202, 422, 202]
    assert len(producer.sent) == 2
    again = await client.post(URL, json=BATCH, headers=keyed("batch-3"))
    assert again.json() == ok.json()
    assert len(producer.sent) == 2


async def test_an_earlier_batch_known_to_the_workers(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader, settings: Settings
) -> None:
    """Another API process took the key: the same batch is sent again under the same ids (the
    intake drops the copies), another batch is 422."""
    key = "batch-elsewhere"
    window = int(datetime.now(UTC).timestamp() // settings.idempotency_key_ttl_seconds)
    head = batch_exception_id("acme", key, window, None)
    items = [report(), report(message="second")]
    valid = {i: ExceptionCreate.model_validate(b) for i, b in enumerate(items)}
    event = ingest.build_event(
        "acme",
        head,
        valid[0],
        body_hash=ingest.batch_hash(items, valid),
        idempotency_key=key,
        now=datetime.now(UTC),
    )
    history = [entry_of(event)]
    reader.records[head] = ExceptionRecord(state=fold(head, "acme", history), history=history)

    other = await client.post(URL, json={"items": [report()]}, headers=keyed(key))
    assert other.status_code == 422
    resp = await client.post(URL, json={"items": items}, headers=keyed(key))
    assert resp.status_code == 200, resp.text
    assert resp.headers["Idempotent-Replayed"] == "true"
    ids = [r["exception_id"] for r in resp.json()["results"]]
    assert ids == [head, batch_exception_id("acme", key, window, 1)]
    assert [r.key.decode() for r in producer.sent] == ids
