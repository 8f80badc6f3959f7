"""A tenant's ingest limit on a real `sluice api` in front of the real broker and a worker.

globex gets a small limit (2 a second, 4 at once) after the stack's config is written, so the other
tests' tenants stay as they were; acme stays unlimited. A burst of concurrent reports must get 429s
with Retry-After, a batch must be accepted or refused whole, exactly the answered-202 exceptions must
reach Kafka and be readable afterwards, and after waiting Retry-After a report is accepted again.
"""

from __future__ import annotations

import asyncio
import typing

import httpx
import orjson

from schemas.state import ExceptionStatus
from tests.integration.conftest import StackFactory
from tests.support.stack import Stack
from tests.support.tenants import limit_tenant

PER_SECOND = 2
BURST = 4
ANY_STATUS = typing.get_args(ExceptionStatus)


def report(n: int) -> dict[str, object]:
    return {"source": "plant-7", "error_type": "SensorOffline", "message": f"sensor {n} is quiet"}


def assert_429(resp: httpx.Response) -> int:
    assert resp.status_code == 429, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert "nothing of it was accepted" in resp.json()["detail"]
    wait = int(resp.headers["Retry-After"])
    assert wait >= 1
    return wait


async def limited_stack(stack_factory: StackFactory) -> Stack:
    stack = await stack_factory(workers=1, api=False)
    limit_tenant(stack.root / "config", "globex", PER_SECOND, BURST)
    stack.start_api()
    stack.wait_ready()
    return stack


async def test_a_burst_past_the_limit_gets_429_and_loses_nothing_accepted(
    stack_factory: StackFactory,
) -> None:
    stack = await limited_stack(stack_factory)
    accepted: set[str] = set()
    refused = 0
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as client:

        async def post(n: int) -> httpx.Response:
            return await client.post(
                "/v1/exceptions", json=report(n), headers=stack.headers("globex")
            )

        async def post_batch(n: int) -> httpx.Response:
            body = {"items": [report(100 * n + i) for i in range(3)]}
            return await client.post(
                "/v1/exceptions:batch", json=body, headers=stack.headers("globex")
            )

        answers = await asyncio.gather(*[post(n) for n in range(12)], post_batch(1), post_batch(2))
        waits = []
        for resp in answers[:12]:
            if resp.status_code == 202:
                accepted.add(resp.json()["exception_id"])
            else:
                waits.append(assert_429(resp))
                refused += 1
        for resp in answers[12:]:
            if resp.status_code == 200:  # accepted whole: every item is on Kafka
                results = resp.json()["results"]
                assert [r["status_code"] for r in results] == [202, 202, 202], results
                accepted.update(r["exception_id"] for r in results)
            else:
                assert_429(resp)
                refused += 1
        assert waits, [r.status_code for r in answers]  # the burst went past the limit
        assert accepted

        # Once Retry-After has passed, a report is accepted again.
        await asyncio.sleep(max(waits))
        again = await post(99)
        assert again.status_code == 202, again.text
        accepted.add(again.json()["exception_id"])

        # acme has no [limits]: the same burst is accepted whole.
        acme = await asyncio.gather(
            *[
                client.post("/v1/exceptions", json=report(n), headers=stack.headers("acme"))
                for n in range(12)
            ]
        )
        assert [r.status_code for r in acme] == [202] * 12
        metrics = (await client.get("/metrics")).text
    assert f'sluice_api_rate_limited_total{{tenant="globex"}} {float(refused)}' in metrics

    # Exactly the accepted reports reached Kafka, and each is readable through the API.
    records = await stack.read_topic(stack.topics.ingested, expect=len(accepted) + 12)
    events = [orjson.loads(r.value) for r in records]
    on_kafka = {e["exception_id"] for e in events if e["tenant_id"] == "globex"}
    assert on_kafka == accepted
    for exception_id in sorted(accepted):
        await stack.wait_for_state(exception_id, ANY_STATUS, tenant="globex")
