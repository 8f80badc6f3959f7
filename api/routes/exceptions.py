"""/v1/exceptions: report exceptions (one, or a batch) and read them back, scoped to the caller's tenant.

Writes go to Kafka and answer 202 only after the broker acknowledged them (``api.producer``); reads go
to the workers' tables over HTTP (``api.reader``). The ingestion logic itself is ``api.ingest`` (pure)
and ``api.idempotency`` (Idempotency-Key). A tenant with ``[limits]`` is charged a token per report
(``api.limits``) before anything is produced: a request short of tokens is refused whole with 429,
so nothing of it is accepted; a replay of an accepted request is answered without a charge.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import ValidationError

from api import ingest
from api.deps import (
    IdempotencyDep,
    IdempotencyKeyDep,
    IngestCaller,
    IngestLimitsDep,
    ProducerDep,
    ReaderDep,
    SettingsDep,
    ViewerCaller,
)
from api.errors import RETRY_AFTER_SECONDS, ApiProblem, describe, field_errors, unavailable
from api.idempotency import Claim, batch_exception_id
from api.limits import IngestLimiter
from api.paging import CursorQuery
from api.producer import SendFailure
from api.reader import ExceptionReader, WorkerRefused, WorkerUnavailable, refused
from app.telemetry import annotate, metrics
from app.topics import TopicNames
from schemas.api import (
    BatchCreate,
    BatchItemResult,
    BatchResult,
    EventPublic,
    ExceptionCreate,
    ExceptionCreated,
    ExceptionListPublic,
    ExceptionPublic,
    FieldError,
    Problem,
)
from schemas.events import Severity, Stage, utcnow
from schemas.state import ExceptionRecord, ExceptionStatus

router = APIRouter(prefix="/v1/exceptions", tags=["exceptions"])

_DESCRIPTIONS = {
    400: "A header is malformed or not supported here (the detail names it).",
    401: "X-API-Key is missing or not a valid key.",
    404: "The tenant has no exception with this id (a closed one is deleted after "
    "SLUICE_EXCEPTION_RETENTION_SECONDS without events).",
    409: "A request with the same Idempotency-Key is still in flight.",
    413: "The request body (or the event made of it) is too large.",
    422: "The request is invalid; `errors` names each invalid field and why.",
    429: "The tenant reports faster than its [limits] allow (nothing of the request was "
    "accepted), or this client address had too many failed authentications; retry after "
    "Retry-After seconds.",
    503: "Kafka or the workers cannot be reached; retry after Retry-After seconds.",
}


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Problem, "description": _DESCRIPTIONS[code]} for code in codes}


ExceptionIdPath = Annotated[
    str,
    Path(min_length=1, max_length=128, description="The id answered by POST /v1/exceptions."),
]

_CREATE_DESCRIPTION = f"""
Report one exception. The tenant is the tenant of the `X-API-Key`; the body never names it.

The answer is **202 Accepted** once Kafka has acknowledged the event (acks=all), with `Location:
/v1/exceptions/{{exception_id}}` where the exception's state can be read (it may take a moment for
the workers to show it). When Kafka cannot be reached or does not acknowledge in time the answer is
**503** with `Retry-After`; a 503 never means the report was accepted, but the report may still reach
Kafka later, so retry it with an `Idempotency-Key`.

**Idempotency-Key** (IETF httpapi draft): a retry carrying the same key and the same body answers the
same 202 (same exception id, `Idempotent-Replayed: true`) and never creates a second exception. The
same key with a different body answers 422; a retry while the first request is still in flight answers
409. Keys are scoped to the tenant and expire between 1 and 2 times SLUICE_IDEMPOTENCY_KEY_TTL_SECONDS
(default 24 h) after their first use. Retry-After on a 503 is {RETRY_AFTER_SECONDS} seconds.

**Limits**: a tenant with `[limits]` in its configuration may report `ingest_per_second` exceptions a
second, `ingest_burst` at once, per API process. Past that the answer is **429** with `Retry-After`
(whole seconds until the report would be accepted) and nothing is accepted; a replay of an accepted
report (same Idempotency-Key and body) is answered as usual and not counted.
"""


@router.post(
    "",
    status_code=202,
    summary="Report an exception",
    description=_CREATE_DESCRIPTION,
    response_description="Accepted: the event is on Kafka.",
    responses={
        202: {
            "headers": {
                "Location": {
                    "description": "/v1/exceptions/{exception_id}",
                    "schema": {"type": "string"},
                },
                "Idempotent-Replayed": {
                    "description": "'true' when this answers an earlier request with the same key.",
                    "schema": {"type": "string"},
                },
            }
        },
        **_problems(400, 401, 409, 413, 422, 429, 503),
    },
)
async def create_exception(
    body: ExceptionCreate,
    caller: IngestCaller,
    settings: SettingsDep,
    producer: ProducerDep,
    reader: ReaderDep,
    idempotency: IdempotencyDep,
    idempotency_key: IdempotencyKeyDep,
    limits: IngestLimitsDep,
    response: Response,
) -> ExceptionCreated:
    tenant = caller.tenant_id
    body_hash = ingest.request_hash(body)
    if idempotency_key is None:
        claim = Claim(ingest.new_exception_id(), replay=False)
    else:
        claim = await idempotency.claim(tenant, idempotency_key, body_hash, reader)
    annotate(tenant_id=tenant, exception_id=claim.exception_id)  # find the trace by its ids
    if not claim.replay:
        # Charged after the claim, so that a replay of an accepted report costs nothing.
        wait = await limits.take(tenant, 1)
        if wait is not None:
            if idempotency_key is not None:
                idempotency.release(tenant, idempotency_key)
            raise _rate_limited(limits, tenant, 1, wait)
        event = ingest.build_event(
            tenant,
            claim.exception_id,
            body,
            body_hash=body_hash,
            idempotency_key=idempotency_key,
            now=utcnow(),
        )
        record = ingest.to_record(event, TopicNames(settings.topic_prefix))
        try:
            [failure] = await producer.send_many([record])
        except BaseException:
            if idempotency_key is not None:
                idempotency.release(tenant, idempotency_key)
            raise
        if idempotency_key is not None:
            if failure is None:
                idempotency.complete(tenant, idempotency_key)
            else:
                idempotency.release(tenant, idempotency_key)
        if failure is not None:
            raise _send_problem(failure, retry_with_key=idempotency_key is not None)
    created = ingest.created(tenant, claim.exception_id)
    response.headers["Location"] = created.status_url
    if claim.replay:
        response.headers["Idempotent-Replayed"] = "true"
    return created


@router.post(
    ":batch",
    summary="Report several exceptions",
    description=(
        "Report up to SLUICE_MAX_BATCH_ITEMS exceptions (default 500) in one request. Items are "
        "validated one by one: an invalid item gets status_code 422 and its `errors`, and does not "
        "stop the others. Valid items are all sent to Kafka, then the acks awaited together; each "
        "gets 202 (accepted, with its exception_id and location) or 503 (not accepted; retry it). "
        "The answer is 200 with a result per item, in input order, whenever the batch itself was "
        "readable.\n\n**Idempotency-Key** works as on POST /v1/exceptions, for the whole batch: a "
        "retry with the same key and the same body answers the same results (the same exception "
        "ids, `Idempotent-Replayed: true`) and creates no second exception; items that were not "
        "accepted the first time (503) are sent again. The same key with a different body answers "
        "422, a retry while the first request is in flight 409. A batch's keys are separate from "
        "the single route's.\n\n"
        "**Limits**: for a tenant with `[limits]`, each item costs one token, invalid ones too. A "
        "batch is accepted or refused whole: when the tenant lacks tokens for all its items the "
        "answer is 429 with `Retry-After` (whole seconds until the whole batch would fit) and no "
        "item is accepted. A batch larger than the tenant's `ingest_burst` could never fit: 422."
    ),
    responses={
        200: {
            "headers": {
                "Idempotent-Replayed": {
                    "description": "'true' when this answers an earlier batch with the same key.",
                    "schema": {"type": "string"},
                },
            }
        },
        **_problems(400, 401, 409, 413, 422, 429),
    },
    response_model_exclude_none=True,
)
async def create_exceptions_batch(
    batch: BatchCreate,
    caller: IngestCaller,
    settings: SettingsDep,
    producer: ProducerDep,
    reader: ReaderDep,
    idempotency: IdempotencyDep,
    idempotency_key: IdempotencyKeyDep,
    limits: IngestLimitsDep,
    response: Response,
) -> BatchResult:
    if len(batch.items) > settings.max_batch_items:
        msg = (
            f"A batch holds at most {settings.max_batch_items} items and this one has "
            f"{len(batch.items)}; split it into smaller batches."
        )
        raise _too_many_items(msg)

    tenant = caller.tenant_id
    limit = limits.limit_of(tenant)
    if limit is not None and len(batch.items) > limit.burst:
        msg = (
            f"Tenant {tenant!r} may report at most {limit.burst} exceptions at once "
            f"([limits] ingest_burst) and this batch has {len(batch.items)}, so it could never be "
            f"accepted; split it into batches of at most {limit.burst}."
        )
        raise _too_many_items(msg)
    annotate(tenant_id=tenant)  # each record's send span carries its exception id
    results: list[BatchItemResult | None] = [None] * len(batch.items)
    valid: list[tuple[int, ExceptionCreate]] = []
    for index, raw in enumerate(batch.items):
        try:
            valid.append((index, ExceptionCreate.model_validate(raw)))
        except ValidationError as exc:
            errors = field_errors(exc.errors())
            results[index] = BatchItemResult(
                index=index,
                status_code=422,
                detail=f"The item is invalid: {describe(errors, whole='(the item)')}.",
                errors=errors,
            )

    claim: Claim | None = None
    batch_hash = ingest.batch_hash(batch.items, dict(valid))
    if idempotency_key is not None:
        claim = await idempotency.claim(tenant, idempotency_key, batch_hash, reader, scope="batch")
    if claim is None or not claim.replay or claim.resend:
        # Charged after the claim, so that the replay of an accepted batch costs nothing.
        wait = await limits.take(tenant, len(batch.items))
        if wait is not None:
            if idempotency_key is not None:
                idempotency.release(tenant, idempotency_key, scope="batch")
            raise _rate_limited(limits, tenant, len(batch.items), wait)
    queued: list[tuple[int, str]] = []
    records = []
    topics = TopicNames(settings.topic_prefix)
    now = utcnow()
    for position, (index, item) in enumerate(valid):
        if idempotency_key is None or claim is None:
            exception_id = ingest.new_exception_id()
        else:
            exception_id = batch_exception_id(
                tenant, idempotency_key, claim.window, None if position == 0 else index
            )
        queued.append((index, exception_id))
        if claim is not None and claim.replay and not claim.resend:
            continue  # this process sent it all: answer the first results again
        event = ingest.build_event(
            tenant,
            exception_id,
            item,
            body_hash=batch_hash if claim is not None else ingest.request_hash(item),
            idempotency_key=idempotency_key,
            now=now,
        )
        records.append(ingest.to_record(event, topics))

    try:
        failures: list[SendFailure | None] = (
            await producer.send_many(records) if records else [None] * len(queued)
        )
    except BaseException:
        if idempotency_key is not None:
            idempotency.release(tenant, idempotency_key, scope="batch")
        raise
    if idempotency_key is not None:
        if any(f is not None for f in failures):
            idempotency.release(tenant, idempotency_key, scope="batch")  # retry sends them again
        else:
            idempotency.complete(tenant, idempotency_key, scope="batch")
    if claim is not None and claim.replay:
        response.headers["Idempotent-Replayed"] = "true"
    for (index, exception_id), failure in zip(queued, failures, strict=True):
        if failure is None:
            created = ingest.created(tenant, exception_id)
            results[index] = BatchItemResult(
                index=index,
                status_code=202,
                exception_id=exception_id,
                event_id=created.event_id,
                location=created.status_url,
            )
        else:
            results[index] = BatchItemResult(
                index=index, status_code=failure.status, detail=failure.detail
            )
    done = [r for r in results if r is not None]
    accepted = sum(1 for r in done if r.status_code == 202)
    if any(r.status_code == 503 for r in done):
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return BatchResult(results=done, accepted=accepted, rejected=len(done) - accepted)


@router.get(
    "",
    summary="List exceptions",
    description=(
        "The tenant's exceptions, newest first as the workers order them, filtered by status, "
        "severity and stage. Pass `next_cursor` back as `cursor` for the next page."
    ),
    responses=_problems(401, 422, 503),
)
async def list_exceptions(
    caller: ViewerCaller,
    reader: ReaderDep,
    status: ExceptionStatus | None = None,
    severity: Severity | None = None,
    stage: Stage | None = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Page size.")] = 50,
    cursor: CursorQuery = None,
) -> ExceptionListPublic:
    try:
        return await reader.list_exceptions(
            caller.tenant_id,
            status=status,
            severity=severity.value if severity else None,
            stage=stage.value if stage else None,
            limit=limit,
            cursor=cursor,
        )
    except WorkerUnavailable as exc:
        raise _read_unavailable() from exc
    except WorkerRefused as exc:
        raise refused(exc) from exc


@router.get(
    "/{exception_id}",
    summary="Read an exception's state",
    responses=_problems(401, 404, 422, 503),
)
async def read_exception(
    exception_id: ExceptionIdPath, caller: ViewerCaller, reader: ReaderDep
) -> ExceptionPublic:
    return (await read_record(reader, caller.tenant_id, exception_id)).state


@router.get(
    "/{exception_id}/events",
    summary="Read an exception's history",
    description="Every event of the exception, in order (the chains of its ingestions, by sequence).",
    responses=_problems(401, 404, 422, 503),
)
async def read_exception_events(
    exception_id: ExceptionIdPath, caller: ViewerCaller, reader: ReaderDep
) -> list[EventPublic]:
    return (await read_record(reader, caller.tenant_id, exception_id)).history


async def read_record(reader: ExceptionReader, tenant: str, exception_id: str) -> ExceptionRecord:
    annotate(tenant_id=tenant, exception_id=exception_id)
    try:
        record = await reader.get_exception(tenant, exception_id)
    except WorkerUnavailable as exc:
        raise _read_unavailable() from exc
    if record is None:
        raise ApiProblem(
            404,
            f"Your tenant has no exception {exception_id!r}. Check the id; an exception accepted "
            "a moment ago can take a few seconds to become readable.",
        )
    return record


def _too_many_items(msg: str) -> ApiProblem:
    """A 422 naming ``items``: the batch is longer than it may ever be."""
    return ApiProblem(
        422,
        msg,
        errors=[FieldError(loc=["body", "items"], field="items", msg=msg, type="too_long")],
    )


def _read_unavailable() -> ApiProblem:
    return unavailable(
        "The exception store cannot be read right now: no Sluice worker answered. "
        f"Try again in {RETRY_AFTER_SECONDS} seconds."
    )


def _rate_limited(limits: IngestLimiter, tenant: str, reports: int, wait: int) -> ApiProblem:
    """429 for a request of ``reports`` the tenant's bucket has no tokens for (counted)."""
    metrics.rate_limited(tenant)
    limit = limits.limit_of(tenant)
    allowed = (
        f"{limit.ingest_per_second:g} exceptions a second, {limit.burst} at once"
        if limit is not None
        else "fewer exceptions"
    )
    what = "this report" if reports == 1 else f"this batch of {reports} (each item counts)"
    return ApiProblem(
        429,
        f"Tenant {tenant!r} may report {allowed} to this API process, and {what} would go over "
        f"it; nothing of it was accepted. Send it again in {wait} seconds, or slow down.",
        headers={"Retry-After": str(wait)},
    )


def _send_problem(failure: SendFailure, *, retry_with_key: bool) -> ApiProblem:
    if failure.status != 503:
        return ApiProblem(failure.status, failure.detail)
    again = (
        "with the same Idempotency-Key"
        if retry_with_key
        else "(an Idempotency-Key makes that safe)"
    )
    return unavailable(f"{failure.detail} Retry in {RETRY_AFTER_SECONDS} seconds {again}.")
