"""The pure core of ingestion: a validated report becomes an ExceptionIngested event and a Kafka record.

No I/O here: the routes call these functions, then hand the record to the producer. Ids are derived so
that a retry can reproduce them: the event id is a uuid5 of tenant and exception id, and with an
Idempotency-Key the exception id itself is derived from the key (see ``api.idempotency``), so a retried
request yields the very same event and the pipeline's intake drops the copy.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from api.producer import OutgoingRecord
from app.topics import TopicNames
from schemas.api import ExceptionCreate, ExceptionCreated
from schemas.codec import encode
from schemas.events import SLUICE_NAMESPACE, ExceptionIngested, IngestedPayload


def request_hash(body: ExceptionCreate) -> str:
    """sha256 of the canonical JSON of the validated body: equal for equal reports, whatever the
    key order or spacing the client sent."""
    canonical = orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def batch_hash(raw_items: Sequence[Any], valid: Mapping[int, ExceptionCreate]) -> str:
    """sha256 over a batch: each valid item's :func:`request_hash`, each invalid item's canonical
    JSON as sent (Python's encoder: an invalid item may hold what orjson refuses)."""
    digest = hashlib.sha256()
    for index, raw in enumerate(raw_items):
        item = valid.get(index)
        if item is not None:
            part = request_hash(item)
        else:
            text = json.dumps(raw, sort_keys=True, ensure_ascii=True, default=str)
            part = "invalid:" + hashlib.sha256(text.encode()).hexdigest()
        digest.update(part.encode() + b"\n")
    return digest.hexdigest()


def new_exception_id() -> str:
    return str(uuid.uuid4())


def ingested_event_id(tenant_id: str, exception_id: str) -> uuid.UUID:
    return uuid.uuid5(SLUICE_NAMESPACE, f"{tenant_id}:{exception_id}:ingested")


def location(exception_id: str) -> str:
    return f"/v1/exceptions/{exception_id}"


def build_event(
    tenant_id: str,
    exception_id: str,
    body: ExceptionCreate,
    *,
    body_hash: str,
    idempotency_key: str | None,
    now: datetime,
) -> ExceptionIngested:
    """The first event of an exception's chain: it is its own correlation id and has no cause."""
    event_id = ingested_event_id(tenant_id, exception_id)
    return ExceptionIngested(
        event_id=event_id,
        tenant_id=tenant_id,
        exception_id=exception_id,
        sequence=1,
        occurred_at=now,
        causation_id=None,
        correlation_id=event_id,
        payload=IngestedPayload(
            report=body.to_report(),
            request_hash=body_hash,
            idempotency_key=idempotency_key,
        ),
    )


def to_record(event: ExceptionIngested, topics: TopicNames) -> OutgoingRecord:
    """The Kafka record: keyed by exception id (per-exception order), with the CloudEvents Kafka
    protocol binding's ``ce_*`` headers in binary mode (the value is the event's JSON)."""
    ce_time = event.occurred_at.isoformat().replace("+00:00", "Z")
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", str(event.event_id).encode()),
        ("ce_source", f"/sluice/api/{event.tenant_id}".encode()),
        ("ce_type", event.event_type.encode()),
        ("ce_time", ce_time.encode()),
        ("content-type", b"application/json"),
    ]
    return OutgoingRecord(
        topic=topics.ingested,
        key=event.exception_id.encode(),
        value=encode(event),
        headers=headers,
    )


def created(tenant_id: str, exception_id: str) -> ExceptionCreated:
    return ExceptionCreated(
        exception_id=exception_id,
        event_id=ingested_event_id(tenant_id, exception_id),
        status_url=location(exception_id),
    )
