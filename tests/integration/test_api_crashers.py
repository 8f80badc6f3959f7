"""Crashers of issue 16 against real processes and the real broker: a worker restarting while the
API serves reads, and a batch retried with its Idempotency-Key."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx

from tests.integration.conftest import StackFactory
from tests.support.stack import Stack


async def _reported(stack: Stack, client: httpx.AsyncClient) -> str:
    resp = await client.post(
        "/v1/exceptions",
        json={"source": "payments", "error_type": "CardDeclined", "message": "declined"},
        headers=stack.headers(),
    )
    assert resp.status_code == 202, resp.text
    exception_id: str = resp.json()["exception_id"]
    await stack.wait_for_state(exception_id, {"received", "in_progress", "resolved", "open"})
    return exception_id


def _bad(resp: httpx.Response) -> str | None:
    """Why this answer is a crash: a 5xx other than a 503 with Retry-After."""
    if resp.status_code < 500:
        return None
    if resp.status_code == 503 and resp.headers.get("Retry-After"):
        return None
    return f"{resp.status_code} {resp.headers.get('content-type')} {resp.text[:200]}"


async def test_a_restarting_worker_answers_503_with_retry_after(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory()
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=15) as api:
        exception_id = await _reported(stack, api)
        assert stack.stop_worker(0) == 0
        stack.start_worker(0)
        worker_read = f"{stack.worker_url(0)}/sluice/exceptions/{exception_id}"
        seen: Counter[tuple[str, int]] = Counter()
        crashes: list[str] = []
        deadline = time.monotonic() + 120
        async with httpx.AsyncClient(timeout=15) as direct:
            while time.monotonic() < deadline:
                answers = {}
                try:
                    answers["worker"] = await direct.get(worker_read, params={"tenant": "acme"})
                except httpx.TransportError:
                    seen["worker", 0] += 1  # not listening yet
                answers["api"] = await api.get(
                    f"/v1/exceptions/{exception_id}", headers=stack.headers()
                )
                for who, resp in answers.items():
                    seen[who, resp.status_code] += 1
                    if (why := _bad(resp)) is not None:
                        crashes.append(f"{who}: {why}")
                if all(r.status_code == 200 for r in answers.values()) and len(answers) == 2:
                    break
                await asyncio.sleep(0.02)
    assert crashes == [], f"{crashes[:5]} (all answers: {dict(seen)})"
    assert seen["worker", 200] and seen["api", 200], dict(seen)
    # The restart window was exercised: the worker answered before it could serve the read.
    assert seen["worker", 503] > 0, dict(seen)


async def test_a_retried_batch_gets_the_first_answer_and_no_duplicates(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory()
    batch = {
        "items": [
            {"source": "payments", "error_type": "CardDeclined", "message": "first"},
            {"source": "payments", "error_type": "CardDeclined"},  # invalid: no message
            {"source": "payments", "error_type": "CardDeclined", "message": "third"},
        ]
    }
    headers = stack.headers(**{"Idempotency-Key": "batch-retry-1"})
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=15) as api:
        first = await api.post("/v1/exceptions:batch", json=batch, headers=headers)
        assert first.status_code == 200, first.text
        assert [r["status_code"] for r in first.json()["results"]] == [202, 422, 202]
        ids = [r["exception_id"] for r in first.json()["results"] if r["status_code"] == 202]
        again = await api.post("/v1/exceptions:batch", json=batch, headers=headers)
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
        for exception_id in ids:
            await stack.wait_for_state(
                exception_id, {"received", "in_progress", "resolved", "open"}
            )

    # Another API process (a restart) knows the key only through the workers.
    assert stack.api is not None
    stack.api.stop()
    stack.start_api()
    stack.wait_ready()
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=15) as api:
        replayed = await api.post("/v1/exceptions:batch", json=batch, headers=headers)
        assert replayed.status_code == 200, replayed.text
        assert replayed.json() == first.json()
        assert replayed.headers["Idempotent-Replayed"] == "true"
        other = await api.post(
            "/v1/exceptions:batch", json={"items": batch["items"][:1]}, headers=headers
        )
        assert other.status_code == 422
        # Everything sent has been processed once the ingested topic's copies are consumed:
        # each exception holds one ExceptionIngested, and the tenant has no other exception.
        await stack.read_topic(stack.topics.ingested, expect=4)
        for exception_id in ids:
            await stack.wait_for_state(exception_id, {"resolved", "open", "in_progress"})
            events = await api.get(f"/v1/exceptions/{exception_id}/events", headers=headers)
            kinds = [e["event_type"] for e in events.json()]
            assert kinds.count("ExceptionIngested") == 1, kinds
        listed = await api.get("/v1/exceptions", headers=stack.headers())
        assert sorted(s["exception_id"] for s in listed.json()["items"]) == sorted(ids)
