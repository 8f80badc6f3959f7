"""A real `sluice worker` folds events into its rocksdict-backed table, which survives a restart."""

from __future__ import annotations

import asyncio
import time

import httpx
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.integration.conftest import StackFactory
from tests.integration.test_failures import keys_on
from tests.integration.test_pipeline import ingested


async def _status(url: str, tenant: str = "acme") -> tuple[int, str | None]:
    async with httpx.AsyncClient() as client:
        resp = await client.get(url, params={"tenant": tenant})
    return resp.status_code, resp.json()["state"]["status"] if resp.status_code == 200 else None


async def _until_status(url: str, wanted: str, tenant: str, timeout: float = 60.0) -> str | None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline and status != wanted:
        _code, status = await _status(url, tenant)
        await asyncio.sleep(0.3)
    return status


async def _event_count(url: str, want: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    count = -1
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            resp = await client.get(url, params={"tenant": "acme"})
            if resp.status_code == 200:
                count = resp.json()["state"]["event_count"]
                if count == want:
                    return count
            await asyncio.sleep(0.3)
    return count


async def test_table_state_survives_worker_restart(stack_factory: StackFactory) -> None:
    stack = await stack_factory(api=False)
    url = f"{stack.worker_url(0)}/sluice/exceptions/exc-42"
    await stack.produce_events(stack.topics.ingested, [ingested("exc-42", 0)])
    assert await _event_count(url, 6) == 6  # the whole chain, folded into the table

    assert stack.stop_worker(0) == 0
    store = stack.root / "worker-0"
    assert any(store.rglob("*.sst")) or any(store.rglob("CURRENT")), "no RocksDB files on disk"

    stack.start_worker(0)
    stack.wait_ready()
    # The restarted worker serves the old state before any new input ...
    assert await _event_count(url, 6) == 6
    # ... and builds on it: a second report of the same exception adds its chain.
    await stack.produce_events(stack.topics.ingested, [ingested("exc-42", 1)])
    assert await _event_count(url, 12) == 12


async def test_idempotency_and_ledger_changelogs_expire(stack_factory: StackFactory) -> None:
    """Bounded growth: expiring tables' changelogs delete by time, so recovery cannot restore
    expired keys; the exception state is kept (compaction only)."""
    stack = await stack_factory(api=False, env={"SLUICE_PROCESSED_TTL_SECONDS": "3600"})
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
    await admin.start()
    try:
        names = [
            "processed-intake",
            "processed-tool",
            "tool-ledger",
            "fingerprint-groups",
            "exceptions",
        ]
        topics = [f"{stack.app_id}-{n}-changelog" for n in names]
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
        )
    finally:
        await admin.close()
    configs = {}
    for response in described:
        for resource in response.resources:
            _code, _msg, _type, name, entries = resource[:5]
            configs[name] = {e[0]: e[1] for e in entries}
    for name in topics[:-1]:
        assert configs[name]["cleanup.policy"] == "compact,delete", name
        assert configs[name]["retention.ms"] == str(3600 * 1000), name
    assert configs[topics[-1]]["cleanup.policy"] == "compact"


async def test_closed_exceptions_past_retention_are_deleted_and_open_ones_kept(
    stack_factory: StackFactory,
) -> None:
    retention = 2.0
    stack = await stack_factory(
        api=False,
        env={
            "SLUICE_EXCEPTION_RETENTION_SECONDS": str(int(retention)),
            "SLUICE_EXCEPTION_SWEEP_SECONDS": "0.2",
        },
    )
    # All on one partition: the projection sweeps a partition when it writes there.
    closed, still_open, *fresh = keys_on(0, "retention", 6)
    url = {k: f"{stack.worker_url(0)}/sluice/exceptions/{k}" for k in [closed, still_open, *fresh]}
    await stack.produce_events(
        stack.topics.ingested, [ingested(closed, 0), ingested(still_open, 0, tenant="nobody")]
    )
    assert await _until_status(url[closed], "resolved", "acme") == "resolved"
    # No configuration for the tenant: dead-lettered at intake, in quarantine, open.
    assert await _until_status(url[still_open], "dead_lettered", "nobody") == "dead_lettered"

    await asyncio.sleep(retention + 0.5)
    for key in fresh:  # traffic on the partition, past the retention of the first two
        await stack.produce_events(stack.topics.ingested, [ingested(key, 0)])
        assert await _until_status(url[key], "resolved", "acme") == "resolved"
        if (await _status(url[closed]))[0] == 404:
            break

    assert await _status(url[closed]) == (404, None)
    assert await _status(url[still_open], "nobody") == (200, "dead_lettered")
    assert await _status(url[fresh[0]]) == (200, "resolved")
    async with httpx.AsyncClient() as client:
        exposition = (await client.get(f"{stack.worker_url(0)}/metrics")).text
    assert "sluice_exceptions_expired_total 1.0" in exposition.splitlines()
    # The deletions are in the changelogs, so a worker recovering the tables does not restore them.
    # (Faust writes a str key as JSON, a bytes key as is.)
    for table, key in [
        ("exceptions", closed.encode()),
        ("exception-fingerprints", b'"%s"' % closed.encode()),
    ]:
        records = await stack.read_topic(f"{stack.app_id}-{table}-changelog", expect=1, timeout=10)
        tombstones = [r.key for r in records if r.value is None]
        assert tombstones == [key], (table, tombstones)
