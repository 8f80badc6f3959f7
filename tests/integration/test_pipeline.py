"""The exception pipeline end to end: real broker, real worker and API processes, real HTTP tools."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from schemas.codec import decode
from schemas.events import ExceptionIngested, ExceptionReport, IngestedPayload
from tests.integration.conftest import StackFactory
from tests.support.mock_http import MockHTTPServer
from tests.support.stack import Stack

PAYMENT = {
    "source": "payments",
    "error_type": "PaymentDeclined",
    "message": "Card declined for order 1234",
    "external_ref": "ord-1234",
}
CHAIN = [
    "ExceptionIngested",
    "ExceptionAccepted",
    "ExceptionTriaged",
    "ExceptionDecided",
    "ExceptionPlanned",
    "ExceptionCompleted",
]


def ingested(exception_id: str, n: int, tenant: str = "acme") -> ExceptionIngested:
    """An event as the API writes it; ``n`` marks its position among its exception's events."""
    event_id = uuid.uuid4()
    return ExceptionIngested(
        event_id=event_id,
        tenant_id=tenant,
        exception_id=exception_id,
        sequence=1,
        occurred_at=datetime.now(UTC),
        causation_id=None,
        correlation_id=event_id,
        payload=IngestedPayload(
            report=ExceptionReport(
                source="shipping-eu",
                error_type="ShipmentStuck",
                message=f"Parcel {exception_id} stuck at hub",
                attributes={"n": n},
            ),
            request_hash="0" * 64,
        ),
    )


async def post(stack: Stack, body: dict[str, Any], tenant: str = "acme", **headers: str) -> Any:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as client:
        return await client.post(
            "/v1/exceptions", json=body, headers=stack.headers(tenant, **headers)
        )


async def get(stack: Stack, path: str, tenant: str = "acme", **params: str) -> Any:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as client:
        return await client.get(path, headers=stack.headers(tenant), params=params)


def keys_of(mock: MockHTTPServer) -> Counter[str]:
    return mock.calls_by_idempotency_key()


async def test_posted_exception_runs_the_whole_chain(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory()
    resp = await post(stack, PAYMENT)
    assert resp.status_code == 202, resp.text
    exception_id = resp.json()["exception_id"]
    assert resp.headers["location"] == f"/v1/exceptions/{exception_id}"

    state = await stack.wait_for_state(exception_id, {"resolved", "failed"})
    assert state["status"] == "resolved"
    assert state["stage"] == "tool"
    assert (state["severity"], state["category"]) == ("high", "payments")
    assert state["decision"] == "proceed"
    assert state["playbook_id"] == "payments"
    assert [r["step_id"] for r in state["tool_results"]] == [
        "open-ticket",
        "page-oncall",
        "callback",
    ]
    assert {r["status"] for r in state["tool_results"]} == {"succeeded"}

    events = (await get(stack, f"/v1/exceptions/{exception_id}/events")).json()
    assert [e["event_type"] for e in events] == CHAIN
    assert [e["sequence"] for e in events] == sorted(e["sequence"] for e in events)
    assert len({e["correlation_id"] for e in events}) == 1

    # The tool server saw exactly the planned calls, once each, with the templated params.
    calls = mock_server.calls()
    assert [c.path for c in calls] == ["/tickets", "/notify", "/hooks/acme"]
    assert all(n == 1 for n in keys_of(mock_server).values())
    assert len(keys_of(mock_server)) == 3
    assert calls[0].json["params"]["ref"] == exception_id
    assert calls[2].json["params"]["order"] == "ord-1234"


async def test_every_exception_keeps_its_order_at_every_stage(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory(api=False)
    exceptions = [f"ord-{i:03d}" for i in range(100)]
    events = [ingested(x, n) for n in range(10) for x in exceptions]  # interleaved
    await stack.produce_events(stack.topics.ingested, events)
    sent = defaultdict(list)
    for e in events:
        sent[e.exception_id].append(e.correlation_id)

    t = stack.topics
    for topic in (t.fingerprinted, t.accepted, t.triaged, t.decided, t.planned, t.completed):
        records = await stack.read_topic(topic, expect=len(events))
        seen: dict[str, list[uuid.UUID]] = defaultdict(list)
        partitions: dict[str, set[int]] = defaultdict(set)
        for r in records:
            event = decode(r.value)
            seen[event.exception_id].append(event.correlation_id)
            partitions[event.exception_id].add(r.partition)
        assert len(records) == len(events), f"{topic}: {len(records)} records"
        assert seen == sent, f"{topic}: an exception's events are out of order"
        assert all(len(p) == 1 for p in partitions.values())
    assert len(keys_of(mock_server)) == len(events)
    assert set(keys_of(mock_server).values()) == {1}


async def test_duplicates_are_processed_once(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory()
    # The same Idempotency-Key twice: one exception, one chain.
    first = await post(stack, PAYMENT, **{"Idempotency-Key": "retry-me-1"})
    second = await post(stack, PAYMENT, **{"Idempotency-Key": "retry-me-1"})
    assert first.status_code == second.status_code == 202
    assert first.json()["exception_id"] == second.json()["exception_id"]
    assert first.headers["location"] == second.headers["location"]
    # The same event id twice on the topic.
    dup = ingested("dup-1", 0)
    await stack.produce_events(stack.topics.ingested, [dup, dup])

    await stack.wait_for_state(first.json()["exception_id"], {"resolved"})
    await stack.wait_for_state("dup-1", {"resolved"})
    completed = await stack.read_topic(stack.topics.completed, expect=2)
    assert sorted(decode(r.value).exception_id for r in completed) == sorted(
        [first.json()["exception_id"], "dup-1"]
    )
    ingested_records = await stack.read_topic(stack.topics.ingested, expect=3)
    ids = [orjson.loads(r.value)["exception_id"] for r in ingested_records]
    assert ids.count(first.json()["exception_id"]) == 1, "the API produced the retry again"
    assert len(keys_of(mock_server)) == 3 + 1
    assert set(keys_of(mock_server).values()) == {1}
    events = (await get(stack, "/v1/exceptions/dup-1/events")).json()
    assert [e["event_type"] for e in events] == CHAIN


async def test_worker_restart_mid_run_processes_each_event_once(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory(api=False)
    events = [ingested(f"restart-{i:03d}", 0) for i in range(300)]
    await stack.produce_events(stack.topics.ingested, events[:150])
    await asyncio.sleep(2)  # let it get part of the way
    assert stack.stop_worker(0, signal.SIGTERM) == 0
    await stack.produce_events(stack.topics.ingested, events[150:])
    stack.start_worker(0)
    stack.wait_ready()

    completed = await stack.read_topic(stack.topics.completed, expect=len(events))
    done = Counter(decode(r.value).exception_id for r in completed)
    assert set(done) == {e.exception_id for e in events}
    assert set(done.values()) == {1}, "an exception completed twice"
    assert len(keys_of(mock_server)) == len(events)
    assert set(keys_of(mock_server).values()) == {1}, "a tool step was called twice"


async def test_tenants_are_isolated(stack_factory: StackFactory) -> None:
    stack = await stack_factory()
    acme = (await post(stack, PAYMENT, "acme")).json()["exception_id"]
    globex = (await post(stack, PAYMENT, "globex")).json()["exception_id"]
    a = await stack.wait_for_state(acme, {"resolved"}, "acme")
    g = await stack.wait_for_state(globex, {"resolved"}, "globex")
    # Each tenant's own rules applied to the same report.
    assert (a["severity"], a["category"]) == ("high", "payments")
    assert (g["severity"], g["category"]) == ("critical", "globex-ops")

    assert (await get(stack, f"/v1/exceptions/{acme}", "globex")).status_code == 404
    assert (await get(stack, f"/v1/exceptions/{acme}/events", "globex")).status_code == 404
    assert (await get(stack, f"/v1/exceptions/{globex}", "acme")).status_code == 404
    listed = (await get(stack, "/v1/exceptions", "globex")).json()["items"]
    assert [i["exception_id"] for i in listed] == [globex]
    # The same Idempotency-Key in two tenants names two different exceptions.
    ka = await post(stack, PAYMENT, "acme", **{"Idempotency-Key": "shared-key"})
    kg = await post(stack, PAYMENT, "globex", **{"Idempotency-Key": "shared-key"})
    assert ka.json()["exception_id"] != kg.json()["exception_id"]


async def test_two_workers_share_the_work_and_answer_any_read(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory(workers=2)
    for i in range(2):
        ready = httpx.get(f"{stack.worker_url(i)}/sluice/ready").json()
        assert ready["assigned_partitions"] > 0, f"worker {i} got no partitions"
    ids = []
    for i in range(40):
        resp = await post(stack, {**PAYMENT, "external_ref": f"ord-{i}"})
        assert resp.status_code == 202
        ids.append(resp.json()["exception_id"])
    # The API reads through worker 0 only; half the partitions live on worker 1.
    for exception_id in ids:
        state = await stack.wait_for_state(exception_id, {"resolved"})
        assert state["exception_id"] == exception_id
    listed = (await get(stack, "/v1/exceptions", limit="200")).json()["items"]
    assert sorted(i["exception_id"] for i in listed) == sorted(ids)
    # Paging across both workers: every exception exactly once, newest first.
    paged: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": "7", **({"cursor": cursor} if cursor else {})}
        page = (await get(stack, "/v1/exceptions", **params)).json()
        assert len(page["items"]) <= 7
        paged.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [i["exception_id"] for i in paged] == [i["exception_id"] for i in listed]
    assert len(paged) == len(ids) and len({i["exception_id"] for i in paged}) == len(ids)
    for i in range(2):
        stats = httpx.get(f"{stack.worker_url(i)}/sluice/stats", params={"local": "1"}).json()
        assert stats["stages"]["tool"]["processed"] > 0, f"worker {i} executed no plan"
    assert len(keys_of(mock_server)) == 3 * len(ids)
    assert set(keys_of(mock_server).values()) == {1}
