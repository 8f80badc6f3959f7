"""A real `sluice worker` processes events into a rocksdict-backed table that survives a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer

from app.admin import ensure_topics
from app.kafka_local import free_port
from app.settings import Settings
from tests.conftest import Names
from tests.support.procs import SluiceProcess


async def _send(bootstrap: str, topic: str, key: bytes, n: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for _ in range(n):
            await producer.send_and_wait(topic, b"{}", key=key)
    finally:
        await producer.stop()


async def _count_reaches(url: str, want: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    count = -1
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            resp = await client.get(url)
            if resp.status_code == 200:
                count = resp.json()["count"]
                if count == want:
                    return count
            await asyncio.sleep(0.3)
    return count


async def test_table_state_survives_worker_restart(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SLUICE_APP_ID": names.app_id,
        "SLUICE_TOPIC_PREFIX": names.topic_prefix,
        "SLUICE_PARTITIONS": "4",
        "SLUICE_STATE_DIR": str(tmp_path / "state"),
        "SLUICE_WORKER_WEB_PORT": str(port),
    }
    settings = Settings(
        **{"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
        topic_prefix=names.topic_prefix,
        partitions=4,
    )  # type: ignore[arg-type]
    await ensure_topics(settings)
    topic = f"{names.topic_prefix}.ingested"
    url = f"http://127.0.0.1:{port}/tally/exc-42/"

    worker = SluiceProcess(["worker"], env, tmp_path / "worker.log").start()
    try:
        worker.wait_http(url)
        await _send(kafka_bootstrap, topic, b"exc-42", 5)
        assert await _count_reaches(url, 5) == 5
        assert worker.stop() == 0, worker.log_tail()

        store = tmp_path / "state" / "worker"
        assert any(p.name == "tables" for p in store.rglob("tables")), "no RocksDB store on disk"

        worker = SluiceProcess(["worker"], env, tmp_path / "worker.log").start()
        worker.wait_http(url)
        # Before new input the restarted worker already serves the old state ...
        assert await _count_reaches(url, 5) == 5
        # ... and keeps counting from it rather than from zero or from a replay.
        await _send(kafka_bootstrap, topic, b"exc-42", 2)
        assert await _count_reaches(url, 7) == 7
    finally:
        worker.stop()
