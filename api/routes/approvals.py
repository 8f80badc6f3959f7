"""Approvals: what waits for a person, and the person's decision.

A stage that holds an exception for approval keeps it in the workers' ``approvals`` table, which
GET /v1/approvals reads (it never scans the exceptions). A decision is not an edit: the API produces
an ``ExceptionApprovalSubmitted`` onto the holding stage's own input topic, keyed by the exception,
so the stage takes decisions in the log's order. The first one wins; a later one is refused there,
and the API, which waits for the stage's answer in the exception's history, tells its caller with a
409. If the stage does not answer in time (a worker restarting), the decision is still in the log
and is carried out when it does: the API says so with a 202.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.deps import OperatorCaller, ProducerDep, ReaderDep, SettingsDep, ViewerCaller
from api.errors import ApiProblem
from api.paging import CursorQuery
from api.reader import WorkerUnavailable, worker_get
from api.routes.exceptions import read_record
from api.routes.operations import operator_event, send_operator_event
from app.topics import TopicNames
from schemas.config import Caller
from schemas.events import (
    ApprovalSubmittedPayload,
    ExceptionApprovalRefused,
    ExceptionApprovalSubmitted,
    ExceptionApproved,
    ExceptionRejected,
    PlannedStep,
)
from schemas.state import ExceptionRecord

router = APIRouter(tags=["approvals"])

# How long a decision waits for the holding stage's answer before it is answered 202.
DECISION_WAIT_SECONDS = 10.0
# How long a decision waits for the hold of an exception that policy has just held to be recorded.
HOLD_WAIT_SECONDS = 5.0
_RESULTS = {
    ExceptionApproved.__name__: "approved",
    ExceptionRejected.__name__: "rejected",
    ExceptionApprovalRefused.__name__: "refused",
}


class ApprovalPublic(BaseModel):
    """A held exception: what would run, why it waits, and until when."""

    exception_id: str
    stage: Literal["playbook", "tool"] = Field(
        description="playbook: policy held every action; tool: a planned step needs approval."
    )
    policy_id: str = Field(description="The policy rule that asked for approval.")
    reason: str
    severity: str | None
    category: str | None
    playbook_id: str
    steps: list[PlannedStep] = Field(description="The steps that run once approved (rendered).")
    requested_at: AwareDatetime
    expires_at: AwareDatetime = Field(description="Unanswered by then, it ends approval_expired.")


class ApprovalListPublic(BaseModel):
    items: list[ApprovalPublic]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null: done.")


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=1000, description="Why; kept in the history.")


class DecisionPublic(BaseModel):
    exception_id: str
    action: Literal["approve", "reject"]
    outcome: Literal["approved", "rejected", "pending"] = Field(
        description="pending (HTTP 202): the decision is in the log and the holding stage has not "
        "answered yet; it is carried out in order, or refused if another decision came first."
    )
    status: str = Field(description="The exception's status as last read.")
    request_event_id: uuid.UUID
    decided_by: str
    status_url: str


@router.get(
    "/v1/approvals",
    response_model=ApprovalListPublic,
    summary="List pending approvals",
    description="The caller's exceptions waiting for a person's decision, oldest first.",
)
async def list_approvals(
    settings: SettingsDep,
    caller: ViewerCaller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: CursorQuery = None,
) -> ApprovalListPublic:
    tenant = caller.tenant_id
    params: dict[str, str | int] = {"tenant": tenant, "limit": limit}
    if cursor:
        params["cursor"] = cursor
    data = await worker_get(settings, "/sluice/approvals", params)
    items = [ApprovalPublic.model_validate(i) for i in data["items"] if i["tenant_id"] == tenant]
    return ApprovalListPublic(items=items, next_cursor=data.get("next_cursor"))


_DECISION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The holding stage carried the decision out."},
    202: {"description": "The decision is durable in the log; the stage has not answered yet."},
    404: {"description": "No such exception for the caller's tenant."},
    409: {"description": "The exception is not awaiting approval (or another decision won)."},
}


@router.post(
    "/v1/exceptions/{exception_id}/approve",
    response_model=DecisionPublic,
    responses=_DECISION_RESPONSES,
    summary="Approve a held exception",
    description="The held work runs where it was held: the playbook's plan and its tool steps, "
    "or the held plan's steps (with their usual idempotency keys).",
)
async def approve(
    settings: SettingsDep,
    producer: ProducerDep,
    reader: ReaderDep,
    caller: OperatorCaller,
    exception_id: Annotated[str, Path(max_length=128)],
    body: DecisionRequest,
    response: Response,
) -> DecisionPublic:
    return await _decide(
        settings, producer, reader, caller, exception_id, body, "approve", response
    )


@router.post(
    "/v1/exceptions/{exception_id}/reject",
    response_model=DecisionPublic,
    responses=_DECISION_RESPONSES,
    summary="Reject a held exception",
    description="Nothing more runs; the exception ends with status rejected.",
)
async def reject(
    settings: SettingsDep,
    producer: ProducerDep,
    reader: ReaderDep,
    caller: OperatorCaller,
    exception_id: Annotated[str, Path(max_length=128)],
    body: DecisionRequest,
    response: Response,
) -> DecisionPublic:
    return await _decide(settings, producer, reader, caller, exception_id, body, "reject", response)


async def _decide(
    settings: SettingsDep,
    producer: ProducerDep,
    reader: ReaderDep,
    caller: Caller,
    exception_id: str,
    body: DecisionRequest,
    action: Literal["approve", "reject"],
    response: Response,
) -> DecisionPublic:
    tenant = caller.tenant_id
    record = await _held(reader, tenant, exception_id)
    approval = record.state.approval
    if record.state.status != "awaiting_approval" or not approval or approval.get("decision"):
        raise ApiProblem(
            409,
            f"Exception {exception_id} is {record.state.status}, not awaiting approval; "
            "there is nothing to decide.",
        )
    by = caller.key_name  # the actor the history and the audit trail name
    payload = ApprovalSubmittedPayload(
        action=action,
        stage=approval["stage"],
        requested_by=by,
        role=caller.role,
        reason=body.reason,
    )
    submission = operator_event(ExceptionApprovalSubmitted, tenant, exception_id, payload)
    event_id = submission.event_id
    topic = TopicNames(settings.topic_prefix).input_of(approval["stage"])
    await send_operator_event(producer, topic, exception_id.encode(), submission)
    outcome, latest = await _answer(reader, tenant, exception_id, event_id)
    if outcome == "refused":
        raise ApiProblem(
            409,
            f"Exception {exception_id} is {latest.state.status if latest else 'no longer held'}: "
            "another decision was taken first, so this one was not applied.",
        )
    response.status_code = status.HTTP_202_ACCEPTED if outcome == "pending" else status.HTTP_200_OK
    if outcome == "pending":
        response.headers["Location"] = f"/v1/exceptions/{exception_id}"
    return DecisionPublic(
        exception_id=exception_id,
        action=action,
        outcome=outcome,
        status=latest.state.status if latest else record.state.status,
        request_event_id=event_id,
        decided_by=by,
        status_url=f"/v1/exceptions/{exception_id}",
    )


async def _held(reader: ReaderDep, tenant: str, exception_id: str) -> ExceptionRecord:
    """The exception; when policy has just held it, once the holding stage has recorded the hold
    (its ExceptionApprovalRequested follows the decision by a moment)."""
    record = await read_record(reader, tenant, exception_id)
    deadline = time.monotonic() + HOLD_WAIT_SECONDS
    while record.state.status == "awaiting_approval" and not record.state.approval:
        if time.monotonic() >= deadline:
            raise ApiProblem(
                503,
                f"Exception {exception_id} is being held for approval right now; try again in a "
                "moment.",
                headers={"Retry-After": "1"},
            )
        await asyncio.sleep(0.2)
        record = await read_record(reader, tenant, exception_id)
    return record


async def _answer(
    reader: ReaderDep, tenant: str, exception_id: str, request_id: uuid.UUID
) -> tuple[str, ExceptionRecord | None]:
    """What the holding stage made of the decision ``request_id``, from the exception's history:
    approved, rejected, refused, or pending when it has not answered within the wait."""
    deadline = time.monotonic() + DECISION_WAIT_SECONDS
    delay = 0.05
    latest: ExceptionRecord | None = None
    while time.monotonic() < deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
        try:
            latest = await reader.get_exception(tenant, exception_id)
        except WorkerUnavailable:
            continue  # a worker restarting: the decision is in the log either way
        if latest is None:
            continue
        for entry in reversed(latest.history):
            if entry.causation_id == request_id and entry.event_type in _RESULTS:
                return _RESULTS[entry.event_type], latest
    return "pending", latest
