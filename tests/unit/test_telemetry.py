"""app.telemetry without a broker: propagation through Kafka-style headers, span names, kinds and
attributes per the messaging conventions, parenting, metrics, log lines, and tracing configuration."""

from __future__ import annotations

import asyncio
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from api.main import create_api
from app import telemetry
from app.telemetry import (
    REGISTRY,
    JsonFormatter,
    TelemetryConfigError,
    TextFormatter,
    build_tracer_provider,
    dead_letter_event,
    extract_context,
    get_tracer,
    inject_headers,
    log_context,
    metrics,
    process_span,
    redrive_event,
    render_metrics,
    retry_event,
    send_span,
    setup_logging,
    setup_tracing,
    start_send_span,
    tracing_enabled,
    use_tracer_provider,
)
from tests.support.otlp_collector import OTLPCollector
from tests.unit.api.conftest import KEYS, make_settings, write_api_keys


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Sluice's span helpers recording into memory (the global provider is left alone)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    use_tracer_provider(provider)
    try:
        yield memory
    finally:
        use_tracer_provider(None)
        provider.shutdown()


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def traceparents(headers: list[tuple[str, bytes]]) -> list[bytes]:
    return [v for k, v in headers if k == "traceparent"]


def traceparent_of(ctx: trace.SpanContext) -> bytes:
    trace_id, span_id = trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)
    return f"00-{trace_id}-{span_id}-{ctx.trace_flags:02x}".encode()


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)


def only(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name]
    return span


# ------------------------------------------------------------------------------------- propagation


def test_inject_then_extract_round_trips_through_kafka_headers(
    exporter: InMemorySpanExporter,
) -> None:
    with get_tracer().start_as_current_span("request") as span:
        headers = inject_headers([("ce_id", b"e-1"), ("content-type", b"application/json")])
    ctx = span.get_span_context()

    assert headers[:2] == [("ce_id", b"e-1"), ("content-type", b"application/json")]
    [traceparent] = traceparents(headers)
    assert traceparent == traceparent_of(ctx)
    # As aiokafka gives headers (pairs of bytes) and as Faust's event.headers (a mapping).
    for carrier in (headers, dict(headers), {"TraceParent": traceparent.decode()}):
        extracted = trace.get_current_span(extract_context(carrier)).get_span_context()
        assert (extracted.trace_id, extracted.span_id) == (ctx.trace_id, ctx.span_id)
        assert extracted.is_remote


def test_inject_replaces_a_traceparent_already_in_the_headers(
    exporter: InMemorySpanExporter,
) -> None:
    stale = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    given = [("traceparent", stale), ("tracestate", b"old=1"), ("ce_id", b"e-1")]
    with get_tracer().start_as_current_span("request"):
        headers = inject_headers(given)
    assert len(traceparents(headers)) == 1
    assert traceparents(headers) != [stale]
    assert ("tracestate", b"old=1") not in headers
    assert ("ce_id", b"e-1") in headers
    assert given[0] == ("traceparent", stale)  # the input list is left as it was


def test_without_a_current_span_headers_pass_through_unchanged(
    exporter: InMemorySpanExporter,
) -> None:
    given = [("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    assert inject_headers(given) == given
    assert inject_headers([]) == []
    assert not trace.get_current_span(extract_context(None)).get_span_context().is_valid
    assert not trace.get_current_span(extract_context([("x", b"y")])).get_span_context().is_valid


# ------------------------------------------------------------------------------------ span helpers


def test_send_span_is_a_producer_span_named_after_the_topic(
    exporter: InMemorySpanExporter,
) -> None:
    with send_span("p.ingested", b"exc-1", partition=2) as span:
        headers = inject_headers([])
        span.set_ids(tenant_id="acme", exception_id="exc-1")
    [finished] = exporter.get_finished_spans()
    assert finished.name == "send p.ingested"
    assert finished.kind is SpanKind.PRODUCER
    assert dict(finished.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.destination.name": "p.ingested",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.kafka.message.key": "exc-1",
        "messaging.destination.partition.id": "2",
        "sluice.tenant_id": "acme",
        "sluice.exception_id": "exc-1",
    }
    assert traceparents(headers) == [traceparent_of(finished.get_span_context())]


def test_process_span_is_a_child_of_the_send_span_in_the_record_headers(
    exporter: InMemorySpanExporter,
) -> None:
    with get_tracer().start_as_current_span("POST /v1/exceptions", kind=SpanKind.SERVER):
        send = start_send_span("p.ingested", b"exc-1")
        headers = send.inject([("ce_id", b"e-1")])
        send.end()
    # Later, in another process: the stage reads the record.
    with process_span("intake", "p.ingested", 3, 42, b"exc-1", "sluice", headers) as span:
        span.set_ids(tenant_id="acme", exception_id="exc-1", event_id="e-1")
        retry_event(1, "transient", "tool timed out", delay_seconds=0.2)
        dead_letter_event("p.intake.dlq", "permanent", "stage_error", "unknown tenant")
        redrive_event("p.intake.dlq", "p.ingested")
        span.set_outcome("dead_lettered")
        with send_span("p.fingerprinted", b"acme:fp") as out:
            assert out.recording
            onward = inject_headers([])

    spans = exporter.get_finished_spans()
    server = only(spans, "POST /v1/exceptions")
    sent = only(spans, "send p.ingested")
    processed = only(spans, "process p.ingested")
    forwarded = only(spans, "send p.fingerprinted")
    assert len(traceparents(headers)) == 1
    # One trace: server -> send -> process -> send.
    assert len({hex_ids(s)[0] for s in spans}) == 1
    assert sent.parent is not None and sent.parent.span_id == server.context.span_id
    assert processed.parent is not None and processed.parent.span_id == sent.context.span_id
    assert processed.parent.is_remote
    assert forwarded.parent is not None and forwarded.parent.span_id == processed.context.span_id
    assert traceparents(onward) == [traceparent_of(forwarded.get_span_context())]

    assert processed.kind is SpanKind.CONSUMER
    assert dict(processed.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.destination.name": "p.ingested",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.partition.id": "3",
        "messaging.kafka.offset": 42,
        "messaging.kafka.message.key": "exc-1",
        "messaging.consumer.group.name": "sluice",
        "sluice.stage": "intake",
        "sluice.tenant_id": "acme",
        "sluice.exception_id": "exc-1",
        "sluice.event_id": "e-1",
        "sluice.outcome": "dead_lettered",
    }
    events = {e.name: dict(e.attributes or {}) for e in processed.events}
    assert events["sluice.retry"] == {
        "sluice.attempt": 1,
        "sluice.error.class": "transient",
        "sluice.error.message": "tool timed out",
        "sluice.retry.delay_seconds": 0.2,
    }
    assert events["sluice.dead_letter"]["sluice.dlq.topic"] == "p.intake.dlq"
    assert events["sluice.redrive"] == {
        "sluice.redrive.from": "p.intake.dlq",
        "sluice.redrive.to": "p.ingested",
        "sluice.count": 1,
    }


def test_an_error_escaping_a_process_span_marks_it_failed(exporter: InMemorySpanExporter) -> None:
    with (
        pytest.raises(RuntimeError),
        process_span("triage", "p.accepted", 0, 7, None, "sluice", []) as span,
    ):
        span.record_error(ValueError("bad rule"), "permanent")
        raise RuntimeError("boom")
    [finished] = exporter.get_finished_spans()
    assert finished.parent is None  # no traceparent in the record: a new trace
    assert finished.status.status_code is StatusCode.ERROR
    assert (finished.attributes or {})["error.type"] == "permanent"
    assert [e.name for e in finished.events] == ["exception", "exception"]


async def test_a_send_span_ends_when_the_broker_acks(exporter: InMemorySpanExporter) -> None:
    @dataclass
    class RecordMetadata:
        partition: int
        offset: int

    loop = asyncio.get_running_loop()
    acked: asyncio.Future[RecordMetadata] = loop.create_future()
    refused: asyncio.Future[RecordMetadata] = loop.create_future()
    ok = start_send_span("p.ingested", b"a")
    ok.end_when_done(acked)
    bad = start_send_span("p.ingested", b"b")
    bad.end_when_done(refused)
    assert exporter.get_finished_spans() == ()

    acked.set_result(RecordMetadata(partition=1, offset=99))
    refused.set_exception(ConnectionError("broker gone"))
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    ok.end()  # a second end is ignored
    by_key = {
        (s.attributes or {})["messaging.kafka.message.key"]: s
        for s in exporter.get_finished_spans()
    }
    assert len(by_key) == 2
    assert (by_key["a"].attributes or {})["messaging.destination.partition.id"] == "1"
    assert (by_key["a"].attributes or {})["messaging.kafka.offset"] == 99
    assert by_key["a"].status.status_code is StatusCode.UNSET
    assert by_key["b"].status.status_code is StatusCode.ERROR
    assert (by_key["b"].attributes or {})["error.type"] == "ConnectionError"


def test_helpers_are_no_ops_while_tracing_is_off() -> None:
    use_tracer_provider(None)
    assert not tracing_enabled()
    headers = [("ce_id", b"e-1")]
    with process_span("intake", "p.ingested", 0, 1, b"k", "g", headers) as span:
        assert not span.recording
        span.set_ids(tenant_id="acme")
        span.set_outcome("processed")
        retry_event(1, "transient", "x")
        with send_span("p.accepted", b"k") as send:
            assert inject_headers(headers) == headers
            assert send.inject(headers) == headers
    sender = start_send_span("p.accepted", b"k")
    sender.end(RuntimeError("ignored"))
    assert not sender.recording


# ------------------------------------------------------------------------------------------ metrics


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metric_functions_move_their_series() -> None:
    stage = "unit-stage"
    before = {
        "processed": sample("sluice_events_processed_total", stage=stage),
        "seconds": sample("sluice_stage_processing_seconds_count", stage=stage),
        "failed": sample("sluice_events_failed_total", stage=stage, error_class="transient"),
        "retried": sample("sluice_events_retried_total", stage=stage),
        "dlq": sample("sluice_events_dead_lettered_total", stage=stage, error_class="poison"),
        "dupes": sample("sluice_events_duplicates_total", stage=stage),
        "parked": sample("sluice_events_parked_total", stage=stage),
        "e2e": sample("sluice_end_to_end_seconds_count"),
        "expired": sample("sluice_exceptions_expired_total"),
        "ingest": sample("sluice_ingest_requests_total", route="/unit", status_code="202"),
        "produce": sample("sluice_ingest_produce_seconds_count"),
    }
    metrics.processed(stage, 0.02)
    metrics.processed(stage, 0.03)
    metrics.failed(stage, "transient")
    metrics.retried(stage)
    metrics.dead_lettered(stage, "poison")
    metrics.duplicate(stage)
    metrics.parked(stage)
    metrics.end_to_end(1.5)
    metrics.expired(3)
    metrics.set_dlq_depth(stage, 4)
    metrics.set_consumer_lag("p.ingested", 3, 17)
    metrics.ingest_request("/unit", 202)
    metrics.produce_latency(0.004)

    assert sample("sluice_events_processed_total", stage=stage) == before["processed"] + 2
    assert sample("sluice_stage_processing_seconds_count", stage=stage) == before["seconds"] + 2
    assert (
        sample("sluice_events_failed_total", stage=stage, error_class="transient")
        == before["failed"] + 1
    )
    assert sample("sluice_events_retried_total", stage=stage) == before["retried"] + 1
    assert (
        sample("sluice_events_dead_lettered_total", stage=stage, error_class="poison")
        == before["dlq"] + 1
    )
    assert sample("sluice_events_duplicates_total", stage=stage) == before["dupes"] + 1
    assert sample("sluice_events_parked_total", stage=stage) == before["parked"] + 1
    assert sample("sluice_end_to_end_seconds_count") == before["e2e"] + 1
    assert sample("sluice_exceptions_expired_total") == before["expired"] + 3
    assert sample("sluice_dlq_depth", stage=stage) == 4
    assert sample("sluice_consumer_lag", topic="p.ingested", partition="3") == 17
    assert (
        sample("sluice_ingest_requests_total", route="/unit", status_code="202")
        == before["ingest"] + 1
    )
    assert sample("sluice_ingest_produce_seconds_count") == before["produce"] + 1

    metrics.forget_consumer_lag("p.ingested", 3)
    metrics.forget_consumer_lag("p.ingested", 3)  # already gone: fine
    assert (
        REGISTRY.get_sample_value("sluice_consumer_lag", {"topic": "p.ingested", "partition": "3"})
        is None
    )

    body, content_type = render_metrics()
    assert content_type.startswith("text/plain")
    text = body.decode()
    assert f'sluice_events_processed_total{{stage="{stage}"}}' in text
    assert "# TYPE sluice_stage_processing_seconds histogram" in text
    assert "process_cpu_seconds_total" in text or "python_info" in text


def test_scrape_callbacks_refresh_gauges_and_a_failing_one_is_skipped() -> None:
    local = telemetry.Metrics(telemetry.CollectorRegistry())
    lag = {"value": 1}

    def refresh() -> None:
        local.set_consumer_lag("p.planned", 0, lag["value"])

    def broken() -> None:
        raise RuntimeError("consumer not started")

    local.on_scrape(broken)
    local.on_scrape(refresh)
    local.declare_stages(["tool"])
    lag["value"] = 12
    body, _ = local.render()
    assert 'sluice_consumer_lag{partition="0",topic="p.planned"} 12.0' in body.decode()
    assert 'sluice_events_processed_total{stage="tool"} 0.0' in body.decode()


async def test_the_api_serves_metrics_and_counts_ingest_answers(tmp_path: Path) -> None:
    settings = make_settings(write_api_keys(tmp_path / "config").parent)
    api = create_api(settings)
    route = "/v1/exceptions"
    before = sample("sluice_ingest_requests_total", route=route, status_code="401")
    async with (
        api.router.lifespan_context(api),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as client,
    ):
        bad_key = await client.post(route, json={}, headers={"X-API-Key": "nope"})
        assert bad_key.status_code == 401
        no_body = await client.post(route, headers={"X-API-Key": KEYS["acme"]})
        assert no_body.status_code == 422
        await client.get("/healthz")  # not an ingest route: not counted
        resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    assert sample("sluice_ingest_requests_total", route=route, status_code="401") == before + 1
    assert f'sluice_ingest_requests_total{{route="{route}",status_code="422"}}' in resp.text
    assert 'route="/healthz"' not in resp.text


# ------------------------------------------------------------------------------------------ logging


def log_line(formatter: logging.Formatter, message: str, **extra: str) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("sluice.test.telemetry")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("the cause")
        except ValueError:
            logger.warning(message, exc_info=True, extra=extra)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return stream.getvalue()


def test_json_log_lines_carry_the_current_trace_and_the_exception(
    exporter: InMemorySpanExporter,
) -> None:
    with (
        get_tracer().start_as_current_span("process p.accepted") as span,
        log_context(tenant_id="acme", exception_id="from-context", stage="triage"),
    ):
        text = log_line(JsonFormatter(), "send failed", exception_id="exc-9")
    [line] = text.splitlines()
    data = orjson.loads(line)
    ctx = span.get_span_context()
    assert data["trace_id"] == trace.format_trace_id(ctx.trace_id)
    assert data["span_id"] == trace.format_span_id(ctx.span_id)
    assert data["level"] == "WARNING"
    assert data["logger"] == "sluice.test.telemetry"
    assert data["message"] == "send failed"
    assert data["tenant_id"] == "acme"
    assert data["exception_id"] == "exc-9"  # extra= wins over log_context
    assert data["stage"] == "triage"
    assert data["timestamp"].endswith("Z")
    assert "ValueError: the cause" in data["exception"]


def test_log_lines_outside_a_span_have_no_trace_ids() -> None:
    data = orjson.loads(log_line(JsonFormatter(), "plain").splitlines()[0])
    assert "trace_id" not in data and "tenant_id" not in data
    text = log_line(TextFormatter(), "with ids", tenant_id="acme")
    first = text.splitlines()[0]
    assert first.endswith("sluice.test.telemetry: with ids [tenant_id=acme]")
    assert "ValueError: the cause" in text


def test_setup_logging_writes_json_lines_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    level = root.level
    try:
        setup_logging("info", json=True)
        setup_logging("info", json=True)  # idempotent: still one Sluice handler
        assert sum(isinstance(h, telemetry.StderrHandler) for h in root.handlers) == 1
        logging.getLogger("sluice.test").info("hello %s", "world")
        [line] = capsys.readouterr().err.splitlines()
        assert orjson.loads(line)["message"] == "hello world"
        with pytest.raises(TelemetryConfigError, match="SLUICE_LOG_LEVEL"):
            setup_logging("loud")
    finally:
        for handler in list(root.handlers):
            if isinstance(handler, telemetry.StderrHandler):
                root.removeHandler(handler)
        root.setLevel(level)


# ---------------------------------------------------------------------------------- configuration


@pytest.mark.usefixtures("no_otel_env")
def test_without_otel_variables_tracing_is_off_and_nothing_is_installed() -> None:
    use_tracer_provider(None)
    global_before = trace.get_tracer_provider()
    assert setup_tracing("sluice-test") is None
    assert trace.get_tracer_provider() is global_before
    assert not tracing_enabled()
    assert isinstance(get_tracer(), trace.NoOpTracer)


@pytest.mark.usefixtures("no_otel_env")
@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
    ],
)
def test_tracing_can_be_switched_off(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert build_tracer_provider("sluice-test") is None


@pytest.mark.usefixtures("no_otel_env")
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "use otlp, console or none"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "http/protobuf, grpc",
        ),
    ],
)
def test_unusable_otel_values_are_refused_with_a_sentence(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(TelemetryConfigError, match=message):
        build_tracer_provider("sluice-test")


@pytest.mark.usefixtures("no_otel_env")
def test_an_otlp_endpoint_alone_turns_tracing_on_and_spans_reach_the_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with OTLPCollector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        provider = build_tracer_provider("sluice-test")
        assert provider is not None
        try:
            tracer = provider.get_tracer("test")
            with (
                tracer.start_as_current_span("parent"),
                tracer.start_as_current_span(
                    "child", kind=SpanKind.PRODUCER, attributes={"messaging.system": "kafka"}
                ),
            ):
                pass
            assert provider.force_flush()
            spans = collector.wait_for(lambda s: s if len(s) == 2 else None)
        finally:
            provider.shutdown()
    by_name = {s.name: s for s in spans}
    assert by_name["child"].parent_span_id == by_name["parent"].span_id
    assert by_name["child"].trace_id == by_name["parent"].trace_id
    assert by_name["child"].kind == "PRODUCER"
    assert by_name["child"].attributes == {"messaging.system": "kafka"}
    assert {s.service_name for s in spans} == {"sluice-test"}
    assert collector.errors == []


@pytest.mark.usefixtures("no_otel_env")
def test_otel_service_name_overrides_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "payments-sluice")
    provider = build_tracer_provider("sluice-api")
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "payments-sluice"
    finally:
        provider.shutdown()


@pytest.mark.usefixtures("no_otel_env")
def test_console_and_grpc_exporters_are_available(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = build_tracer_provider("sluice-test")
    assert provider is not None
    with provider.get_tracer("test").start_as_current_span("debug me"):
        pass
    provider.shutdown()
    assert '"name": "debug me"' in capsys.readouterr().out  # the console exporter writes to stdout

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    grpc_provider = build_tracer_provider("sluice-test")
    assert grpc_provider is not None
    grpc_provider.shutdown()
