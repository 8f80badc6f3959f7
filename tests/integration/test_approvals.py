"""Approvals end to end: real broker, real worker and API processes, real HTTP tools.

Held at policy (every action needs approval) or at a plan step; approved, rejected, decided twice
at once, expired by the durable timer across a crash, and a worker killed right after an approval
was accepted.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx

from schemas.config import Role
from schemas.events import ApprovalSubmittedPayload, ExceptionApprovalSubmitted
from tests.integration.conftest import StackFactory
from tests.integration.test_pipeline import get, keys_of, post
from tests.support.mock_http import MockHTTPServer
from tests.support.stack import Stack

REFUND = {"source": "refunds", "error_type": "RefundRequested", "message": "Refund 900 EUR"}
ACCESS = {"source": "access-portal", "error_type": "AccessRequest", "message": "Admin for bob"}
VENDOR = {"source": "vendors", "error_type": "BankChange", "message": "New IBAN for ACME Ltd"}


async def decide(
    stack: Stack,
    exception_id: str,
    action: str,
    reason: str,
    tenant: str = "acme",
    role: Role = "admin",
) -> Any:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
        return await client.post(
            f"/v1/exceptions/{exception_id}/{action}",
            json={"reason": reason},
            headers=stack.headers(tenant, role=role),
        )


async def held(stack: Stack, report: dict[str, Any]) -> str:
    resp = await post(stack, report)
    assert resp.status_code == 202, resp.text
    exception_id: str = resp.json()["exception_id"]
    state = await stack.wait_for_state(exception_id, {"awaiting_approval"})
    for _ in range(100):  # the holding stage's note follows the decision by a moment
        if state["approval"]:
            return exception_id
        await asyncio.sleep(0.1)
        state = (await get(stack, f"/v1/exceptions/{exception_id}")).json()
    raise AssertionError(f"{exception_id} is awaiting approval but no stage recorded a hold")


async def events_of(stack: Stack, exception_id: str) -> list[dict[str, Any]]:
    resp = await get(stack, f"/v1/exceptions/{exception_id}/events")
    assert resp.status_code == 200, resp.text
    events: list[dict[str, Any]] = resp.json()
    return events


async def test_a_policy_hold_is_listed_then_approved_and_runs_the_playbook_once(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory()
    exception_id = await held(stack, REFUND)
    assert mock_server.calls() == []  # nothing ran while it waited

    listing = await get(stack, "/v1/approvals")
    assert listing.status_code == 200, listing.text
    [entry] = [a for a in listing.json()["items"] if a["exception_id"] == exception_id]
    assert entry["stage"] == "playbook"
    assert entry["policy_id"] == "refunds-need-a-human"
    assert entry["severity"] == "high" and entry["category"] == "refunds"
    assert [(s["tool"], s["action"]) for s in entry["steps"]] == [("webhook", "record")]
    assert entry["expires_at"] > entry["requested_at"]

    resp = await decide(stack, exception_id, "approve", "refund checked with finance")
    assert resp.status_code == 200, resp.text
    assert resp.json()["outcome"] == "approved"

    await stack.wait_for_state(exception_id, {"resolved"})
    assert sorted(keys_of(mock_server).values()) == [1]  # the one step, called once
    events = await events_of(stack, exception_id)
    [approved] = [e for e in events if e["event_type"] == "ExceptionApproved"]
    assert approved["payload"]["reason"] == "refund checked with finance"
    assert approved["payload"]["decided_by"]
    types = [e["event_type"] for e in events]
    assert types.index("ExceptionApprovalRequested") < types.index("ExceptionApproved")
    assert types.index("ExceptionApproved") < types.index("ExceptionCompleted")

    # Deciding again is a conflict that names where the exception is now; nothing runs again.
    again = await decide(stack, exception_id, "approve", "once more")
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("application/problem+json")
    assert "resolved" in again.json()["detail"]
    listing = await get(stack, "/v1/approvals")
    assert exception_id not in [a["exception_id"] for a in listing.json()["items"]]
    audit = await get(stack, "/v1/audit", action="approve")
    assert [(a["exception_id"], a["outcome"]) for a in audit.json()["items"]] == [
        (exception_id, "approved")
    ]
    assert sorted(keys_of(mock_server).values()) == [1]


async def test_a_held_plan_step_rejected_runs_nothing_and_other_tenants_cannot_decide(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory()
    exception_id = await held(stack, ACCESS)
    [entry] = (await get(stack, "/v1/approvals")).json()["items"]
    assert entry["stage"] == "tool" and "ticket.escalate" in entry["reason"]

    other = await decide(stack, exception_id, "approve", "not mine", tenant="globex")
    assert other.status_code == 404

    resp = await decide(stack, exception_id, "reject", "no admin rights for contractors")
    assert resp.status_code == 200, resp.text
    assert resp.json()["outcome"] == "rejected"
    state = await stack.wait_for_state(exception_id, {"rejected"})
    assert state["approval"]["decision"] == "rejected"
    await asyncio.sleep(1.0)  # give a wrongly released plan time to call its tool
    assert mock_server.calls() == []
    assert (await decide(stack, exception_id, "approve", "changed my mind")).status_code == 409


async def test_two_decisions_at_once_one_wins_and_the_plan_runs_once(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory()
    exception_id = await held(stack, REFUND)

    answers = await asyncio.gather(
        decide(stack, exception_id, "approve", "alice says yes"),
        decide(stack, exception_id, "reject", "bob says no"),
        decide(stack, exception_id, "approve", "carol says yes too"),
    )

    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 409, 409], [(a.status_code, a.text) for a in answers]
    [winner] = [a.json() for a in answers if a.status_code == 200]
    final = {"approved": "resolved", "rejected": "rejected"}[winner["outcome"]]
    await stack.wait_for_state(exception_id, {final})
    await asyncio.sleep(1.0)
    assert sorted(keys_of(mock_server).values()) == ([1] if final == "resolved" else [])
    events = await events_of(stack, exception_id)
    decisions = [e for e in events if e["event_type"] in ("ExceptionApproved", "ExceptionRejected")]
    refusals = [e for e in events if e["event_type"] == "ExceptionApprovalRefused"]
    assert len(decisions) == 1 and len(refusals) == 2


async def test_an_unanswered_approval_expires_even_across_a_worker_crash(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory(env={"SLUICE_APPROVAL_SWEEP_SECONDS": "1"})
    exception_id = await held(stack, VENDOR)  # its rule gives it 3 s
    stack.stop_worker(0, signal.SIGKILL)  # the deadline passes while no worker runs
    await asyncio.sleep(4)
    stack.start_worker(0)
    stack.wait_ready(timeout=120)

    state = await stack.wait_for_state(exception_id, {"approval_expired"}, timeout=60)
    assert state["approval"]["decision"] == "expired"
    events = await events_of(stack, exception_id)
    [expired] = [e for e in events if e["event_type"] == "ExceptionApprovalExpired"]
    assert expired["payload"]["decided_by"] == "sluice"
    assert mock_server.calls() == []
    assert (await decide(stack, exception_id, "approve", "too late")).status_code == 409


async def test_a_worker_killed_right_after_an_approval_is_accepted_runs_the_plan_once(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    """The approval is in the log (what the API's answer means), and the worker is killed before it
    could do anything with it: the restarted worker carries it out, once."""
    stack = await stack_factory()
    exception_id = await held(stack, ACCESS)
    worker = stack.workers[0].proc
    assert worker is not None
    worker.send_signal(signal.SIGSTOP)  # it takes nothing more from Kafka from here on
    try:
        # What POST /approve writes, as the API writes it (the API itself is tested above; here
        # it could not read the frozen worker to check the exception first).
        event_id = uuid.uuid4()
        approval = ExceptionApprovalSubmitted(
            event_id=event_id,
            tenant_id="acme",
            exception_id=exception_id,
            sequence=1,
            occurred_at=datetime.now(UTC),
            causation_id=None,
            correlation_id=event_id,
            payload=ApprovalSubmittedPayload(
                action="approve",
                stage="tool",
                requested_by="ops-alice",
                role="operator",
                reason="escalation agreed",
            ),
        )
        await stack.produce_events(stack.topics.planned, [approval])
    finally:
        stack.stop_worker(0, signal.SIGKILL)
    assert mock_server.calls() == []

    stack.start_worker(0)
    stack.wait_ready(timeout=120)
    await stack.wait_for_state(exception_id, {"resolved"})
    assert list(keys_of(mock_server).values()) == [1]
    events = await events_of(stack, exception_id)
    assert [e["event_type"] for e in events].count("ExceptionApproved") == 1
    assert (await decide(stack, exception_id, "approve", "again")).status_code == 409


async def test_the_audit_trail_names_who_did_what_and_why_and_roles_apply(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory()
    approved_id = await held(stack, REFUND)
    rejected_id = await held(stack, ACCESS)

    # a viewer sees what waits, but may not decide; a producer may not even look
    viewer_list = await get_as(stack, "/v1/approvals", "viewer")
    assert viewer_list.status_code == 200
    assert {a["exception_id"] for a in viewer_list.json()["items"]} == {approved_id, rejected_id}
    denied = await decide(stack, approved_id, "approve", "I am only a viewer", role="viewer")
    assert denied.status_code == 403 and "operator" in denied.json()["detail"]
    assert (await get_as(stack, "/v1/approvals", "producer")).status_code == 403

    ok = await decide(stack, approved_id, "approve", "refund is fine", role="operator")
    assert ok.status_code == 200, ok.text
    no = await decide(stack, rejected_id, "reject", "not for contractors", role="operator")
    assert no.status_code == 200, no.text
    late = await decide(stack, rejected_id, "approve", "second thoughts")
    assert late.status_code == 409

    trail = await get_as(stack, "/v1/audit", "viewer")
    assert trail.status_code == 200, trail.text
    items = trail.json()["items"]
    got = [(i["exception_id"], i["action"], i["actor"], i["role"], i["reason"]) for i in items]
    assert got == [  # newest first; the 409 was refused by the API before anything was written
        (rejected_id, "reject", "test operator", "operator", "not for contractors"),
        (approved_id, "approve", "test operator", "operator", "refund is fine"),
    ]
    assert [i["outcome"] for i in items] == ["rejected", "approved"]
    only_rejects = await get_as(stack, "/v1/audit", "viewer", action="reject")
    assert [i["exception_id"] for i in only_rejects.json()["items"]] == [rejected_id]
    page = await get_as(stack, "/v1/audit", "viewer", limit="1")
    assert [i["exception_id"] for i in page.json()["items"]] == [rejected_id]
    rest = await get_as(stack, "/v1/audit", "viewer", cursor=page.json()["next_cursor"])
    assert [i["exception_id"] for i in rest.json()["items"]] == [approved_id]
    later = items[0]["at"]
    since = await get_as(stack, "/v1/audit", "viewer", since=later)
    assert [i["exception_id"] for i in since.json()["items"]] == [rejected_id]
    # the trail and the history tell the same story
    events = await events_of(stack, rejected_id)
    [rejected] = [e for e in events if e["event_type"] == "ExceptionRejected"]
    assert str(rejected["event_id"]) == items[0]["event_id"]
    assert rejected["payload"]["decided_by"] == "test operator"


async def get_as(stack: Stack, path: str, role: Role, **params: str) -> Any:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as client:
        return await client.get(path, headers=stack.headers(role=role), params=params)
