"""A whole Sluice deployment for one test: N worker processes and an API process, started the way
a user starts them (`sluice worker`, `sluice api`), against the session's real broker, with tools
pointing at a loopback mock server."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from app.admin import ensure_topics
from app.kafka_local import free_port
from app.settings import Settings
from app.topics import TopicNames
from schemas.codec import encode
from schemas.config import Role
from schemas.events import EventBase
from tests.support.procs import SluiceProcess
from tests.support.tenants import KEYS, ROLE_KEYS, write_config

PARTITIONS = 4
_partitioner = DefaultPartitioner()


def partition_of(key: bytes) -> int:
    """The partition Kafka's default partitioner (the API's and the workers') gives ``key``."""
    parts = list(range(PARTITIONS))
    return int(_partitioner(key, parts, parts))


@dataclass
class Stack:
    bootstrap: str
    app_id: str
    topic_prefix: str
    root: Path
    tools_url: str
    workers: dict[int, SluiceProcess] = field(default_factory=dict)
    worker_ports: dict[int, int] = field(default_factory=dict)
    api: SluiceProcess | None = None
    api_port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def topics(self) -> TopicNames:
        return TopicNames(self.topic_prefix)

    @property
    def settings(self) -> Settings:
        return Settings.model_validate(
            {
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "topic_prefix": self.topic_prefix,
                "partitions": PARTITIONS,
                "app_id": self.app_id,
            }
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def worker_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.worker_ports[i]}"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "SLUICE_APP_ID": self.app_id,
            "SLUICE_TOPIC_PREFIX": self.topic_prefix,
            "SLUICE_PARTITIONS": str(PARTITIONS),
            "SLUICE_CONFIG_DIR": str(self.root / "config"),
            "SLUICE_TOOL_BACKOFF_BASE_SECONDS": "0.05",
            "SLUICE_TOOL_BACKOFF_MAX_SECONDS": "0.5",
            **self.extra_env,
            **extra,
        }

    async def prepare(self) -> None:
        write_config(self.root / "config", self.tools_url)
        await ensure_topics(self.settings)

    def start_worker(self, i: int = 0) -> SluiceProcess:
        port = self.worker_ports.setdefault(i, free_port())
        proc = SluiceProcess(
            ["worker"],
            self.env(
                SLUICE_WORKER_WEB_PORT=str(port),
                SLUICE_WORKER_DATA_DIR=str(self.root / f"worker-{i}"),
            ),
            self.root / f"worker-{i}.log",
        ).start()
        self.workers[i] = proc
        return proc

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until every running worker has partitions and recovered tables, and the API is up."""
        for i, proc in self.workers.items():
            proc.wait_http(f"{self.worker_url(i)}/sluice/ready", timeout)
        if self.api is not None:
            self.api.wait_http(f"{self.api_url}/healthz", timeout)

    def start_api(self) -> SluiceProcess:
        self.api_port = self.api_port or free_port()
        # One worker is enough: it routes each read to the worker owning the partition.
        urls = f'["{self.worker_url(0)}"]'
        self.api = SluiceProcess(
            ["api", "--port", str(self.api_port)],
            self.env(SLUICE_WORKER_URLS=urls),
            self.root / "api.log",
        ).start()
        return self.api

    def stop_worker(self, i: int, sig: int = signal.SIGTERM) -> int:
        return self.workers.pop(i).stop(sig)

    def stop(self) -> None:
        for i in list(self.workers):
            self.stop_worker(i)
        if self.api is not None:
            self.api.stop()
            self.api = None

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}"
            for p in sorted(self.root.glob("*.log"))
        )

    # -------------------------------------------------------------------------------- clients

    def headers(self, tenant: str = "acme", role: Role = "admin", **extra: str) -> dict[str, str]:
        """Headers with the tenant's admin key, or acme's key of another role."""
        key = KEYS[tenant] if role == "admin" else ROLE_KEYS[role]
        return {"X-API-Key": key, **extra}

    async def produce_events(self, topic: str, events: Iterable[EventBase]) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            futures = [
                await producer.send(topic, encode(e), key=e.exception_id.encode()) for e in events
            ]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    async def read_topic(self, topic: str, expect: int, timeout: float = 120.0) -> list[Any]:
        """Every record of ``topic`` (in per-partition offset order), once ``expect`` have arrived."""
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while len(records) < expect and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=1000)
                for recs in batch.values():
                    records.extend(recs)
            # Anything more than expected is a duplicate we want to see: drain briefly.
            batch = await consumer.getmany(timeout_ms=1500)
            for recs in batch.values():
                records.extend(recs)
        finally:
            await consumer.stop()
        return records

    async def trace_in_kafka(self, keys: Iterable[str]) -> str:
        """Where the records of these exceptions sit in Kafka, for a failure message: each stage
        topic's records with one of these keys (partition@offset and event type), and the worker
        group's committed offset of those partitions."""
        from aiokafka.admin import AIOKafkaAdminClient

        wanted = {k.encode() for k in keys}
        partitions = [TopicPartition(t, p) for t in self.topics.all() for p in range(PARTITIONS)]
        found = [
            (tp.topic, tp.partition, r.offset, r.key, _event_type(r.value))
            for tp, r in await self.read_partitions(partitions)
            if r.key in wanted
        ]
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(self.app_id)
        finally:
            await admin.close()
        lines = []
        for topic, partition, offset, key, kind in sorted(found):
            done = {tp.partition: m.offset for tp, m in committed.items() if tp.topic == topic}
            lines.append(
                f"{key.decode()} {topic}[{partition}]@{offset} {kind} "
                f"(group committed {done.get(partition)})"
            )
        return "\n".join(lines) or "no records with these keys"

    async def read_partitions(
        self, partitions: list[TopicPartition]
    ) -> list[tuple[TopicPartition, Any]]:
        """Every record of these partitions, from their start to the end they have now."""
        found: list[tuple[TopicPartition, Any]] = []
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None
        )
        await consumer.start()
        try:
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            pending = {tp for tp, end in ends.items() if end > 0}
            while pending:
                batch = await consumer.getmany(*pending, timeout_ms=1000)
                found += [(tp, r) for tp, recs in batch.items() for r in recs]
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
        finally:
            await consumer.stop()
        return found

    async def misplaced_table_writes(self) -> list[str]:
        """Changelog records of the tables kept per exception that sit in another partition than
        the exception's (its id's partition, where its events and lookups are). Such a write is
        invisible to the lookups, and after a rebalance it moves with the wrong partition. The
        group stage's quarantine entries are left out: its input is keyed by fingerprint group."""
        tables = ("quarantine", "tool-ledger", "exceptions", "exception-fingerprints")
        partitions = [
            TopicPartition(f"{self.app_id}-{table}-changelog", p)
            for table in tables
            for p in range(PARTITIONS)
        ]
        misplaced = []
        for tp, record in await self.read_partitions(partitions):
            key = record.key.decode()
            key = orjson.loads(key) if key.startswith('"') else key  # str keys are JSON
            if tp.topic.endswith("-quarantine-changelog"):
                stage, exception_id = key.split(":", 1)
                if stage == "group":
                    continue
            else:
                exception_id = key.split(":", 1)[0]  # a ledger key starts with it
            home = partition_of(exception_id.encode())
            if home != tp.partition:
                misplaced.append(
                    f"{tp.topic}[{tp.partition}]@{record.offset} {key!r}: its exception is on "
                    f"partition {home}"
                )
        return misplaced

    async def wait_for_state(
        self, exception_id: str, status: Iterable[str], tenant: str = "acme", timeout: float = 90.0
    ) -> dict[str, Any]:
        wanted = set(status)
        deadline = time.monotonic() + timeout
        last: Any = None
        async with httpx.AsyncClient(base_url=self.api_url, timeout=10) as client:
            while time.monotonic() < deadline:
                resp = await client.get(
                    f"/v1/exceptions/{exception_id}", headers=self.headers(tenant)
                )
                last = (resp.status_code, resp.text)
                if resp.status_code == 200 and resp.json()["status"] in wanted:
                    body: dict[str, Any] = resp.json()
                    return body
                await asyncio.sleep(0.3)
        raise AssertionError(f"{exception_id} never reached {wanted}: last {last}\n{self.logs()}")


def _event_type(value: bytes | None) -> str:
    """A record's event type, or why it has none (a poison record is data to report, not fail on)."""
    try:
        return str(orjson.loads(value or b"")["event_type"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "(not an event)"
