"""A minimal agent: counts events per exception id into a RocksDB table and serves the count.

It exercises the whole foundation (topic, agent, rocksdict-backed changelog table, table-routed web
read) until the stage agents arrive.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.web import Request, Response, View

from app.faust_app import app, topics

ingested_topic = app.topic(
    topics.ingested,
    key_type=bytes,
    value_type=bytes,
    value_serializer="raw",
    partitions=app.conf.topic_partitions,
    internal=True,
)

ingested_counts = app.Table(
    "ingested-counts", default=int, key_type=bytes, value_type=int, options={"driver": "rocksdict"}
)


@app.agent(ingested_topic, concurrency=1)
async def count_ingested(stream: faust.StreamT[bytes]) -> None:
    async for event in stream.events():
        ingested_counts[event.key] += 1


@app.page("/tally/{exception_id}/")
class TallyView(View):
    @app.table_route(table=ingested_counts, match_info="exception_id")  # type: ignore[arg-type]
    async def get(self, request: Request, exception_id: str) -> Response:
        count: Any = ingested_counts[exception_id.encode()]
        return self.json({"exception_id": exception_id, "count": count})
