"""Roles on API keys, with `sluice api` started as a user starts it, against the real broker: what each
role may do, who an operator's request names, and api_keys.toml changed under the running API."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.admin import ensure_topics
from app.kafka_local import free_port
from app.settings import Settings
from app.topics import TopicNames
from tests.conftest import Names
from tests.integration.conftest import StackFactory
from tests.integration.test_pipeline import PAYMENT
from tests.support.mock_http import MockHTTPServer
from tests.support.procs import SluiceProcess
from tests.support.tenants import api_keys_toml

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------ api_keys.toml changes


ENTRIES = [
    ("acme", "ci", "producer", "it-ci-key"),
    ("acme", "laptop", "producer", "it-laptop-key"),
]
REPORT = {"source": "payments", "error_type": "PaymentDeclined", "message": "Card declined"}


@dataclass
class KeyedApi:
    url: str
    keys_file: Path
    process: SluiceProcess


@pytest.fixture
async def keyed_api(kafka_bootstrap: str, names: Names, tmp_path: Path) -> AsyncIterator[KeyedApi]:
    """`sluice api` alone (no worker: these tests only report) with two producer keys."""
    settings = Settings.model_validate(
        {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "topic_prefix": names.topic_prefix}
    )
    await ensure_topics(settings, [TopicNames(names.topic_prefix).ingested])
    config = tmp_path / "config"
    config.mkdir()
    keys_file = config / "api_keys.toml"
    keys_file.write_text(api_keys_toml(ENTRIES))
    port = free_port()
    process = SluiceProcess(
        ["api", "--port", str(port)],
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "SLUICE_TOPIC_PREFIX": names.topic_prefix,
            "SLUICE_CONFIG_DIR": str(config),
            "SLUICE_WORKER_URLS": json.dumps([f"http://127.0.0.1:{free_port()}"]),
        },
        tmp_path / "api.log",
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_http(f"{url}/readyz")
        yield KeyedApi(url, keys_file, process)
    finally:
        process.stop()


async def report_with(client: httpx.AsyncClient, api: KeyedApi, key: str) -> int:
    resp = await client.post(f"{api.url}/v1/exceptions", json=REPORT, headers={"X-API-Key": key})
    return resp.status_code


async def test_a_key_removed_from_the_file_is_refused_within_5_seconds_without_a_restart(
    keyed_api: KeyedApi,
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        assert await report_with(client, keyed_api, "it-laptop-key") == 202
        keyed_api.keys_file.write_text(api_keys_toml(ENTRIES[:1]))  # the laptop's key is revoked
        removed_at = time.monotonic()
        while (status := await report_with(client, keyed_api, "it-laptop-key")) != 401:
            assert status == 202
            assert time.monotonic() - removed_at < 5.0, "the removed key was accepted after 5 s"
            await asyncio.sleep(0.05)
        refused_after = time.monotonic() - removed_at
        log.info("a key removed from api_keys.toml was refused after %.2f s", refused_after)
        assert await report_with(client, keyed_api, "it-ci-key") == 202
    assert keyed_api.process.proc is not None and keyed_api.process.proc.poll() is None


async def test_a_malformed_rewrite_keeps_the_keys_and_logs_one_error(
    keyed_api: KeyedApi,
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        keyed_api.keys_file.write_text(api_keys_toml(ENTRIES) + "[[keys]\nbroken")
        # Well past the time a good change takes: the old keys still work all along.
        until = time.monotonic() + 4.0
        while time.monotonic() < until:
            assert await report_with(client, keyed_api, "it-laptop-key") == 202
            await asyncio.sleep(0.2)
        errors = [
            line
            for line in keyed_api.process.log_tail().splitlines()
            if "api_keys.toml" in line and "ERROR" in line
        ]
        assert len(errors) == 1, keyed_api.process.log_tail()
        assert "is not valid TOML" in errors[0]
        assert "keeps using the 2 API keys it had" in errors[0]

        # A good version after it is used: the laptop's key goes.
        keyed_api.keys_file.write_text(api_keys_toml(ENTRIES[:1]))
        deadline = time.monotonic() + 5.0
        while await report_with(client, keyed_api, "it-laptop-key") != 401:
            assert time.monotonic() < deadline, keyed_api.process.log_tail()
            await asyncio.sleep(0.1)
        metrics = (await client.get(f"{keyed_api.url}/metrics")).text
    assert 'sluice_api_keys_reloads_total{result="refused"} 1.0' in metrics
    assert 'sluice_api_keys_reloads_total{result="ok"} 1.0' in metrics
    assert 'sluice_api_denials_total{reason="unknown_key"} 1.0' in metrics
    assert 'sluice_api_keys{role="producer"} 1.0' in metrics
