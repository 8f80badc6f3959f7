"""Accepted requests, with Kafka replaced by an in-memory producer: the event the API builds, the 202
answer, Idempotency-Key replays and conflicts, and how send failures map to answers."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime

import httpx
import orjson

from api import ingest
from api.idempotency import derived_exception_id
from api.producer import SendFailure
from app.settings import Settings
from schemas.api import ExceptionCreate
from schemas.codec import decode
from schemas.events import SLUICE_NAMESPACE, ExceptionIngested
from schemas.state import ExceptionRecord, entry_of, fold
from tests.unit.api.conftest import FakeProducer, FakeReader, auth, report

URL = "/v1/exceptions"


def only_event(producer: FakeProducer) -> ExceptionIngested:
    assert len(producer.sent) == 1
    event = decode(producer.sent[0].value)
    assert isinstance(event, ExceptionIngested)
    return event


async def test_post_answers_202_with_location_after_the_send(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    resp = await client.post(URL, json=report(), headers=auth())
    assert resp.status_code == 202
    body = resp.json()
    exception_id = body["exception_id"]
    assert uuid.UUID(exception_id).version == 4
    assert resp.headers["Location"] == f"/v1/exceptions/{exception_id}"
    assert body["status_url"] == resp.headers["Location"]
    event = only_event(producer)
    assert str(event.event_id) == body["event_id"]
    assert event.event_id == uuid.uuid5(SLUICE_NAMESPACE, f"acme:{exception_id}:ingested")
    assert reader.asked == []  # without a key, no lookup


async def test_the_event_carries_tenant_report_and_cloudevents_headers(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    before = datetime.now(UTC)
    body = report(occurred_at="2026-01-15T10:30:00+01:00", external_ref="ext-1")
    resp = await client.post(URL, json=body, headers=auth("globex"))
    assert resp.status_code == 202
    record = producer.sent[0]
    event = only_event(producer)
    assert record.topic == "unit.ingested"
    assert record.key == event.exception_id.encode()
    assert event.tenant_id == "globex"
    assert event.sequence == 1
    assert event.causation_id is None
    assert event.correlation_id == event.event_id
    assert before <= event.occurred_at <= datetime.now(UTC)
    report_ = event.payload.report
    assert report_.occurred_at == datetime(2026, 1, 15, 9, 30, tzinfo=UTC)
    assert report_.external_ref == "ext-1"
    assert event.payload.idempotency_key is None
    canonical = orjson.dumps(
        ExceptionCreate.model_validate(body).model_dump(mode="json"), option=orjson.OPT_SORT_KEYS
    )
    assert event.payload.request_hash == hashlib.sha256(canonical).hexdigest()
    headers = dict(record.headers)
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"] == str(event.event_id).encode()
    assert headers["ce_source"] == b"/sluice/api/globex"
    assert headers["ce_type"] == b"ExceptionIngested"
    assert datetime.fromisoformat(headers["ce_time"].decode()) == event.occurred_at
    assert headers["content-type"] == b"application/json"


def test_request_hash_ignores_key_order_and_defaults() -> None:
    a = ExceptionCreate.model_validate({"source": "s", "error_type": "e", "message": "m"})
    b = ExceptionCreate.model_validate(
        {"message": "m", "attributes": {}, "error_type": "e", "source": "s"}
    )
    c = ExceptionCreate.model_validate({"source": "s", "error_type": "e", "message": "other"})
    assert ingest.request_hash(a) == ingest.request_hash(b) != ingest.request_hash(c)


# ------------------------------------------------------------------------------ Idempotency-Key


async def test_retry_with_the_same_key_and_body_replays_without_producing(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader, settings: Settings
) -> None:
    headers = auth(**{"Idempotency-Key": "order-1042-decline"})
    first = await client.post(URL, json=report(), headers=headers)
    assert first.status_code == 202
    window = int(datetime.now(UTC).timestamp() // settings.idempotency_key_ttl_seconds)
    expected_id = derived_exception_id("acme", "order-1042-decline", window)
    assert first.json()["exception_id"] == expected_id
    assert only_event(producer).payload.idempotency_key == "order-1042-decline"

    again = await client.post(URL, json=report(), headers=headers)
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(producer.sent) == 1


async def test_quoted_key_is_the_same_key(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    first = await client.post(URL, json=report(), headers=auth(**{"Idempotency-Key": "k-7"}))
    again = await client.post(URL, json=report(), headers=auth(**{"Idempotency-Key": '"k-7"'}))
    assert again.json()["exception_id"] == first.json()["exception_id"]
    assert len(producer.sent) == 1


async def test_same_key_with_another_body_is_422(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    headers = auth(**{"Idempotency-Key": "k-1"})
    assert (await client.post(URL, json=report(), headers=headers)).status_code == 202
    resp = await client.post(URL, json=report(message="another"), headers=headers)
    assert resp.status_code == 422
    assert (
        "Idempotency-Key was already used with a different request body" in (resp.json()["detail"])
    )
    assert len(producer.sent) == 1


async def test_keys_are_scoped_per_tenant(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    a = await client.post(URL, json=report(), headers=auth("acme", **{"Idempotency-Key": "k"}))
    b = await client.post(
        URL, json=report(message="x"), headers=auth("globex", **{"Idempotency-Key": "k"})
    )
    assert a.status_code == b.status_code == 202
    assert a.json()["exception_id"] != b.json()["exception_id"]
    assert len(producer.sent) == 2


async def test_same_key_while_the_first_is_in_flight_is_409(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    producer.gate = asyncio.Event()
    headers = auth(**{"Idempotency-Key": "slow"})
    first = asyncio.create_task(client.post(URL, json=report(), headers=headers))
    while producer.calls == 0:
        await asyncio.sleep(0.01)
    second = await client.post(URL, json=report(), headers=headers)
    assert second.status_code == 409
    assert "still being processed" in second.json()["detail"]
    producer.gate.set()
    assert (await first).status_code == 202
    assert (await client.post(URL, json=report(), headers=headers)).status_code == 202
    assert len(producer.sent) == 1


async def test_a_failed_send_frees_the_key_for_a_retry(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    producer.fail = SendFailure(503, "Kafka is unreachable from the API, so it was not accepted.")
    headers = auth(**{"Idempotency-Key": "retry-me"})
    failed = await client.post(URL, json=report(), headers=headers)
    assert failed.status_code == 503
    assert failed.headers["Retry-After"] == "5"
    assert "same Idempotency-Key" in failed.json()["detail"]
    assert "Location" not in failed.headers
    producer.fail = None
    ok = await client.post(URL, json=report(), headers=headers)
    assert ok.status_code == 202
    assert "Idempotent-Replayed" not in ok.headers
    assert only_event(producer).exception_id == ok.json()["exception_id"]


async def test_an_earlier_use_known_to_the_workers_is_replayed(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader, settings: Settings
) -> None:
    """Another API process took the key: this process's cache is empty, the workers know it."""
    key = "from-another-process"
    window = int(datetime.now(UTC).timestamp() // settings.idempotency_key_ttl_seconds)
    earlier_id = derived_exception_id("acme", key, window - 1)  # the previous window's
    body = ExceptionCreate.model_validate(report())
    event = ingest.build_event(
        "acme",
        earlier_id,
        body,
        body_hash=ingest.request_hash(body),
        idempotency_key=key,
        now=datetime.now(UTC),
    )
    history = [entry_of(event)]
    reader.records[earlier_id] = ExceptionRecord(
        state=fold(earlier_id, "acme", history), history=history
    )

    same = await client.post(URL, json=report(), headers=auth(**{"Idempotency-Key": key}))
    assert same.status_code == 202
    assert same.json()["exception_id"] == earlier_id
    assert same.headers["Idempotent-Replayed"] == "true"
    other = await client.post(
        URL, json=report(message="changed"), headers=auth(**{"Idempotency-Key": key})
    )
    assert other.status_code == 422
    assert producer.sent == []
    assert {e for _, e in reader.asked} == {earlier_id, derived_exception_id("acme", key, window)}


async def test_unreachable_workers_do_not_block_a_keyed_post(
    client: httpx.AsyncClient, producer: FakeProducer, reader: FakeReader
) -> None:
    reader.down = True
    resp = await client.post(URL, json=report(), headers=auth(**{"Idempotency-Key": "k"}))
    assert resp.status_code == 202
    assert len(producer.sent) == 1


async def test_too_large_for_kafka_is_413(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    producer.fail = SendFailure(413, "Kafka refused the report as too large.")
    resp = await client.post(URL, json=report(), headers=auth())
    assert resp.status_code == 413


# -------------------------------------------------------------------------------------- batch


async def test_batch_sends_valid_items_and_reports_the_invalid_in_order(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    items = [report(message="a"), report(message=""), report(message="b"), report(message="c")]
    resp = await client.post(f"{URL}:batch", json={"items": items}, headers=auth())
    assert resp.status_code == 200
    result = resp.json()
    assert (result["accepted"], result["rejected"]) == (3, 1)
    assert [r["status_code"] for r in result["results"]] == [202, 422, 202, 202]
    assert result["results"][1]["errors"][0]["field"] == "message"
    sent = [decode(r.value) for r in producer.sent]
    assert producer.calls == 1  # one send_many: all sent, then all acks awaited
    assert [e.payload.report.message for e in sent] == ["a", "b", "c"]
    for r, e in zip([result["results"][i] for i in (0, 2, 3)], sent, strict=True):
        assert r["exception_id"] == e.exception_id
        assert r["event_id"] == str(e.event_id)
        assert r["location"] == f"/v1/exceptions/{e.exception_id}"
        assert e.tenant_id == "acme"


async def test_batch_items_that_kafka_refused_are_503(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    producer.fail = SendFailure(503, "Kafka is unreachable from the API, so it was not accepted.")
    resp = await client.post(
        f"{URL}:batch", json={"items": [report(), report(source="")]}, headers=auth()
    )
    assert resp.status_code == 200
    assert [r["status_code"] for r in resp.json()["results"]] == [503, 422]
    assert resp.headers["Retry-After"] == "5"


async def test_ready_when_the_producer_reaches_kafka(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    resp = await client.get("/readyz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ready", "kafka": "connected"}
