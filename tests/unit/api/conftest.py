"""Fixtures for the API's unit tests: an app with a tmp config dir and no broker, and fakes.

The app's Kafka bootstrap points at a closed loopback port, so its producer never connects (sends fail
fast with 503) and no test here needs Kafka. Tests of accepted requests replace the producer (and the
worker reader) with the in-memory fakes below through ``app.dependency_overrides``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from api.deps import get_producer, get_reader
from api.main import create_api
from api.producer import OutgoingRecord, SendFailure
from api.reader import WorkerUnavailable
from app.kafka_local import free_port
from app.settings import Settings
from schemas.api import ExceptionListPublic
from schemas.config import Role
from schemas.state import ExceptionRecord

KEYS = {"acme": "acme-secret-key", "globex": "globex-secret-key"}
"""Each tenant's admin key: it may use every route."""
ROLE_KEYS: dict[Role, str] = {
    "producer": "acme-producer-key",
    "viewer": "acme-viewer-key",
    "operator": "acme-operator-key",
    "admin": KEYS["acme"],
}
"""A key of each role, all of tenant acme."""


@dataclass(frozen=True)
class Key:
    tenant: str
    key: str
    role: Role
    name: str


def all_keys() -> list[Key]:
    admins = [Key(tenant, key, "admin", f"{tenant} admin") for tenant, key in KEYS.items()]
    others = [
        Key("acme", key, role, f"acme {role}") for role, key in ROLE_KEYS.items() if role != "admin"
    ]
    return admins + others


def api_keys_toml(keys: Sequence[Key]) -> str:
    return "".join(
        f'[[keys]]\ntenant_id = "{k.tenant}"\nname = "{k.name}"\nrole = "{k.role}"\n'
        f'sha256 = "{hashlib.sha256(k.key.encode()).hexdigest()}"\n\n'
        for k in keys
    )


def write_api_keys(config_dir: Path, keys: Sequence[Key] | None = None) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "api_keys.toml"
    path.write_text(api_keys_toml(all_keys() if keys is None else keys))
    return path


def make_settings(config_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "config_dir": config_dir,
        "topic_prefix": "unit",
        "worker_urls": [f"http://127.0.0.1:{free_port()}"],
        "max_body_bytes": 4096,
        "max_batch_items": 5,
        "produce_timeout_seconds": 1.0,
        "worker_read_timeout_seconds": 2.0,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    write_api_keys(tmp_path / "config")
    return tmp_path / "config"


@pytest.fixture
def settings(config_dir: Path) -> Settings:
    return make_settings(config_dir)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The app with its lifespan running (httpx's ASGITransport does not run it)."""
    api = create_api(settings)
    async with api.router.lifespan_context(api):
        yield api


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sluice.test"
    ) as c:
        yield c


@asynccontextmanager
async def api_client(worker_urls: list[str], config_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The API, lifespan running, reading through these worker URLs."""
    api = create_api(make_settings(config_dir, worker_urls=worker_urls))
    async with (
        api.router.lifespan_context(api),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url="http://sluice.test"
        ) as client,
    ):
        yield client


def auth(tenant: str = "acme", **headers: str) -> dict[str, str]:
    """Headers with the tenant's admin key."""
    return {"X-API-Key": KEYS[tenant], **headers}


def as_role(role: Role, **headers: str) -> dict[str, str]:
    """Headers with acme's key of this role."""
    return {"X-API-Key": ROLE_KEYS[role], **headers}


def report(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "source": "payments-gateway",
        "error_type": "CardDeclined",
        "message": "Card declined for order 1042",
        "attributes": {"order_id": "1042"},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


@dataclass
class FakeProducer:
    """Records what would go to Kafka; ``fail`` answers every send with that failure, ``gate`` holds
    sends until it is set (to keep a request in flight)."""

    sent: list[OutgoingRecord] = field(default_factory=list)
    fail: SendFailure | None = None
    gate: asyncio.Event | None = None
    calls: int = 0

    async def send_many(self, records: Sequence[OutgoingRecord]) -> list[SendFailure | None]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            return [self.fail] * len(records)
        self.sent.extend(records)
        return [None] * len(records)

    async def probe(self) -> str | None:
        return None if self.fail is None else self.fail.detail


@dataclass
class FakeReader:
    """The workers' read path in memory: records by exception id; ``down`` makes every read fail."""

    records: dict[str, ExceptionRecord] = field(default_factory=dict)
    down: bool = False
    asked: list[tuple[str, str]] = field(default_factory=list)

    async def get_exception(self, tenant_id: str, exception_id: str) -> ExceptionRecord | None:
        self.asked.append((tenant_id, exception_id))
        if self.down:
            raise WorkerUnavailable("no worker (fake)")
        record = self.records.get(exception_id)
        return record if record is not None and record.state.tenant_id == tenant_id else None

    async def list_exceptions(self, tenant_id: str, **params: object) -> ExceptionListPublic:
        if self.down:
            raise WorkerUnavailable("no worker (fake)")
        items = [r.state for r in self.records.values() if r.state.tenant_id == tenant_id]
        return ExceptionListPublic(items=items, next_cursor=None)


@pytest.fixture
def producer(app: FastAPI) -> FakeProducer:
    fake = FakeProducer()
    app.dependency_overrides[get_producer] = lambda: fake
    return fake


@pytest.fixture
def reader(app: FastAPI) -> FakeReader:
    fake = FakeReader()
    app.dependency_overrides[get_reader] = lambda: fake
    return fake
