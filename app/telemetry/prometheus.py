"""Sluice's Prometheus metrics: one registry per process, changed only through typed methods.

Metrics live in one :class:`~prometheus_client.CollectorRegistry` per process (:data:`REGISTRY`),
changed only through the methods of :data:`metrics`, so label names and values stay consistent
between the worker and the API; :func:`render_metrics` returns the body and content type for
whatever web framework serves ``/metrics``. Nothing here depends on tracing or logging setup.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

__all__ = ["REGISTRY", "Metrics", "metrics", "render_metrics"]

log = logging.getLogger("sluice.telemetry")

REGISTRY = CollectorRegistry(auto_describe=True)
"""This process's one Prometheus registry (process, platform and GC collectors included)."""
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

_STAGE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_END_TO_END_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
_PRODUCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Sluice's Prometheus metrics, changed only through these methods (labels stay consistent)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._scrape_callbacks: list[Callable[[], None]] = []
        # Worker
        self.events_processed = Counter(
            "sluice_events_processed",
            "Input events a stage processed to completion (outputs acked, input marked).",
            ["stage"],
            registry=registry,
        )
        self.events_failed = Counter(
            "sluice_events_failed",
            "Failed processing attempts, whether then retried or dead-lettered.",
            ["stage", "error_class"],
            registry=registry,
        )
        self.events_retried = Counter(
            "sluice_events_retried",
            "Processing attempts scheduled again.",
            ["stage"],
            registry=registry,
        )
        self.events_dead_lettered = Counter(
            "sluice_events_dead_lettered",
            "Records a stage sent to its DLQ topic.",
            ["stage", "error_class"],
            registry=registry,
        )
        self.events_duplicates = Counter(
            "sluice_events_duplicates",
            "Input events dropped because the stage had already processed their id.",
            ["stage"],
            registry=registry,
        )
        self.events_parked = Counter(
            "sluice_events_parked",
            "Events held back behind a dead-lettered event of the same exception.",
            ["stage"],
            registry=registry,
        )
        self.events_redriven = Counter(
            "sluice_events_redriven",
            "Operator redrive requests a stage carried out (its quarantine replayed).",
            ["stage"],
            registry=registry,
        )
        self.events_discarded = Counter(
            "sluice_events_discarded",
            "Operator discard requests a stage carried out (its quarantine dropped).",
            ["stage"],
            registry=registry,
        )
        self.exceptions_expired = Counter(
            "sluice_exceptions_expired",
            "Closed exceptions deleted from the worker's tables after their retention.",
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "sluice_stage_processing_seconds",
            "Time a stage spent on one input event, decode to idempotency mark.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.end_to_end_seconds = Histogram(
            "sluice_end_to_end_seconds",
            "From ingestion (the API's ExceptionIngested) to the exception's completion.",
            buckets=_END_TO_END_BUCKETS,
            registry=registry,
        )
        self.dlq_depth = Gauge(
            "sluice_dlq_depth",
            "Records waiting in a stage's DLQ topic.",
            ["stage"],
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "sluice_consumer_lag",
            "Records between the committed offset and the end of a partition.",
            ["topic", "partition"],
            registry=registry,
        )
        self.table_bytes = Gauge(
            "sluice_table_bytes",
            "What RocksDB reports for a table's partitions on this worker, summed: memtables,"
            " table readers (index and filters held outside the cache) and SST files on disk.",
            ["table", "kind"],
            registry=registry,
        )
        self.table_keys = Gauge(
            "sluice_table_keys_estimate",
            "RocksDB's estimate of the keys in a table's partitions on this worker.",
            ["table"],
            registry=registry,
        )
        self.table_cache_bytes = Gauge(
            "sluice_table_cache_bytes",
            "The worker's one RocksDB cache (capacity, usage, pinned) and memtable budget"
            " (write_buffers_limit, write_buffers_usage), shared by every table partition.",
            ["kind"],
            registry=registry,
        )
        # API
        self.ingest_requests = Counter(
            "sluice_ingest_requests",
            "Ingest requests answered, by route and HTTP status code.",
            ["route", "status_code"],
            registry=registry,
        )
        self.ingest_produce_seconds = Histogram(
            "sluice_ingest_produce_seconds",
            "Time the API waited for Kafka to acknowledge a request's records.",
            buckets=_PRODUCE_BUCKETS,
            registry=registry,
        )
        self.api_denials = Counter(
            "sluice_api_denials",
            "Requests refused for their X-API-Key, by reason: missing_key, unknown_key, role"
            " (a valid key whose role may not use the route), or auth_throttled (429: the client"
            " address used up its budget of failed authentications).",
            ["reason"],
            registry=registry,
        )
        self.api_rate_limited = Counter(
            "sluice_api_rate_limited",
            "Ingest requests refused with 429 because the tenant's [limits] bucket lacked a token"
            " for each of their reports (a batch counts once).",
            ["tenant"],
            registry=registry,
        )
        self.api_keys_reloads = Counter(
            "sluice_api_keys_reloads",
            "Changes of api_keys.toml the API read, by result: ok (its keys are in use) or refused"
            " (malformed, empty or missing: the keys loaded before stay in use).",
            ["result"],
            registry=registry,
        )
        self.api_keys_in_use = Gauge(
            "sluice_api_keys",
            "API keys the API accepts now, by role.",
            ["role"],
            registry=registry,
        )
        self.api_worker_unavailable = Counter(
            "sluice_api_worker_unavailable",
            "Reads a worker did not answer (unreachable, timed out, 5xx or a bad answer), by worker"
            " URL. The API logs only when a worker becomes unavailable and when it is back.",
            ["worker"],
            registry=registry,
        )

    # --- worker
    def declare_stages(self, stages: Sequence[str]) -> None:
        """Create every per-stage series at zero, so rates and alerts work before the first event."""
        for stage in stages:
            self.events_processed.labels(stage)
            self.events_retried.labels(stage)
            self.events_duplicates.labels(stage)
            self.events_parked.labels(stage)
            self.events_redriven.labels(stage)
            self.events_discarded.labels(stage)
            self.stage_seconds.labels(stage)

    def processed(self, stage: str, seconds: float) -> None:
        """One input event processed to completion in ``seconds``."""
        self.events_processed.labels(stage).inc()
        self.stage_seconds.labels(stage).observe(seconds)

    def failed(self, stage: str, error_class: str) -> None:
        """One processing attempt failed (call it for every failed attempt)."""
        self.events_failed.labels(stage, error_class).inc()

    def retried(self, stage: str) -> None:
        """A failed attempt will be made again."""
        self.events_retried.labels(stage).inc()

    def dead_lettered(self, stage: str, error_class: str) -> None:
        """A record went to the stage's DLQ."""
        self.events_dead_lettered.labels(stage, error_class).inc()

    def duplicate(self, stage: str) -> None:
        """An already-processed event id was dropped."""
        self.events_duplicates.labels(stage).inc()

    def parked(self, stage: str) -> None:
        """An event was parked behind its exception's dead-lettered event."""
        self.events_parked.labels(stage).inc()

    def redriven(self, stage: str) -> None:
        """An operator's redrive replayed the stage's quarantine of one exception."""
        self.events_redriven.labels(stage).inc()

    def discarded(self, stage: str) -> None:
        """An operator's discard dropped the stage's quarantine of one exception."""
        self.events_discarded.labels(stage).inc()

    def expired(self, count: int) -> None:
        """``count`` closed exceptions were deleted after their retention."""
        self.exceptions_expired.inc(count)

    def end_to_end(self, seconds: float) -> None:
        """An exception completed ``seconds`` after it was ingested."""
        self.end_to_end_seconds.observe(seconds)

    def set_dlq_depth(self, stage: str, depth: int) -> None:
        self.dlq_depth.labels(stage).set(depth)

    def set_consumer_lag(self, topic: str, partition: int, lag: int) -> None:
        self.consumer_lag.labels(topic, str(partition)).set(lag)

    def set_table_memory(
        self, tables: Mapping[str, Mapping[str, int]], shared: Mapping[str, int]
    ) -> None:
        """Record what app.rocks reports: per table (memory and keys) and the shared budget."""
        for table, figures in tables.items():
            for kind in ("memtables", "table_readers", "sst_files"):
                self.table_bytes.labels(table, kind).set(figures[kind])
            self.table_keys.labels(table).set(figures["keys_estimate"])
        for kind, value in shared.items():
            self.table_cache_bytes.labels(kind.removeprefix("cache_")).set(value)

    def forget_consumer_lag(self, topic: str, partition: int) -> None:
        """Drop a partition's lag series (the partition was revoked from this worker)."""
        with suppress(KeyError):
            self.consumer_lag.remove(topic, str(partition))

    # --- API
    def ingest_request(self, route: str, status_code: int) -> None:
        """An ingest request answered ``status_code`` (``route`` is the route template)."""
        self.ingest_requests.labels(route, str(status_code)).inc()

    def produce_latency(self, seconds: float) -> None:
        """The API waited ``seconds`` for Kafka's acks of one request's records."""
        self.ingest_produce_seconds.observe(seconds)

    def declare_api_denials(self, reasons: Sequence[str]) -> None:
        """Create the denial series at zero, so rates and alerts work from the start."""
        for reason in reasons:
            self.api_denials.labels(reason)

    def api_denied(self, reason: str) -> None:
        """A request was refused for its API key (``missing_key``, ``unknown_key``, ``role`` or
        ``auth_throttled``)."""
        self.api_denials.labels(reason).inc()

    def declare_rate_limited(self, tenants: Sequence[str]) -> None:
        """Create the series of the limited tenants at zero."""
        for tenant in tenants:
            self.api_rate_limited.labels(tenant)

    def rate_limited(self, tenant: str) -> None:
        """An ingest request of ``tenant`` was refused for its limit (429)."""
        self.api_rate_limited.labels(tenant).inc()

    def declare_api_keys_reloads(self, results: Sequence[str]) -> None:
        """Create the reload series at zero."""
        for result in results:
            self.api_keys_reloads.labels(result)

    def api_keys_reloaded(self, result: str) -> None:
        """A change of api_keys.toml was read: ``ok`` (now in use) or ``refused``."""
        self.api_keys_reloads.labels(result).inc()

    def set_api_keys(self, by_role: Mapping[str, int]) -> None:
        """The keys in use now, counted by role (every role given, zeros included)."""
        for role, count in by_role.items():
            self.api_keys_in_use.labels(role).set(count)

    def worker_unavailable(self, worker: str) -> None:
        """A read asked ``worker`` and got no usable answer."""
        self.api_worker_unavailable.labels(worker).inc()

    # --- exposition
    def on_scrape(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` before every render: refresh gauges that are cheap to compute at scrape
        time rather than on every event (consumer lag, DLQ depth). A failing callback is logged and
        skipped."""
        self._scrape_callbacks.append(callback)

    def render(self) -> tuple[bytes, str]:
        for callback in self._scrape_callbacks:
            try:
                callback()
            except Exception:
                log.warning("a metrics scrape callback failed", exc_info=True)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


metrics = Metrics(REGISTRY)
"""The process's metrics: ``metrics.processed(stage, seconds)``, ``metrics.dead_lettered(...)``..."""


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus text exposition of :data:`REGISTRY`: (body, content type) for a /metrics
    endpoint of any web framework."""
    return metrics.render()
