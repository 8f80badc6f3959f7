"""`sluice api` against the real broker: what a POST answers and what lands on the ingested topic.

The API runs as a user runs it (`python -m app.cli api`), with its worker URL pointing at a closed port:
these tests only cover the write path (reads through real workers are tested with the pipeline).
"""

from __future__ import annotations

import hashlib
import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.admin import ensure_topics
from app.kafka_local import free_port
from app.settings import Settings
from app.topics import TopicNames
from schemas.codec import decode
from schemas.events import SLUICE_NAMESPACE, ExceptionIngested
from tests.conftest import Names
from tests.support.procs import SluiceProcess

KEYS = {"acme": "it-acme-key", "globex": "it-globex-key"}
PARTITIONS = 2


def write_api_keys(config_dir: Path) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    # Producer keys: this API only ever reports.
    entries = [
        f'[[keys]]\ntenant_id = "{tenant}"\nname = "{tenant} producer"\nrole = "producer"\n'
        f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        for tenant, key in KEYS.items()
    ]
    (config_dir / "api_keys.toml").write_text("\n".join(entries))
    return config_dir


def report(**changes: object) -> dict[str, object]:
    return {
        "source": "payments-gateway",
        "error_type": "CardDeclined",
        "message": "Card declined for order 1042",
        "attributes": {"order_id": "1042", "amount": 129.9},
        **changes,
    }


def stop_gracefully(process: SluiceProcess) -> None:
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly, hence -SIGTERM.
    assert process.stop() in (0, -signal.SIGTERM), process.log_tail()
    assert "Traceback" not in process.log_tail(), process.log_tail()


@dataclass
class RunningApi:
    url: str
    topic: str
    bootstrap: str

    def headers(self, tenant: str = "acme", **extra: str) -> dict[str, str]:
        return {"X-API-Key": KEYS[tenant], **extra}


def start_api(bootstrap: str, prefix: str, tmp_path: Path) -> tuple[SluiceProcess, str]:
    """`sluice api` on a free port, as a user starts it; returns the process and its URL."""
    port = free_port()
    process = SluiceProcess(
        ["api", "--port", str(port)],
        {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "SLUICE_TOPIC_PREFIX": prefix,
            "SLUICE_CONFIG_DIR": str(write_api_keys(tmp_path / "config")),
            "SLUICE_API_PORT": str(port),
            "SLUICE_WORKER_URLS": json.dumps([f"http://127.0.0.1:{free_port()}"]),
        },
        tmp_path / "api.log",
    ).start()
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture
async def api(kafka_bootstrap: str, names: Names, tmp_path: Path) -> AsyncIterator[RunningApi]:
    settings = Settings.model_validate(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "topic_prefix": names.topic_prefix,
            "partitions": PARTITIONS,
        }
    )
    await ensure_topics(settings, [TopicNames(names.topic_prefix).ingested])
    process, url = start_api(kafka_bootstrap, names.topic_prefix, tmp_path)
    try:
        process.wait_http(f"{url}/readyz")  # ready = the producer reached the broker
        yield RunningApi(url, TopicNames(names.topic_prefix).ingested, kafka_bootstrap)
    finally:
        stop_gracefully(process)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as c:
        yield c


async def read_topic(
    bootstrap: str, topic: str
) -> list[tuple[bytes, ExceptionIngested, dict[str, bytes]]]:
    """Every record on ``topic`` (all partitions, from the start): key, decoded event, headers."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        out = []
        for tp in partitions:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=5000)
                for msg in batch.get(tp, []):
                    event = decode(msg.value)
                    assert isinstance(event, ExceptionIngested)
                    out.append((msg.key, event, dict(msg.headers)))
        return out
    finally:
        await consumer.stop()


async def test_post_is_acknowledged_then_on_the_ingested_topic(
    api: RunningApi, client: httpx.AsyncClient
) -> None:
    body = report(occurred_at="2026-01-15T09:30:00Z", external_ref="ext-9")
    resp = await client.post(f"{api.url}/v1/exceptions", json=body, headers=api.headers("globex"))
    assert resp.status_code == 202, resp.text
    created = resp.json()
    exception_id = created["exception_id"]
    assert resp.headers["Location"] == f"/v1/exceptions/{exception_id}"
    assert created["status_url"] == resp.headers["Location"]

    [(key, event, headers)] = await read_topic(api.bootstrap, api.topic)
    assert key == exception_id.encode()
    assert event.exception_id == exception_id
    assert str(event.event_id) == created["event_id"]
    assert event.event_id == uuid.uuid5(SLUICE_NAMESPACE, f"globex:{exception_id}:ingested")
    assert event.tenant_id == "globex"  # from the key, not the body
    assert event.sequence == 1
    assert event.correlation_id == event.event_id
    assert event.payload.report.message == "Card declined for order 1042"
    assert event.payload.report.occurred_at == datetime(2026, 1, 15, 9, 30, tzinfo=UTC)
    assert event.payload.report.attributes == {"order_id": "1042", "amount": 129.9}
    assert len(event.payload.request_hash) == 64
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"] == created["event_id"].encode()
    assert headers["ce_source"] == b"/sluice/api/globex"
    assert headers["ce_type"] == b"ExceptionIngested"
    assert datetime.fromisoformat(headers["ce_time"].decode()) == event.occurred_at
    assert headers["content-type"] == b"application/json"


async def test_idempotency_key_retry_answers_the_same_and_writes_once(
    api: RunningApi, client: httpx.AsyncClient
) -> None:
    headers = api.headers(**{"Idempotency-Key": "order-1042-decline-1"})
    first = await client.post(f"{api.url}/v1/exceptions", json=report(), headers=headers)
    assert first.status_code == 202, first.text
    retry = await client.post(f"{api.url}/v1/exceptions", json=report(), headers=headers)
    assert retry.status_code == 202, retry.text
    assert retry.json() == first.json()
    assert retry.headers["Location"] == first.headers["Location"]
    assert retry.headers["Idempotent-Replayed"] == "true"

    changed = await client.post(
        f"{api.url}/v1/exceptions", json=report(message="a different report"), headers=headers
    )
    assert changed.status_code == 422
    assert (
        "Idempotency-Key was already used with a different request body"
        in (changed.json()["detail"])
    )

    records = await read_topic(api.bootstrap, api.topic)
    assert len(records) == 1
    _, event, _ = records[0]
    assert event.exception_id == first.json()["exception_id"]
    assert event.payload.idempotency_key == "order-1042-decline-1"


async def test_batch_writes_the_valid_items_and_names_the_invalid_field(
    api: RunningApi, client: httpx.AsyncClient
) -> None:
    items = [
        report(message="one"),
        report(message="two"),
        report(error_type=""),
        report(message="three"),
    ]
    resp = await client.post(
        f"{api.url}/v1/exceptions:batch", json={"items": items}, headers=api.headers()
    )
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert (result["accepted"], result["rejected"]) == (3, 1)
    assert [r["status_code"] for r in result["results"]] == [202, 202, 422, 202]
    assert [e["field"] for e in result["results"][2]["errors"]] == ["error_type"]

    records = await read_topic(api.bootstrap, api.topic)
    assert len(records) == 3
    by_id = {event.exception_id: event for _, event, _ in records}
    for i, message in ((0, "one"), (1, "two"), (3, "three")):
        item = result["results"][i]
        event = by_id[item["exception_id"]]
        assert event.payload.report.message == message
        assert str(event.event_id) == item["event_id"]
        assert event.tenant_id == "acme"


async def test_a_post_right_after_startup_waits_for_the_first_connection(
    kafka_bootstrap: str, names: Names, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    settings = Settings.model_validate(
        {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "topic_prefix": names.topic_prefix}
    )
    await ensure_topics(settings, [TopicNames(names.topic_prefix).ingested])
    process, url = start_api(kafka_bootstrap, names.topic_prefix, tmp_path)
    try:
        process.wait_http(f"{url}/healthz")  # up, not necessarily connected yet
        headers = {"X-API-Key": KEYS["acme"]}
        resp = await client.post(f"{url}/v1/exceptions", json=report(), headers=headers)
        assert resp.status_code == 202, resp.text
    finally:
        stop_gracefully(process)


@pytest.fixture
def api_without_broker(names: Names, tmp_path: Path) -> Iterator[tuple[SluiceProcess, str]]:
    process, url = start_api(f"127.0.0.1:{free_port()}", names.topic_prefix, tmp_path)
    try:
        process.wait_http(f"{url}/healthz")
        yield process, url
    finally:
        stop_gracefully(process)


async def test_without_a_broker_the_api_starts_is_not_ready_and_answers_503(
    api_without_broker: tuple[SluiceProcess, str], client: httpx.AsyncClient
) -> None:
    _, url = api_without_broker
    ready = await client.get(f"{url}/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "not_ready"
    headers = {"X-API-Key": KEYS["acme"]}
    for extra in ({}, {"Idempotency-Key": "k-1"}):
        resp = await client.post(f"{url}/v1/exceptions", json=report(), headers=headers | extra)
        assert resp.status_code == 503
        assert resp.headers["Retry-After"] == "5"
        assert "not accepted" in resp.json()["detail"]
        assert "Location" not in resp.headers


def test_a_config_error_stops_the_api_at_startup_with_its_text(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "api_keys.toml").write_text('[[keys]]\ntenant_id = "acme"\n')
    port = free_port()
    process = SluiceProcess(
        ["api", "--port", str(port)],
        {
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "SLUICE_CONFIG_DIR": str(config),
        },
        tmp_path / "api.log",
    ).start()
    assert process.proc is not None
    code = process.proc.wait(timeout=60)
    assert code != 0
    assert "The Sluice API cannot start" in process.log_tail()
    assert "keys[0] (no name): sha256 is required" in process.log_tail()
    assert "keys[0] (no name): role is required" in process.log_tail()
