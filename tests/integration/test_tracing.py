"""One OpenTelemetry trace per exception across the API, Kafka and every stage; metrics that move.

API and worker run as users run them, configured only by the standard OTEL_* variables, exporting
to a real OTLP/HTTP collector on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.rocks import MiB
from app.settings import Settings
from tests.integration.conftest import StackFactory
from tests.integration.test_pipeline import PAYMENT, post
from tests.support.mock_http import MockHTTPServer
from tests.support.otlp_collector import CollectedSpan, OTLPCollector

STAGE_TOPICS = ("ingested", "fingerprinted", "accepted", "triaged", "decided", "planned")


@pytest.fixture
def collector() -> Iterator[OTLPCollector]:
    with OTLPCollector() as c:
        yield c


def otel_env(collector: OTLPCollector) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


def trace_of(collector: OTLPCollector, exception_id: str) -> list[CollectedSpan]:
    roots = [
        s for s in collector.spans() if s.attributes.get("sluice.exception_id") == exception_id
    ]
    assert roots, "no span names the exception"
    return collector.traces()[roots[0].trace_id]


def by_name(spans: list[CollectedSpan], name: str) -> list[CollectedSpan]:
    return [s for s in spans if s.name == name]


async def test_one_post_is_one_trace_through_every_stage_and_tool(
    stack_factory: StackFactory, collector: OTLPCollector
) -> None:
    stack = await stack_factory(env=otel_env(collector))
    prefix = stack.topic_prefix
    exception_id = (await post(stack, PAYMENT)).json()["exception_id"]
    await stack.wait_for_state(exception_id, {"resolved"})

    def complete(arrived: list[CollectedSpan]) -> bool:
        """Every stage's own span (not only the projection's) and the three tool calls arrived."""
        mine = [s for s in arrived if s.attributes.get("sluice.exception_id") == exception_id]
        stage_spans = {
            s.name for s in mine if s.attributes.get("sluice.stage") not in (None, "projection")
        }
        trace_ids = {s.trace_id for s in mine}
        clients = [s for s in arrived if s.kind == "CLIENT" and s.trace_id in trace_ids]
        return (
            all(f"process {prefix}.{t}" in stage_spans for t in STAGE_TOPICS) and len(clients) >= 3
        )

    collector.wait_for(complete, timeout=30)
    spans = trace_of(collector, exception_id)
    ids = {s.span_id: s for s in spans}
    server = [s for s in spans if s.kind == "SERVER" and s.service_name == "sluice-api"]
    assert len(server) == 1 and server[0].parent_span_id is None
    # Each stage's process span is the child of the send span that produced its input.
    for topic in STAGE_TOPICS:
        stage_spans = [
            s
            for s in by_name(spans, f"process {prefix}.{topic}")
            if s.attributes.get("sluice.stage") != "projection"
        ]
        assert len(stage_spans) == 1, topic
        process = stage_spans[0]
        parent = ids[process.parent_span_id or ""]
        assert (parent.name, parent.kind) == (f"send {prefix}.{topic}", "PRODUCER")
        assert process.kind == "CONSUMER"
        assert process.attributes["messaging.system"] == "kafka"
        assert process.attributes["messaging.destination.name"] == f"{prefix}.{topic}"
        assert process.attributes["sluice.tenant_id"] == "acme"
        assert process.attributes["sluice.outcome"] == "processed"
    # The send into the first stage hangs off the API request; later sends off the stage spans.
    first_send = ids[by_name(spans, f"process {prefix}.ingested")[0].parent_span_id or ""]
    assert first_send.parent_span_id == server[0].span_id
    # The tool calls are HTTP client spans inside the tool stage's process span.
    tool_stage = next(
        s
        for s in by_name(spans, f"process {prefix}.planned")
        if s.attributes.get("sluice.stage") == "tool"
    )
    clients = [s for s in spans if s.kind == "CLIENT" and s.parent_span_id == tool_stage.span_id]
    assert len(clients) == 3, [c.name for c in clients]
    assert len({s.trace_id for s in spans}) == 1


async def test_dead_letter_and_redrive_show_in_the_exceptions_trace(
    stack_factory: StackFactory, collector: OTLPCollector, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory(env=otel_env(collector))
    mock_server.fail("/hooks/acme", 503, times=3)
    exception_id = (await post(stack, PAYMENT)).json()["exception_id"]
    await stack.wait_for_state(exception_id, {"dead_lettered"})
    async with httpx.AsyncClient(base_url=stack.api_url) as client:
        resp = await client.post(
            f"/v1/exceptions/{exception_id}/redrive", json={}, headers=stack.headers()
        )
    assert resp.status_code == 202
    await stack.wait_for_state(exception_id, {"resolved"})

    def redriven(arrived: list[CollectedSpan]) -> bool:
        return any(
            e.name == "sluice.redrive"
            for s in arrived
            if s.attributes.get("sluice.exception_id") == exception_id
            for e in s.events
        )

    collector.wait_for(redriven, timeout=30)
    spans = trace_of(collector, exception_id)
    tool_spans = [s for s in spans if s.attributes.get("sluice.stage") == "tool"]
    events = [e.name for s in tool_spans for e in s.events]
    outcomes = [s.attributes.get("sluice.outcome") for s in tool_spans]
    assert any("dead" in name for name in events), events  # the failure, on the first attempt
    assert "sluice.redrive" in events
    assert outcomes.count("dead_lettered") == 1 and "processed" in outcomes


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_metrics_move_on_api_and_worker(stack_factory: StackFactory) -> None:
    stack = await stack_factory()
    for _ in range(3):
        assert (await post(stack, PAYMENT)).status_code == 202
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            worker = (await client.get(f"{stack.worker_url(0)}/metrics")).text
            done = samples(worker, "sluice_events_processed_total")
            folded = samples(worker, "sluice_end_to_end_seconds_count").get((), 0)
            if done.get((("stage", "tool"),), 0) >= 3 and folded >= 3:
                break
            await asyncio.sleep(0.3)
        api = (await client.get(f"{stack.api_url}/metrics")).text
    assert done[(("stage", "tool"),)] == 3
    assert done[(("stage", "intake"),)] == 3
    latency = samples(worker, "sluice_stage_processing_seconds_count")
    assert latency[(("stage", "triage"),)] == 3
    assert samples(worker, "sluice_end_to_end_seconds_count")[()] == 3
    assert (("stage", "tool"),) in samples(worker, "sluice_dlq_depth")
    assert any(k for k in samples(worker, "sluice_consumer_lag"))
    # the tables' RocksDB: one shared cache (the default size), and every table reports itself
    cache = samples(worker, "sluice_table_cache_bytes")
    assert cache[(("kind", "capacity"),)] == Settings.model_fields["table_cache_mib"].default * MiB
    assert cache[(("kind", "usage"),)] > 0
    assert cache[(("kind", "write_buffers_usage"),)] > 0
    keys = samples(worker, "sluice_table_keys_estimate")
    assert keys[(("table", "exceptions"),)] >= 3
    assert keys[(("table", "processed-tool"),)] >= 3
    memtables = samples(worker, "sluice_table_bytes")
    assert memtables[(("kind", "memtables"), ("table", "exceptions"))] > 0
    ingest = samples(api, "sluice_ingest_requests_total")
    assert sum(v for k, v in ingest.items() if ("status_code", "202") in k) == 3
