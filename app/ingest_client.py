"""A small client of Sluice's ingest API: what `sluice send` uses to POST exception reports.

Each report goes to ``POST /v1/exceptions`` on its own (concurrently, in bounded number), so each can
carry its own Idempotency-Key. With ``retries`` > 0 a report answered 503 (Kafka unreachable) or not
answered at all is sent again after the server's Retry-After; a report without a key then gets a random
one, so that a retry can never create a second exception. Results come back in input order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import httpx

_MAX_RETRY_WAIT_SECONDS = 30.0


async def post_exceptions(
    api_url: str,
    api_key: str,
    reports: list[dict[str, Any]],
    idempotency_keys: Sequence[str | None] | None = None,
    *,
    retries: int = 0,
    concurrency: int = 8,
    request_timeout_seconds: float = 30.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[dict[str, Any]]:
    """POST every report; return one result per report, in order.

    A result is ``{"index", "status_code", "idempotency_key"}`` plus the API's answer: for 202 its
    ``exception_id``, ``event_id`` and ``status_url``; otherwise its problem document (``detail``
    and, for 422, ``errors`` naming each invalid field). When the API could not be reached at all,
    ``status_code`` is None and ``detail`` says why.
    """
    if idempotency_keys is not None and len(idempotency_keys) != len(reports):
        raise ValueError(
            f"idempotency_keys has {len(idempotency_keys)} entries for {len(reports)} reports; "
            "give one per report (None for a report without a key)"
        )
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    keys: list[str | None] = list(idempotency_keys or [None] * len(reports))
    if retries > 0:
        keys = [k if k is not None else str(uuid.uuid4()) for k in keys]
    url = api_url.rstrip("/") + "/v1/exceptions"
    gate = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(
        headers={"X-API-Key": api_key}, timeout=request_timeout_seconds, transport=transport
    ) as client:

        async def post(index: int) -> dict[str, Any]:
            async with gate:
                return await _post_one(client, url, index, reports[index], keys[index], retries)

        return list(await asyncio.gather(*(post(i) for i in range(len(reports)))))


async def _post_one(
    client: httpx.AsyncClient,
    url: str,
    index: int,
    report: dict[str, Any],
    key: str | None,
    retries: int,
) -> dict[str, Any]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    result: dict[str, Any] = {}
    for attempt in range(retries + 1):
        wait = 1.0
        try:
            resp = await client.post(url, json=report, headers=headers)
        except httpx.HTTPError as exc:
            result = {
                "status_code": None,
                "detail": f"Cannot reach the Sluice API at {url} ({exc or type(exc).__name__}). "
                "Is `sluice api` running there?",
            }
        else:
            result = {"status_code": resp.status_code, **_json_object(resp)}
            if resp.status_code != 503:
                break
            wait = _retry_after(resp)
        if attempt < retries:
            await asyncio.sleep(wait)
    return {**result, "index": index, "idempotency_key": key}


def _json_object(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {"detail": resp.text[:500] or resp.reason_phrase}
    return body if isinstance(body, dict) else {"body": body}


def _retry_after(resp: httpx.Response) -> float:
    try:
        seconds = float(resp.headers.get("Retry-After", "1"))
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.0), _MAX_RETRY_WAIT_SECONDS)
