"""Held exceptions in the worker: the ``approvals`` table, its expiry timer, and its listing.

The playbook and tool stages keep a :class:`~agents.approval.Hold` per held exception here (key: the
exception id). The pending holds are what GET /v1/approvals lists, so the listing reads this small
table (pending holds only; decided ones move to an expiring table), never the ``exceptions`` table. The timer is durable because the table is: after a restart or a
rebalance, the worker that now holds the partition finds the hold and its ``expires_at``. When it is
due, the timer does not change anything itself: it sends an ``expire`` decision to the holding
stage's input, where it is ordered with the operators' decisions and whichever comes first wins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from agents.approval import Held, Hold, expiry
from app.stores import BytesMapping, stored
from app.topics import TopicNames
from app.worker.items import Outgoing
from app.worker.paging import decode_cursor
from app.worker.ports import Clock, Producer
from app.worker.registry import stage
from schemas.codec import encode
from schemas.events import ExceptionApprovalRequested

log = logging.getLogger("sluice.pipeline")


class Approvals:
    """Holds by exception id: the pending ones in the ``approvals`` table (what the list and the
    timer read), the decided ones in ``approvals-decided``, which expires like the idempotency
    marks (a decision delivered again finds its hold there and gives the same outputs; none comes
    later than the marks are kept)."""

    def __init__(self, pending: BytesMapping, decided: BytesMapping | None = None) -> None:
        self.table = pending
        self.decided = {} if decided is None else decided

    def get(self, exception_id: str) -> Hold | None:
        raw = stored(self.table, exception_id)
        if raw is None:
            raw = stored(self.decided, exception_id)
        return None if raw is None else Hold.model_validate_json(raw)

    def put(self, hold: Hold) -> None:
        value = hold.model_dump_json().encode()
        if hold.pending:
            self.table[hold.exception_id] = value
            return
        self.decided[hold.exception_id] = value
        if hold.exception_id in self.table:
            del self.table[hold.exception_id]

    def hold(self, held: Held) -> ExceptionApprovalRequested:
        """Keep ``held``, unless this very event is already held (a redelivery after a crash):
        then the first hold, with its first times, stays and its note is sent again."""
        existing = self.get(held.hold.exception_id)
        if (
            existing is not None
            and existing.requested.held_event_id == held.hold.requested.held_event_id
        ):
            return held.note.model_copy(update={"payload": existing.requested})
        self.put(held.hold)
        return held.note

    def pending(self) -> Iterable[Hold]:
        for _key, raw in list(self.table.items()):
            yield Hold.model_validate_json(raw)


class ExpiryTimer:
    """Sends the ``expire`` decision of every pending hold past its ``expires_at`` on this worker.

    The stage drops the copies (the decision's id comes from the held event), so sending again is
    harmless; this only waits ``resend_seconds`` before it sends the same one again."""

    def __init__(
        self,
        approvals: Approvals,
        producer: Producer,
        topics: TopicNames,
        clock: Clock,
        resend_seconds: float = 60.0,
    ) -> None:
        self.approvals = approvals
        self.producer = producer
        self.topics = topics
        self.clock = clock
        self.resend_seconds = resend_seconds
        self.sent: dict[str, float] = {}

    async def tick(self) -> int:
        """Send what is due; how many were sent."""
        now, moment = self.clock(), time.monotonic()
        records: list[Outgoing] = []
        for hold in self.approvals.pending():
            if hold.requested.expires_at > now:
                continue
            if (
                moment - self.sent.get(hold.exception_id, -self.resend_seconds)
                < self.resend_seconds
            ):
                continue
            decision = expiry(hold, now)
            topic = self.topics.of(stage(hold.stage).requests)
            records.append((topic, hold.exception_id.encode(), encode(decision), None))
            self.sent[hold.exception_id] = moment
        if records:
            await self.producer.send(records)
            log.info(
                "approvals: %d held exception(s) past their deadline; expiring them", len(records)
            )
        return len(records)


# ----------------------------------------------------------------------------------- the listing


def listing_key(entry: dict[str, Any]) -> tuple[str, str]:
    return (entry["requested_at"], entry["exception_id"])


def entry(hold: Hold) -> dict[str, Any]:
    """A pending approval as GET /v1/approvals shows it."""
    requested = hold.requested.model_dump(mode="json")
    return {
        "exception_id": hold.exception_id,
        "tenant_id": hold.tenant_id,
        "stage": hold.stage,
        "policy_id": requested["policy_id"],
        "reason": requested["reason"],
        "severity": requested["severity"],
        "category": requested["category"],
        "playbook_id": requested["playbook_id"],
        "steps": requested["steps"],
        "requested_at": requested["requested_at"],
        "expires_at": requested["expires_at"],
    }


def local_page(approvals: Approvals, query: dict[str, str], limit: int) -> list[dict[str, Any]]:
    """This worker's pending approvals of the query's tenant, oldest first, after the cursor."""
    tenant = query.get("tenant")
    after = decode_cursor(query["cursor"]) if query.get("cursor") else None
    items = [entry(h) for h in approvals.pending() if h.tenant_id == tenant]
    items = [i for i in items if after is None or listing_key(i) > after]
    items.sort(key=listing_key)
    return items[:limit]
