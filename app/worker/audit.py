"""The audit trail: every operator action, as the log records it.

The projection, as it folds an operator's event into an exception's history, also writes one entry
per action into the ``audit`` table (key: the event id), so the trail is built from the very events
the histories hold and cannot disagree with them. GET /v1/audit lists it: newest first, filtered by
actor, action and time, gathered from every worker like the other lists.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from app.worker.paging import decode_cursor
from schemas.events import (
    Event,
    ExceptionApprovalRefused,
    ExceptionApproved,
    ExceptionDiscardRequested,
    ExceptionRedriveRequested,
    ExceptionRejected,
)

ACTIONS = ("approve", "reject", "redrive", "discard")
FILTERS = ("actor", "action", "exception_id")


AUDITED = (
    ExceptionApproved,
    ExceptionRejected,
    ExceptionApprovalRefused,
    ExceptionRedriveRequested,
    ExceptionDiscardRequested,
)


def _base(event: Event) -> dict[str, Any]:
    return {
        "event_id": str(event.event_id),
        "event_type": event.event_type,
        "tenant_id": event.tenant_id,
        "exception_id": event.exception_id,
        "at": event.occurred_at.isoformat(),
    }


def audit_entry(event: Event) -> dict[str, Any] | None:
    """The audit entry of an operator's event, or None for any other event."""
    if not isinstance(event, AUDITED):
        return None  # most events: decided before anything is built (the projection asks for each)
    if isinstance(event, ExceptionApproved | ExceptionRejected | ExceptionApprovalRefused):
        p = event.payload
        if p.action == "expire":
            return None  # the timer's, not a person's
        if isinstance(event, ExceptionApprovalRefused):
            outcome = f"refused: {p.refused_because}"
        else:
            outcome = "approved" if isinstance(event, ExceptionApproved) else "rejected"
        return {
            **_base(event),
            "actor": p.decided_by,
            "role": p.role,
            "action": p.action,
            "stage": p.stage,
            "reason": p.reason,
            "outcome": outcome,
        }
    if isinstance(event, ExceptionRedriveRequested | ExceptionDiscardRequested):
        request = event.payload
        return {
            **_base(event),
            "actor": request.requested_by,
            "role": getattr(request, "role", None),
            "action": "redrive" if isinstance(event, ExceptionRedriveRequested) else "discard",
            "stage": request.stage,
            "reason": request.reason,
            "outcome": "requested",
        }
    return None


def listing_key(entry: dict[str, Any]) -> tuple[str, str]:
    return (entry["at"], entry["event_id"])


def local_page(table: Any, query: dict[str, str], limit: int) -> list[dict[str, Any]]:
    """This worker's audit entries of the query's tenant, newest first, filtered, after the
    cursor (``since``/``until`` are ISO times, inclusive and exclusive)."""
    tenant = query.get("tenant")
    before = decode_cursor(query["cursor"]) if query.get("cursor") else None
    since = datetime.fromisoformat(query["since"]) if query.get("since") else None
    until = datetime.fromisoformat(query["until"]) if query.get("until") else None
    items = []
    for _key, raw in list(table.items()):
        item = orjson.loads(raw)
        if item["tenant_id"] != tenant:
            continue
        if any(query.get(f) and item.get(f) != query[f] for f in FILTERS):
            continue
        at = datetime.fromisoformat(item["at"])
        if (since and at < since) or (until and at >= until):
            continue
        if before is not None and listing_key(item) >= before:
            continue
        items.append(item)
    items.sort(key=listing_key, reverse=True)
    return items[:limit]
