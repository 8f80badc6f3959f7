"""The Faust application: the worker process that runs Sluice's stage agents and holds its tables.

``faust -A app.faust_app worker`` and ``sluice worker`` both start it. Everything is configured from
:class:`app.settings.Settings`, so several workers (or test runs) differ only by environment.
"""

from __future__ import annotations

from typing import Any

import faust
import faust.transport.consumer

from app.settings import Settings, get_settings
from app.topics import TopicNames


def _ack_current_generation_only() -> None:
    """Make Faust ignore acks of records fetched before the latest rebalance.

    After a rebalance Faust seeks every partition back to its committed offset, so a record fetched
    before it comes again; the old copies still queued for an agent are skipped *and acked* by the
    stream (faust/streams.py). On a topic two agents read (a stage's input is also a history topic
    of the projection), the projection's ack plus that skip-ack made a record fully acked, so the
    next commit passed it while the refetched copy had not been processed: a worker killed in that
    window lost the record for the stage (the SIGKILL test lost 2 of 2000 plans that way). An ack
    of an old generation's copy now counts for nothing; the refetched copy's ack counts.
    """
    consumer_cls = faust.transport.consumer.Consumer
    faust_ack = consumer_cls.ack
    if getattr(faust_ack, "sluice_generation_check", False):
        return

    def ack(self: Any, message: Any) -> bool:
        if message.generation_id != self.app.consumer_generation_id:
            return False
        return bool(faust_ack(self, message))

    ack.sluice_generation_check = True  # type: ignore[attr-defined]
    consumer_cls.ack = ack  # type: ignore[method-assign]


def create_app(settings: Settings) -> faust.App:
    _ack_current_generation_only()
    settings.worker_dir.parent.mkdir(parents=True, exist_ok=True)
    return faust.App(
        settings.app_id,
        broker=settings.faust_broker,
        store="rocksdb://",
        datadir=str(settings.worker_dir),
        web_host=settings.worker_web_host,
        web_port=settings.worker_web_port,
        canonical_url=f"http://{settings.worker_web_host}:{settings.worker_web_port}",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        producer_acks=-1,
        producer_linger=settings.producer_linger_ms / 1000,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        autodiscover=False,
        web_enabled=True,
        # Faust's own wait for "all started events" hangs when an event read by two agents was
        # cleared from one agent's buffer (it stays unacked forever). Sluice drains instead: on a
        # stop signal no agent starts a new event and the ones in flight finish (app.pipeline.drain);
        # everything unacked is redelivered and absorbed by the idempotency tables.
        stream_wait_empty=False,
        broker_session_timeout=settings.worker_session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, settings.worker_session_timeout_seconds / 3),
    )


settings = get_settings()
topics = TopicNames(settings.topic_prefix)
app = create_app(settings)

# The pipeline's agents and the worker's web views register themselves on `app` when imported.
from app import pipeline, worker_web  # noqa: E402, F401
