"""Operator endpoints: dead letters, redrive, discard, and pipeline statistics.

Dead letters live in the workers' quarantine table; the API reads them through any worker (which
gathers from the whole group) and never shows another tenant's entries. Redrive and discard are
requests, not direct edits: the API produces an ExceptionRedriveRequested / ExceptionDiscardRequested
event onto the quarantining stage's own input topic, keyed like the dead-lettered record, so the stage
handles it in order with everything else and records the outcome in the exception's history.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import OperatorCaller, ProducerDep, SettingsDep, ViewerCaller
from api.errors import ApiProblem
from api.producer import EventSender, OutgoingRecord
from api.reader import worker_get
from app.settings import Settings
from app.topics import STAGES, TopicNames
from schemas.codec import encode
from schemas.config import Caller
from schemas.events import (
    Event,
    EventBase,
    ExceptionDiscardRequested,
    ExceptionRedriveRequested,
    Frozen,
    OperatorRequestPayload,
)

router = APIRouter(tags=["operations"])

StageName = Literal["intake", "group", "triage", "policy", "playbook", "tool", "projection"]
ErrorClass = Literal["poison", "transient", "permanent", "in_doubt"]


class DeadLetterPublic(BaseModel):
    """A quarantined exception at one stage: the dead-lettered record and what is parked behind it."""

    model_config = ConfigDict(extra="allow")

    stage: str
    exception_id: str
    tenant_id: str | None
    since: str | None
    head: dict[str, Any] = Field(
        description="The dead-lettered record: error class, kind, message, attempts, failure "
        "times, original topic/partition/offset; `value` (base64 of the original bytes) on the "
        "single-entry read."
    )
    parked: list[dict[str, Any]]
    parked_count: int


class DeadLetterListPublic(BaseModel):
    items: list[DeadLetterPublic]


class OperatorRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: StageName | None = Field(
        default=None, description="The quarantining stage; needed only if several hold it."
    )
    reason: str | None = Field(default=None, max_length=2000)


class DiscardRequest(OperatorRequest):
    reason: str = Field(min_length=1, max_length=2000, description="Why it is discarded.")


class OperatorRequestAccepted(BaseModel):
    request_event_id: uuid.UUID
    exception_id: str
    stage: str
    action: Literal["redrive", "discard"]
    status_url: str


async def _entries(
    settings: Settings, tenant: str, **filters: str | None
) -> list[DeadLetterPublic]:
    params = {"tenant": tenant, **{k: v for k, v in filters.items() if v is not None}}
    data = await worker_get(settings, "/sluice/dlq", params)
    return [
        DeadLetterPublic.model_validate(i) for i in data["items"] if i.get("tenant_id") == tenant
    ]


@router.get(
    "/v1/dlq",
    response_model=DeadLetterListPublic,
    summary="List dead letters",
    description="The caller's quarantined exceptions, oldest first, filtered by stage, exception "
    "and error class.",
)
async def list_dead_letters(
    settings: SettingsDep,
    caller: ViewerCaller,
    stage: Annotated[StageName | None, Query()] = None,
    exception_id: Annotated[str | None, Query(max_length=128)] = None,
    error_class: Annotated[ErrorClass | None, Query()] = None,
) -> DeadLetterListPublic:
    items = await _entries(
        settings, caller.tenant_id, stage=stage, exception_id=exception_id, error_class=error_class
    )
    return DeadLetterListPublic(items=items)


@router.get(
    "/v1/dlq/{stage}/{exception_id}",
    response_model=DeadLetterPublic,
    summary="Inspect one dead letter",
    description="The dead-lettered record with its original bytes (base64) and the parked ones.",
)
async def read_dead_letter(
    settings: SettingsDep,
    caller: ViewerCaller,
    stage: Annotated[StageName, Path()],
    exception_id: Annotated[str, Path(max_length=128)],
) -> DeadLetterPublic:
    tenant = caller.tenant_id
    params = {"tenant": tenant, "stage": stage, "exception_id": exception_id, "raw": "1"}
    data = await worker_get(settings, "/sluice/dlq", params)
    items = [i for i in data["items"] if i.get("tenant_id") == tenant]
    if not items:
        raise ApiProblem(404, f"Exception {exception_id} is not quarantined at stage {stage}.")
    return DeadLetterPublic.model_validate(items[0])


E = TypeVar("E", bound=EventBase)


def operator_event(cls: type[E], tenant: str, exception_id: str, payload: Frozen) -> E:
    """An operator's request event: the first of a chain of its own (new id and correlation)."""
    event_id = uuid.uuid4()
    return cls.model_validate(
        {
            "event_id": event_id,
            "tenant_id": tenant,
            "exception_id": exception_id,
            "sequence": 1,
            "occurred_at": datetime.now(UTC),
            "causation_id": None,
            "correlation_id": event_id,
            "payload": payload,
        }
    )


async def send_operator_event(producer: EventSender, topic: str, key: bytes, event: Event) -> None:
    """Write ``event`` to ``topic`` once Kafka acknowledged it (503 with Retry-After if not)."""
    record = OutgoingRecord(
        topic=topic,
        key=key,
        value=encode(event),
        headers=[("ce_type", event.event_type.encode()), ("content-type", b"application/json")],
    )
    (failure,) = await producer.send_many([record])
    if failure is not None:
        raise ApiProblem(failure.status, failure.detail, headers={"Retry-After": "5"})


async def _request(
    settings: Settings,
    producer: ProducerDep,
    caller: Caller,
    exception_id: str,
    body: OperatorRequest,
    action: Literal["redrive", "discard"],
) -> OperatorRequestAccepted:
    tenant = caller.tenant_id
    entries = await _entries(settings, tenant, exception_id=exception_id, stage=body.stage)
    if not entries:
        where = f" at stage {body.stage}" if body.stage else ""
        raise ApiProblem(404, f"Exception {exception_id} is not quarantined{where}.")
    if len(entries) > 1:
        stages = ", ".join(sorted(e.stage for e in entries))
        raise ApiProblem(
            409, f"Exception {exception_id} is quarantined at several stages ({stages}); name one."
        )
    entry = entries[0]
    # Who asked is the key's name (unique within the tenant), never what the body claims.
    payload = OperatorRequestPayload(
        stage=entry.stage, requested_by=caller.key_name, role=caller.role, reason=body.reason
    )
    event: ExceptionRedriveRequested | ExceptionDiscardRequested = (
        operator_event(ExceptionRedriveRequested, tenant, exception_id, payload)
        if action == "redrive"
        else operator_event(ExceptionDiscardRequested, tenant, exception_id, payload)
    )
    # Keyed like the dead-lettered record, so the request lands in its partition, behind it.
    key = entry.head.get("key")
    topic = TopicNames(settings.topic_prefix).input_of(entry.stage)
    await send_operator_event(producer, topic, _unb64(key) if key else exception_id.encode(), event)
    event_id = event.event_id
    return OperatorRequestAccepted(
        request_event_id=event_id,
        exception_id=exception_id,
        stage=entry.stage,
        action=action,
        status_url=f"/v1/exceptions/{exception_id}",
    )


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


@router.post(
    "/v1/exceptions/{exception_id}/redrive",
    response_model=OperatorRequestAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Redrive a quarantined exception",
    description="Processes the dead-lettered event again, then the parked ones in their original "
    "order, and lifts the quarantine. If it fails again it is dead-lettered again (attempts "
    "counted on). A tool step that was in doubt is called again with the same Idempotency-Key.",
)
async def redrive(
    settings: SettingsDep,
    producer: ProducerDep,
    caller: OperatorCaller,
    exception_id: Annotated[str, Path(max_length=128)],
    body: OperatorRequest | None = None,
) -> OperatorRequestAccepted:
    return await _request(
        settings, producer, caller, exception_id, body or OperatorRequest(), "redrive"
    )


@router.post(
    "/v1/exceptions/{exception_id}/discard",
    response_model=OperatorRequestAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Discard a dead letter",
    description="Drops the dead-lettered event (with a reason, kept in the history), then "
    "processes the parked ones in order and lifts the quarantine.",
)
async def discard(
    settings: SettingsDep,
    producer: ProducerDep,
    caller: OperatorCaller,
    exception_id: Annotated[str, Path(max_length=128)],
    body: DiscardRequest,
) -> OperatorRequestAccepted:
    return await _request(settings, producer, caller, exception_id, body, "discard")


class StageStatsPublic(BaseModel):
    processed: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    parked: int = 0
    redriven: int = 0
    discarded: int = 0
    dlq_depth: int = 0
    parked_now: int = 0
    consumer_lag: int = 0


# StageStatsPublic's fields that sum the workers' StageStats counters (the rest are "now" figures)
_COUNTERS = (
    "processed",
    "duplicates",
    "retried",
    "dead_lettered",
    "parked",
    "redriven",
    "discarded",
)


class WorkerPublic(BaseModel):
    worker: str
    ready: bool
    assigned_partitions: int
    last_event_at: float | None


class PipelineStatsPublic(BaseModel):
    stages: dict[str, StageStatsPublic]
    workers: list[WorkerPublic]


@router.get(
    "/v1/pipeline/stats",
    response_model=PipelineStatsPublic,
    summary="Pipeline statistics",
    description="Per stage, summed over the workers since they started: processed, duplicates "
    "dropped, retried, dead-lettered, parked, redriven, discarded; now: DLQ depth, parked events, "
    "consumer lag. Per worker: readiness and assigned partitions. Counts cover all tenants.",
)
async def pipeline_stats(settings: SettingsDep, caller: ViewerCaller) -> PipelineStatsPublic:
    data = await worker_get(settings, "/sluice/stats", {})
    topics = TopicNames(settings.topic_prefix)
    stages = {s: StageStatsPublic() for s in STAGES}
    workers = []
    for w in data["workers"]:
        last = None
        for name, counters in w["stages"].items():
            agg = stages.setdefault(name, StageStatsPublic())
            for field in _COUNTERS:
                setattr(agg, field, getattr(agg, field) + int(counters.get(field, 0)))
            if counters.get("last_event_at"):
                last = max(last or 0.0, float(counters["last_event_at"]))
        for name, depth in w["dlq_depth"].items():
            stages.setdefault(name, StageStatsPublic()).dlq_depth += int(depth)
        for name, count in w["parked_now"].items():
            stages.setdefault(name, StageStatsPublic()).parked_now += int(count)
        for stage in STAGES:
            lag = w["consumer_lag"].get(topics.input_of(stage), 0)
            if stage != "projection":
                stages[stage].consumer_lag += int(lag)
        workers.append(
            WorkerPublic(
                worker=w["worker"],
                ready=w["ready"],
                assigned_partitions=w["assigned_partitions"],
                last_event_at=last,
            )
        )
    return PipelineStatsPublic(stages=stages, workers=workers)
