"""The audit trail: who did what to which exception, and why, as the log records it.

Served from the workers' ``audit`` table, which the projection fills from the same operator events
it folds into the histories (app/worker/audit.py), so the two cannot disagree.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, BaseModel, Field

from api.deps import SettingsDep, ViewerCaller
from api.paging import CursorQuery
from api.reader import worker_get

router = APIRouter(tags=["audit"])

Action = Literal["approve", "reject", "redrive", "discard"]


class AuditEntryPublic(BaseModel):
    at: AwareDatetime
    actor: str = Field(description="The name of the API key that acted.")
    role: str | None = Field(description="The key's role when it acted.")
    action: Action
    exception_id: str
    stage: str
    reason: str | None
    outcome: str = Field(
        description="approved, rejected, requested (redrive, discard), or refused: <why>."
    )
    event_id: uuid.UUID = Field(description="The event in the exception's history.")
    event_type: str


class AuditListPublic(BaseModel):
    items: list[AuditEntryPublic]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null: done.")


@router.get(
    "/v1/audit",
    response_model=AuditListPublic,
    summary="List operator actions",
    description="Approvals, rejections, redrives and discards of the caller's tenant, newest "
    "first; filter by actor, action, exception and time (since inclusive, until exclusive).",
)
async def list_audit(
    settings: SettingsDep,
    caller: ViewerCaller,
    actor: Annotated[str | None, Query(max_length=200)] = None,
    action: Annotated[Action | None, Query()] = None,
    exception_id: Annotated[str | None, Query(max_length=128)] = None,
    since: Annotated[AwareDatetime | None, Query()] = None,
    until: Annotated[AwareDatetime | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: CursorQuery = None,
) -> AuditListPublic:
    tenant = caller.tenant_id
    params: dict[str, str | int] = {"tenant": tenant, "limit": limit}
    for name, value in (("actor", actor), ("action", action), ("exception_id", exception_id)):
        if value:
            params[name] = value
    if since is not None:
        params["since"] = since.isoformat()
    if until is not None:
        params["until"] = until.isoformat()
    if cursor:
        params["cursor"] = cursor
    data = await worker_get(settings, "/sluice/audit", params)
    items = [AuditEntryPublic.model_validate(i) for i in data["items"] if i["tenant_id"] == tenant]
    return AuditListPublic(items=items, next_cursor=data.get("next_cursor"))
