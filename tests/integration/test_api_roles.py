"""Roles on API keys, with `sluice api` started as a user starts it, against the real broker: what each
role may do, and who an operator's request names."""

from __future__ import annotations

import httpx

from tests.integration.conftest import StackFactory
from tests.integration.test_pipeline import PAYMENT
from tests.support.mock_http import MockHTTPServer


async def test_each_role_does_what_it_may_and_an_operator_is_named_in_the_log(
    stack_factory: StackFactory, mock_server: MockHTTPServer
) -> None:
    stack = await stack_factory()
    mock_server.fail("/hooks/acme", 400, times=1)  # a permanent failure: the exception dead-letters
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as client:
        # A producer reports, and may read nothing back.
        posted = await client.post(
            "/v1/exceptions", json=PAYMENT, headers=stack.headers(role="producer")
        )
        assert posted.status_code == 202, posted.text
        exception_id = posted.json()["exception_id"]
        url = f"/v1/exceptions/{exception_id}"
        read = await client.get(url, headers=stack.headers(role="producer"))
        assert read.status_code == 403, read.text
        assert read.headers["content-type"] == "application/problem+json"
        assert "needs a key with the viewer role" in read.json()["detail"]
        assert "'test producer' has the producer role" in read.json()["detail"]

        # A viewer reads the exception the workers processed, and may not act on it.
        await stack.wait_for_state(exception_id, {"dead_lettered"})
        state = await client.get(url, headers=stack.headers(role="viewer"))
        assert state.status_code == 200, state.text
        assert state.json()["status"] == "dead_lettered"
        dlq = await client.get("/v1/dlq", headers=stack.headers(role="viewer"))
        assert [e["exception_id"] for e in dlq.json()["items"]] == [exception_id]
        for action, body in (("redrive", {}), ("discard", {"reason": "looked fine"})):
            denied = await client.post(
                f"{url}/{action}", json=body, headers=stack.headers(role="viewer")
            )
            assert denied.status_code == 403, denied.text
            assert "needs a key with the operator role" in denied.json()["detail"]
        posting = await client.post(
            "/v1/exceptions", json=PAYMENT, headers=stack.headers(role="viewer")
        )
        assert posting.status_code == 403
        assert "needs a key with the producer role" in posting.json()["detail"]

        # An operator discards it; the log names the key that asked, its role and why.
        resp = await client.post(
            f"{url}/discard",
            json={"reason": "refunded by hand"},
            headers=stack.headers(role="operator"),
        )
        assert resp.status_code == 202, resp.text
        await stack.wait_for_state(exception_id, {"discarded"})
        events = (await client.get(f"{url}/events", headers=stack.headers(role="viewer"))).json()
    [request] = [e for e in events if e["event_type"] == "ExceptionDiscardRequested"]
    assert request["payload"]["requested_by"] == "test operator"
    assert request["payload"]["role"] == "operator"
    assert request["payload"]["reason"] == "refunded by hand"
    [lifted] = [e for e in events if e["event_type"] == "ExceptionQuarantineLifted"]
    assert lifted["payload"]["requested_by"] == "test operator"
