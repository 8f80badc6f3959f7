"""A real `sluice worker` folds events into its rocksdict-backed table, which survives a restart."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.integration.conftest import StackFactory
from tests.integration.test_pipeline import ingested


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
