"""Phase a2 of ``sluice bench``: Faust's own ceiling, the relay's hops as a bare chain of agents.

Each hop is a Faust agent that takes its records the way Sluice's stages do
(:func:`app.worker.faust_app.take_batches`, up to ``SLUICE_WORKER_BATCH_MAX``), sends them unchanged to
the next topic the way the pipeline sends (``force=True``, acks from every replica, every ack
awaited) and then acks them. Nothing else: no decoding, no idempotency tables, no ledger, no
projection, no spans. The app is :func:`app.worker.faust_app.create_app`, so its consumer, producer
and broker settings are the ones Sluice's worker runs with. What this chain moves is therefore
the most any design of one Faust agent per stage can move here; the pipeline's figure against it
is what Sluice's own work costs.

Started by the bench as ``python -m bench.chain`` with ``SLUICE_BENCH_HOPS`` (a JSON list of
``[source, destination]`` topic names, which must exist) and the usual ``SLUICE_*`` and
``KAFKA_BOOTSTRAP_SERVERS`` environment. It prints ``ready`` once it holds every source partition
and runs until SIGTERM.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from app.settings import get_settings
from app.worker.faust_app import create_app, run_worker, take_batches

settings = get_settings()
app = create_app(settings)
hops: list[tuple[str, str]] = [
    (src, dst) for src, dst in json.loads(os.environ.get("SLUICE_BENCH_HOPS", "[]"))
]


def _topic(name: str) -> faust.TopicT:
    return app.topic(name, key_type=bytes, value_type=bytes, value_serializer="raw")


def forward_to(destination: faust.TopicT) -> Callable[[faust.StreamT[bytes]], Awaitable[None]]:
    """An agent that sends each batch on to ``destination``, awaits every ack, then acks it."""

    async def forward(stream: faust.StreamT[bytes]) -> None:
        async for _, records in take_batches(stream, settings.worker_batch_max, lambda: None):
            sent = [await destination.send(key=r.key, value=r.value, force=True) for r in records]
            for fut in sent:
                await fut
            for record in records:
                record.ack()

    return forward


for number, (source, destination) in enumerate(hops):
    app.agent(_topic(source), name=f"hop{number}")(forward_to(_topic(destination)))


@app.on_rebalance_complete.connect
async def announce_ready(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    """Say ``ready`` (the bench waits for it) once every hop's source partitions are assigned."""
    if {source for source, _ in hops} <= {tp.topic for tp in app.consumer.assignment()}:
        sys.stdout.write("ready\n")
        sys.stdout.flush()


if __name__ == "__main__":
    run_worker(app, settings, os.environ.get("SLUICE_LOG_LEVEL", "warning"))
