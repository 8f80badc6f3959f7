"""`sluice api` exporting traces to a real OTLP/HTTP collector, against the real broker.

The API runs as a user runs it, configured only by the standard OTEL_* variables. One POST must give
one trace: the request's server span and, as its child, a ``send <prefix>.ingested`` span whose
traceparent is the one (and only) traceparent on the record in Kafka. ``GET /metrics`` counts the
ingest answers.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from app.admin import ensure_topics
from app.kafka_local import free_port
from app.settings import Settings
from app.topics import TopicNames
from tests.conftest import Names
from tests.support.otlp_collector import CollectedSpan, OTLPCollector
from tests.support.procs import SluiceProcess

API_KEY = "telemetry-acme-key"
PARTITIONS = 2
REPORT = {
    "source": "payments-gateway",
    "error_type": "CardDeclined",
    "message": "Card declined for order 1042",
}


@dataclass
class TracedApi:
    url: str
    topic: str
    bootstrap: str
    process: SluiceProcess


@pytest.fixture
def collector() -> Iterator[OTLPCollector]:
    with OTLPCollector() as c:
        yield c


@pytest.fixture
async def api(
    kafka_bootstrap: str, names: Names, tmp_path: Path, collector: OTLPCollector
) -> AsyncIterator[TracedApi]:
    topics = TopicNames(names.topic_prefix)
    settings = Settings.model_validate(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "topic_prefix": names.topic_prefix,
            "partitions": PARTITIONS,
        }
    )
    await ensure_topics(settings, [topics.ingested])
    config = tmp_path / "config"
    config.mkdir()
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    (config / "api_keys.toml").write_text(
        f'[[keys]]\ntenant_id = "acme"\nname = "producer"\nrole = "producer"\nsha256 = "{digest}"\n'
    )
    port = free_port()
    process = SluiceProcess(
        ["api", "--port", str(port)],
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "SLUICE_TOPIC_PREFIX": names.topic_prefix,
            "SLUICE_CONFIG_DIR": str(config),
            "SLUICE_WORKER_URLS": json.dumps([f"http://127.0.0.1:{free_port()}"]),
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        },
        tmp_path / "api.log",
    ).start()
    try:
        process.wait_http(f"http://127.0.0.1:{port}/readyz")
        yield TracedApi(f"http://127.0.0.1:{port}", topics.ingested, kafka_bootstrap, process)
    finally:
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
        assert process.stop() in (0, -signal.SIGTERM), process.log_tail()
        assert "Traceback" not in process.log_tail(), process.log_tail()


async def topic_headers(bootstrap: str, topic: str) -> dict[str, list[tuple[str, bytes]]]:
    """Every record on ``topic``: its key (the exception id) -> its headers, duplicates kept."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        out: dict[str, list[tuple[str, bytes]]] = {}
        for tp in partitions:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=5000)
                for msg in batch.get(tp, []):
                    out[msg.key.decode()] = list(msg.headers)
        return out
    finally:
        await consumer.stop()


def traceparent_ids(headers: list[tuple[str, bytes]]) -> tuple[str, str]:
    """(trace id, parent span id) of the record's one traceparent."""
    values = [v.decode() for k, v in headers if k.lower() == "traceparent"]
    assert len(values) == 1, f"expected exactly one traceparent header, got {values}"
    version, trace_id, span_id, _flags = values[0].split("-")
    assert version == "00"
    return trace_id, span_id


def ingest_count(text: str, status_code: str, route: str = "/v1/exceptions") -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sluice_ingest_requests_total" and sample.labels == {
                "route": route,
                "status_code": status_code,
            }:
                return float(sample.value)
    return 0.0


def server_and_sends(
    spans: list[CollectedSpan], topic: str, sends: int
) -> tuple[CollectedSpan, list[CollectedSpan]] | None:
    """The POST's server span and its ``sends`` send-span children, once all have arrived."""
    for server in (s for s in spans if s.kind == "SERVER"):
        children = [
            s for s in spans if s.name == f"send {topic}" and s.parent_span_id == server.span_id
        ]
        if len(children) == sends:
            return server, children
    return None


async def test_a_post_is_one_trace_whose_send_span_is_the_records_traceparent(
    api: TracedApi, collector: OTLPCollector
) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        resp = await client.post("/v1/exceptions", json=REPORT, headers={"X-API-Key": API_KEY})
        assert resp.status_code == 202, resp.text
        exception_id = resp.json()["exception_id"]

        server, [send] = collector.wait_for(lambda spans: server_and_sends(spans, api.topic, 1))
        traces = collector.traces()
        assert list(traces) == [server.trace_id], "one POST, one trace"
        assert {s.name for s in traces[server.trace_id]} == {
            "POST /v1/exceptions",
            f"send {api.topic}",
        }
        assert server.parent_span_id is None
        assert server.service_name == send.service_name == "sluice-api"
        assert server.attributes["sluice.tenant_id"] == "acme"
        assert server.attributes["sluice.exception_id"] == exception_id
        assert send.kind == "PRODUCER"
        assert send.attributes["messaging.system"] == "kafka"
        assert send.attributes["messaging.destination.name"] == api.topic
        assert send.attributes["messaging.operation.type"] == "send"
        assert send.attributes["messaging.kafka.message.key"] == exception_id
        assert send.attributes["sluice.exception_id"] == exception_id
        assert send.status_code != "ERROR"

        headers = (await topic_headers(api.bootstrap, api.topic))[exception_id]
        assert traceparent_ids(headers) == (server.trace_id, send.span_id)
        partition = send.attributes["messaging.destination.partition.id"]
        assert partition in {str(p) for p in range(PARTITIONS)}
        assert isinstance(send.attributes["messaging.kafka.offset"], int)

        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert ingest_count(metrics.text, "202") == 1
        for _ in range(2):
            more = await client.post("/v1/exceptions", json=REPORT, headers={"X-API-Key": API_KEY})
            assert more.status_code == 202
        bad = await client.post("/v1/exceptions", json=REPORT, headers={"X-API-Key": "wrong"})
        assert bad.status_code == 401
        text = (await client.get("/metrics")).text
        assert ingest_count(text, "202") == 3
        assert ingest_count(text, "401") == 1
        assert "sluice_ingest_produce_seconds_count 3.0" in text
    assert not any(s.name.startswith("GET /metrics") for s in collector.spans())


async def test_each_record_of_a_batch_carries_its_own_send_span(
    api: TracedApi, collector: OTLPCollector
) -> None:
    items = [{**REPORT, "message": f"declined {i}"} for i in range(3)]
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        resp = await client.post(
            "/v1/exceptions:batch", json={"items": items}, headers={"X-API-Key": API_KEY}
        )
    assert resp.status_code == 200, resp.text
    ids = [r["exception_id"] for r in resp.json()["results"]]

    server, sends = collector.wait_for(lambda spans: server_and_sends(spans, api.topic, 3))
    assert server.name == "POST /v1/exceptions:batch"
    by_key = {s.attributes["messaging.kafka.message.key"]: s for s in sends}
    assert sorted(by_key) == sorted(ids)
    records = await topic_headers(api.bootstrap, api.topic)
    for exception_id in ids:
        assert traceparent_ids(records[exception_id]) == (
            server.trace_id,
            by_key[exception_id].span_id,
        )
