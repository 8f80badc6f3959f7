"""Rate limits of the API: the token bucket itself, a tenant's [limits] on both ingest routes, and
the budget of failed authentications per client address.

The limited tenant here refills so slowly (one token in 100 s) that no token comes back while a test
runs, so what is refused does not depend on how fast the machine is; refilling is tested on the
bucket alone, by waiting longer than a token takes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from api.limits import AuthFailureThrottle, TokenBucket
from api.main import create_api
from app.settings import Settings
from app.telemetry.prometheus import REGISTRY
from schemas.config import ConfigError
from tests.unit.api.conftest import FakeProducer, auth, make_settings, report

BURST = 3
FAILURES = 3  # SLUICE_AUTH_FAILURES_PER_MINUTE here


def rate_limited(tenant: str) -> float:
    return REGISTRY.get_sample_value("sluice_api_rate_limited_total", {"tenant": tenant}) or 0.0


def throttled() -> float:
    labels = {"reason": "auth_throttled"}
    return REGISTRY.get_sample_value("sluice_api_denials_total", labels) or 0.0


def write_tenants(config_dir: Path, globex_limits: str) -> None:
    folder = config_dir / "tenants"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "acme.toml").write_text('tenant_id = "acme"\n')
    (folder / "globex.toml").write_text(f'tenant_id = "globex"\n\n[limits]\n{globex_limits}\n')


@pytest.fixture
def settings(config_dir: Path) -> Settings:
    write_tenants(config_dir, f"ingest_per_second = 0.01\ningest_burst = {BURST}")
    return make_settings(config_dir, auth_failures_per_minute=FAILURES)


@pytest.fixture
async def elsewhere(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client from another address than ``client`` (127.0.0.1)."""
    transport = httpx.ASGITransport(app=app, client=("10.0.0.2", 4242))
    async with httpx.AsyncClient(transport=transport, base_url="http://sluice.test") as c:
        yield c


def assert_429(resp: httpx.Response) -> int:
    assert resp.status_code == 429, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    wait = int(resp.headers["Retry-After"])  # whole seconds
    assert wait >= 1
    return wait


# ------------------------------------------------------------------------------------ the bucket


async def test_a_bucket_gives_its_burst_then_refuses_taking_nothing() -> None:
    bucket = TokenBucket(per_second=0.5, burst=4)
    assert await bucket.take(4) is None
    # Whole seconds until the tokens asked for are back: 2 s a token at 0.5 a second.
    assert await bucket.take(1) == 2
    assert await bucket.take(3) == 6
    assert await bucket.take(4) == 8
    assert await bucket.take(1) == 2  # the refusals took nothing
    with pytest.raises(ValueError, match="can never be taken"):
        await bucket.take(5)


async def test_a_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(per_second=20, burst=2)
    assert await bucket.take(2) is None
    assert await bucket.take(1) == 1  # a twentieth of a second away, said as whole seconds
    await asyncio.sleep(0.2)  # four tokens' worth; the bucket holds two
    assert await bucket.take(2) is None
    assert bucket.waiting() is not None


async def test_a_wait_under_a_second_is_said_as_one() -> None:
    bucket = TokenBucket(per_second=1000, burst=1000)
    assert await bucket.take(1000) is None
    assert await bucket.take(1) == 1


# ------------------------------------------------------------------------- a tenant's [limits]


async def test_a_limited_tenant_gets_its_burst_then_429(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    before = rate_limited("globex")
    for _ in range(BURST):
        resp = await client.post("/v1/exceptions", json=report(), headers=auth("globex"))
        assert resp.status_code == 202, resp.text
    resp = await client.post("/v1/exceptions", json=report(), headers=auth("globex"))
    wait = assert_429(resp)
    assert wait == 100  # one token at 0.01 a second
    detail = resp.json()["detail"]
    assert "Tenant 'globex' may report 0.01 exceptions a second, 3 at once" in detail
    assert "nothing of it was accepted" in detail
    assert len(producer.sent) == BURST
    assert rate_limited("globex") == before + 1


async def test_a_batch_costs_one_token_an_item_and_is_refused_whole(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    items = [report(message="one"), {"source": "invalid: no error_type"}]
    first = await client.post("/v1/exceptions:batch", json={"items": items}, headers=auth("globex"))
    assert first.status_code == 200, first.text
    assert [r["status_code"] for r in first.json()["results"]] == [202, 422]  # both cost a token
    assert len(producer.sent) == 1

    two = {"items": [report(message="two"), report(message="three")]}
    refused = await client.post("/v1/exceptions:batch", json=two, headers=auth("globex"))
    assert assert_429(refused) == 100  # one token is there: the second comes in 100 s
    assert "this batch of 2 (each item counts)" in refused.json()["detail"]
    assert len(producer.sent) == 1  # nothing of the batch went to Kafka

    # The refused batch took nothing: the last token is still there for one report.
    one = await client.post(
        "/v1/exceptions:batch", json={"items": [report()]}, headers=auth("globex")
    )
    assert one.status_code == 200
    assert one.json()["accepted"] == 1
    assert len(producer.sent) == 2


async def test_a_batch_larger_than_the_burst_is_422_not_429(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    body = {"items": [report(message=str(i)) for i in range(BURST + 1)]}
    resp = await client.post("/v1/exceptions:batch", json=body, headers=auth("globex"))
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert "at most 3 exceptions at once ([limits] ingest_burst)" in resp.json()["detail"]
    assert resp.json()["errors"][0]["field"] == "items"
    assert producer.sent == []
    # ... and it took no tokens.
    body = {"items": [report(message=str(i)) for i in range(BURST)]}
    resp = await client.post("/v1/exceptions:batch", json=body, headers=auth("globex"))
    assert resp.json()["accepted"] == BURST


async def test_an_unlimited_tenant_is_never_refused(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    for i in range(60):
        resp = await client.post("/v1/exceptions", json=report(message=str(i)), headers=auth())
        assert resp.status_code == 202, resp.text
    batch = {"items": [report(message=str(i)) for i in range(5)]}
    for _ in range(10):
        resp = await client.post("/v1/exceptions:batch", json=batch, headers=auth())
        assert resp.json()["accepted"] == 5
    assert rate_limited("acme") == 0.0


async def test_a_replay_of_an_accepted_report_is_not_charged(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    first = await client.post(
        "/v1/exceptions", json=report(), headers=auth("globex", **{"Idempotency-Key": "k-1"})
    )
    assert first.status_code == 202
    for _ in range(BURST * 3):
        again = await client.post(
            "/v1/exceptions", json=report(), headers=auth("globex", **{"Idempotency-Key": "k-1"})
        )
        assert again.status_code == 202, again.text
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == first.json()
    # The replays took nothing: two tokens are left of three.
    for key in ("k-2", "k-3"):
        resp = await client.post(
            "/v1/exceptions", json=report(), headers=auth("globex", **{"Idempotency-Key": key})
        )
        assert resp.status_code == 202, resp.text
    refused = await client.post(
        "/v1/exceptions", json=report(), headers=auth("globex", **{"Idempotency-Key": "k-4"})
    )
    assert_429(refused)
    # The refused request let go of its key: a retry is refused for the limit again, not 409.
    retry = await client.post(
        "/v1/exceptions", json=report(), headers=auth("globex", **{"Idempotency-Key": "k-4"})
    )
    assert_429(retry)
    assert len(producer.sent) == BURST


async def test_the_openapi_documents_the_429s(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    for path in ("/v1/exceptions", "/v1/exceptions:batch"):
        answer = doc["paths"][path]["post"]["responses"]["429"]
        assert "[limits]" in answer["description"]
        assert "application/problem+json" in answer["content"]
    reads = doc["paths"]["/v1/exceptions/{exception_id}"]["get"]["responses"]
    assert "failed authentication" in reads["429"]["description"]


async def test_invalid_limits_stop_startup_naming_the_file(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    (config_dir).mkdir()
    (config_dir / "api_keys.toml").write_text("")
    write_tenants(config_dir, "ingest_per_second = 10\ningest_burst = 5")
    api = create_api(make_settings(config_dir))
    with pytest.raises(ConfigError, match=r"globex\.toml: limits: .*ingest_burst \(5\) must be"):
        async with api.router.lifespan_context(api):
            pass


async def test_without_a_tenants_folder_the_api_starts_unlimited_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "api_keys.toml").write_text("")
    api = create_api(make_settings(config_dir))
    with caplog.at_level(logging.WARNING, logger="sluice.api"):
        async with api.router.lifespan_context(api):
            assert api.state.runtime.ingest_limits.limits == {}
    assert "no tenant has ingest limits in this API process" in caplog.text


# ------------------------------------------------------------- failed authentications per address


async def test_an_address_past_its_budget_of_401s_gets_429_whatever_its_key(
    client: httpx.AsyncClient, elsewhere: httpx.AsyncClient, producer: FakeProducer
) -> None:
    before = throttled()
    for _ in range(5):  # successful requests cost nothing
        assert (
            await client.post("/v1/exceptions", json=report(), headers=auth())
        ).status_code == 202
    for headers in ({"X-API-Key": "guess-1"}, {}, {"X-API-Key": "guess-2"}):
        assert (
            await client.post("/v1/exceptions", json=report(), headers=headers)
        ).status_code == 401
    guess = await client.post("/v1/exceptions", json=report(), headers={"X-API-Key": "guess-3"})
    assert assert_429(guess) == 20  # a failure's worth comes back every 20 s at 3 a minute
    assert "Too many requests from 127.0.0.1 failed authentication" in guess.json()["detail"]
    # A valid key is refused too: otherwise the answer would tell which guess was right.
    valid = await client.post("/v1/exceptions", json=report(), headers=auth())
    assert_429(valid)
    assert_429(await client.get("/v1/exceptions", headers=auth()))
    assert throttled() == before + 3
    assert len(producer.sent) == 5

    # Another address is not affected, nor are the routes that need no key.
    assert (
        await elsewhere.post("/v1/exceptions", json=report(), headers=auth())
    ).status_code == 202
    assert (await elsewhere.post("/v1/exceptions", json=report())).status_code == 401
    assert (await client.get("/healthz")).status_code == 200


async def test_403s_do_not_count_against_the_budget(
    client: httpx.AsyncClient, producer: FakeProducer
) -> None:
    viewer = {"X-API-Key": "acme-viewer-key"}
    for _ in range(FAILURES * 3):
        assert (
            await client.post("/v1/exceptions", json=report(), headers=viewer)
        ).status_code == 403
    assert (await client.post("/v1/exceptions", json=report(), headers=auth())).status_code == 202


async def test_a_budget_of_zero_turns_the_throttle_off(config_dir: Path) -> None:
    api = create_api(make_settings(config_dir, auth_failures_per_minute=0))
    transport = httpx.ASGITransport(app=api)
    async with (
        api.router.lifespan_context(api),
        httpx.AsyncClient(transport=transport, base_url="http://sluice.test") as client,
    ):
        for _ in range(50):
            resp = await client.get("/v1/exceptions", headers={"X-API-Key": "guess"})
            assert resp.status_code == 401
        assert len(api.state.runtime.auth_throttle) == 0


async def test_the_throttle_forgets_refilled_addresses_and_stays_bounded() -> None:
    throttle = AuthFailureThrottle(per_minute=60_000, max_addresses=10)
    for i in range(10):
        await throttle.failed(f"10.0.0.{i}")
    await asyncio.sleep(0.01)  # 1000 failures a second come back: every bucket is full again
    await throttle.failed("10.0.1.1")
    assert len(throttle) == 1
    small = AuthFailureThrottle(per_minute=1, max_addresses=3)
    for i in range(10):
        await small.failed(f"10.0.2.{i}")
        assert len(small) <= 3
    assert small.waiting("10.0.2.9") is not None
    assert small.waiting("10.0.2.0") is None  # forgotten: the bound trades memory for leniency
