"""The HTTP API process: ingest and query endpoints in front of Kafka and the workers' tables."""

from __future__ import annotations

from fastapi import FastAPI

from api.routes import health


def create_api() -> FastAPI:
    api = FastAPI(
        title="Sluice",
        version="0.1.0",
        description="Ingest operational exceptions and follow them through the Sluice pipeline.",
    )
    api.include_router(health.router)
    return api


app = create_api()
