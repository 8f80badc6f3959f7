"""Liveness and readiness of the API process, for orchestrators and load balancers.

``/healthz`` answers 200 while the process serves HTTP at all. ``/readyz`` answers 200 only while the
API's Kafka producer is connected and the broker answers, since without Kafka no report can be accepted;
otherwise 503 with the reason. ``/metrics`` serves the process's Prometheus metrics (text
exposition format). None of them needs an API key.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from api.deps import ProducerDep
from api.errors import RETRY_AFTER_SECONDS
from app.telemetry import render_metrics
from schemas.api import Liveness, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> Liveness:
    return Liveness()


@router.get(
    "/readyz",
    summary="Readiness: connected to Kafka",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Kafka is not reachable."}},
)
async def readyz(producer: ProducerDep) -> JSONResponse:
    problem = await producer.probe()
    if problem is None:
        body = Readiness(status="ready", kafka="connected")
        return JSONResponse(body.model_dump(mode="json", exclude_none=True))
    body = Readiness(status="not_ready", kafka="disconnected", detail=problem)
    return JSONResponse(
        body.model_dump(mode="json"),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def prometheus_metrics() -> Response:
    body, content_type = render_metrics()
    return Response(content=body, media_type=content_type)
