"""The Faust application's configuration and the way a worker process runs it.

Shared by Sluice's worker (:func:`app.worker.wiring.build_worker`, started by ``sluice worker``) and
the bench's bare Faust chain (:mod:`bench.chain`), so that chain measures Faust with exactly the
settings the pipeline runs with.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import faust

from app.consumer import TRANSPORT_SCHEME
from app.rocks import STORE_URL
from app.settings import Settings

T = TypeVar("T")


def create_app(settings: Settings) -> faust.App:
    """Sluice's Faust app, configured from ``settings``."""
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
        # stop signal no agent starts a new event and the ones in flight finish (app.worker.wiring.Drain);
        # everything unacked is redelivered and absorbed by the idempotency tables.
        stream_wait_empty=False,
        broker_session_timeout=settings.worker_session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, settings.worker_session_timeout_seconds / 3),
    )


def run_worker(
    app: faust.App,
    settings: Settings,
    loglevel: str,
    worker_class: type[faust.Worker] = faust.Worker,
) -> None:
    """Run ``app`` in this process until a stop signal, the way ``sluice worker`` does."""
    from app.telemetry import logging_config

    if settings.worker_event_loop == "uvloop":
        # uvloop's event loop (libuv, in C) costs less per wake-up than asyncio's own, and a stage
        # worker wakes up for every fetch, send and ack (docs/performance.md).
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    worker = worker_class(
        app,
        loglevel=loglevel.lower(),
        quiet=True,
        # Keep sys.stderr the real stderr: our log handler writes there, and mode's redirect would
        # feed it back into logging, where the records were dropped.
        redirect_stdouts=False,
        logging_config=logging_config(loglevel, settings.log_format == "json"),
    )
    # Faust's terminal spinner sets the root logger to DEBUG (whatever the level asked for), so
    # every debug call in aiokafka and Faust built a log record: 8-13 % of the worker's CPU and
    # seconds of p99 latency (docs/performance.md).
    worker.spinner = None
    worker.execute_from_commandline()


async def take_batches(
    stream: faust.StreamT[bytes], limit: int, stamp: Callable[[], T]
) -> AsyncIterator[tuple[T, list[faust.EventT]]]:
    """The records of ``stream`` in batches, in order and unacked (acking them is the caller's).

    A batch is what is already fetched, up to ``limit`` records: a lone record is not held back
    waiting for company, the batch ends as soon as nothing more is buffered. ``stamp()`` is called
    as each batch's first record is taken, and its value comes with the batch (a stage notes the
    rebalance count there, to tell whether one happened while the batch was taken)."""
    buffered = getattr(getattr(stream, "channel", None), "queue", None)
    batch: list[faust.EventT] = []
    stamped: Any = None
    async for record in cast(Any, stream).noack().events():
        if not batch:
            stamped = stamp()
        batch.append(record)
        if buffered is not None and not buffered.empty() and len(batch) < limit:
            continue
        records, batch = batch, []
        yield stamped, records
