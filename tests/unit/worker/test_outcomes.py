"""One table says what each outcome records; the stat, the metric and the span follow it together."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from app.telemetry import Metrics, use_tracer_provider
from app.worker.items import Item
from app.worker.outcomes import OUTCOMES, Detail, Outcome, Recorder, StageStats

# The Prometheus series each outcome moves (labels besides the stage), as named today.
SERIES = {
    Outcome.PROCESSED: ("sluice_events_processed_total", {}),
    Outcome.DUPLICATE: ("sluice_events_duplicates_total", {}),
    Outcome.FAILED: ("sluice_events_failed_total", {"error_class": "transient"}),
    Outcome.RETRIED: ("sluice_events_retried_total", {}),
    Outcome.DEAD_LETTERED: ("sluice_events_dead_lettered_total", {"error_class": "transient"}),
    Outcome.PARKED: ("sluice_events_parked_total", {}),
    Outcome.REDRIVEN: ("sluice_events_redriven_total", {}),
    Outcome.DISCARDED: ("sluice_events_discarded_total", {}),
}
SPAN_EVENTS = {
    Outcome.RETRIED: "sluice.retry",
    Outcome.DEAD_LETTERED: "sluice.dead_letter",
    Outcome.REDRIVEN: "sluice.redrive",
    Outcome.DISCARDED: "sluice.redrive",
}


@pytest.fixture
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    use_tracer_provider(provider)
    yield exporter
    use_tracer_provider(None)


def test_every_outcome_has_a_row() -> None:
    assert set(OUTCOMES) == set(Outcome)
    fields = set(vars(StageStats()))
    assert all(marks.stat is None or marks.stat in fields for marks in OUTCOMES.values())


@pytest.mark.parametrize("outcome", list(Outcome))
def test_an_outcome_moves_its_stat_its_metric_and_its_span_together(
    outcome: Outcome, spans: InMemorySpanExporter
) -> None:
    registry = CollectorRegistry()
    recorder = Recorder(Metrics(registry))
    recorder.declare(["policy"])
    item = Item(b"exc-1", b"{}", "t.triaged", 3, 42, None)
    detail = Detail(
        seconds=0.01,
        outputs=1,
        error_class="transient",
        kind="ConnectionError",
        message="refused",
        attempt=1,
        delay=0.1,
        dlq="t.policy.dlq",
        count=2,
    )

    with recorder.span("policy", item) as span:
        recorder.record("policy", outcome, span, detail)

    marks = OUTCOMES[outcome]
    stats = vars(recorder.stats["policy"])
    counted = {k: v for k, v in stats.items() if isinstance(v, int) and v and k != "emitted"}
    assert counted == ({marks.stat: 1} if marks.stat else {})
    if outcome in SERIES:
        name, labels = SERIES[outcome]
        assert registry.get_sample_value(name, {"stage": "policy", **labels}) == 1
    [finished] = spans.get_finished_spans()
    assert finished.name == "process t.triaged"
    assert (finished.attributes or {}).get("sluice.outcome") == marks.span_outcome
    assert [e.name for e in finished.events] == (
        [SPAN_EVENTS[outcome]] if outcome in SPAN_EVENTS else []
    )
