"""The Faust application: the worker process that runs Sluice's stage agents and holds its tables.

``faust -A app.faust_app worker`` and ``sluice worker`` both start it. Everything is configured from
:class:`app.settings.Settings`, so several workers (or test runs) differ only by environment.
"""

from __future__ import annotations

import faust

from app.consumer import TRANSPORT_SCHEME
from app.rocks import STORE_URL
from app.settings import Settings, get_settings
from app.topics import TopicNames


def create_app(settings: Settings) -> faust.App:
    settings.worker_dir.parent.mkdir(parents=True, exist_ok=True)
    return faust.App(
        settings.app_id,
        # Faust's aiokafka transport, with a consumer that a rebalance cannot make skip a record
        broker=";".join(
            f"{TRANSPORT_SCHEME}://{server}"
            for server in settings.kafka_bootstrap_servers.split(",")
        ),
        store=STORE_URL,  # RocksDB with one memory budget per process
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
