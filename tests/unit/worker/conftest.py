"""A stage runner on in-memory ports (app.worker.memory): no broker, no Faust, no waiting.

KAFKA_BOOTSTRAP_SERVERS points at a closed port for this whole folder, so anything here that tried
to reach Kafka would fail rather than find the test session's broker.
"""

from __future__ import annotations

import random
import socket
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from agents.tool import RetryPolicy
from agents.tools import Tool
from app.stores import MappingLedger, MappingProcessedStore
from app.telemetry import Metrics
from app.topics import TopicNames
from app.worker.approvals import Approvals
from app.worker.items import Handler, Item, Output
from app.worker.memory import Generation, ManualClock, MemoryChangelog, MemoryProducer, Sleeps
from app.worker.outcomes import Recorder
from app.worker.ports import StageContext
from app.worker.registry import POLICY, Stage
from app.worker.runner import StageRunner
from app.worker.stages import Clients, StageHandlers
from app.worker.tenants import StaticTenants
from schemas.codec import decode, encode
from schemas.config import TenantConfig
from schemas.events import (
    Event,
    EventBase,
    ExceptionDiscardRequested,
    ExceptionRedriveRequested,
    OperatorRequestPayload,
)
from tests import factories
from tests.support.tenants import ACME


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


@pytest.fixture(autouse=True)
def no_broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{_closed_port()}")
    yield


@dataclass
class Rig:
    """A stage context made of in-memory ports, and what the tests read back from them."""

    producer: MemoryProducer = field(default_factory=MemoryProducer)
    changelog: MemoryChangelog = field(default_factory=MemoryChangelog)
    quarantine: dict[str, bytes] = field(default_factory=dict)
    processed: dict[str, bytes] = field(default_factory=dict)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    clock: ManualClock = field(default_factory=ManualClock)
    generation: Generation = field(default_factory=Generation)
    sleeps: Sleeps = field(default_factory=Sleeps)
    topics: TopicNames = field(default_factory=lambda: TopicNames("t"))
    retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(max_attempts=3, base_seconds=0.2, max_seconds=10.0)
    )
    offsets: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.recorder = Recorder(Metrics(self.registry), consumer_group="unit")
        self.ctx = StageContext(
            producer=self.producer,
            changelog=self.changelog,
            quarantine=self.quarantine,
            telemetry=self.recorder,
            topics=self.topics,
            clock=self.clock,
            generation=self.generation,
            retry=self.retry,
            rng=random.Random(7),  # noqa: S311 - backoff jitter, seeded for the test
            sleep=self.sleeps,
        )

    def runner(self, handler: Handler, stage: Stage[Any] = POLICY) -> StageRunner:
        return StageRunner(stage, handler, MappingProcessedStore(self.processed), self.ctx)

    def item(
        self,
        value: EventBase | bytes,
        *,
        key: bytes | None = None,
        partition: int = 0,
        stage: Stage[Any] = POLICY,
    ) -> Item:
        """The next record on ``stage``'s input topic (offsets count up per partition)."""
        topic = self.topics.of(stage.inputs[0])
        where = f"{topic}:{partition}"
        offset = self.offsets.get(where, 0)
        self.offsets[where] = offset + 1
        if isinstance(value, EventBase):
            key = key or value.exception_id.encode()
            value = encode(value)
        return Item(key, value, topic, partition, offset, 1.0e9, record=object())

    def events_to(self, suffix: str) -> list[Event]:
        return [decode(s.value or b"") for s in self.producer.to(self.topics.of(suffix))]

    def stat(self, stage: str, name: str) -> Any:
        return getattr(self.recorder.stats[stage], name)

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def held(self, stage: str, exception_id: str) -> dict[str, Any] | None:
        raw = self.quarantine.get(f"{stage}:{exception_id}")
        return None if raw is None else dict(orjson.loads(raw))


@pytest.fixture
def rig() -> Rig:
    return Rig()


class Script:
    """A stage handler that echoes its input to the ``decided`` topic, after raising what it was
    told to for each exception id (a list, consumed one per call)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []  # (event id, redriven)
        self.failures: dict[str, list[BaseException]] = {}

    def fail(self, exception_id: str, *errors: BaseException) -> None:
        self.failures.setdefault(exception_id, []).extend(errors)

    async def __call__(self, event: Event, redriven: bool = False) -> list[Output]:
        self.calls.append((str(event.event_id), redriven))
        pending = self.failures.get(event.exception_id)
        if pending:
            raise pending.pop(0)
        return [("decided", event.exception_id.encode(), event)]


@pytest.fixture
def script() -> Script:
    return Script()


def triaged(exception_id: str = "exc-1", n: int = 1) -> EventBase:
    """The ``n``-th distinct event of ``exception_id`` on the policy stage's input."""
    return factories.triaged(
        exception_id=exception_id,
        event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{exception_id}/{n}"),
    )


def request(
    kind: type[ExceptionRedriveRequested | ExceptionDiscardRequested],
    exception_id: str,
    stage: str = POLICY.name,
) -> EventBase:
    """An operator's redrive or discard of ``exception_id`` at ``stage``."""
    return kind(
        event_id=uuid.uuid4(),
        tenant_id=factories.TENANT_ID,
        exception_id=exception_id,
        sequence=1,
        occurred_at=factories.NOW,
        causation_id=None,
        correlation_id=uuid.uuid4(),
        payload=OperatorRequestPayload(stage=stage, requested_by="ops-alice", reason="fixed"),
    )


def acme() -> TenantConfig:
    """The test tenant acme (tests/support/tenants.py), its tools at a closed address."""
    return TenantConfig.model_validate(tomllib.loads(ACME.format(url="http://127.0.0.1:9")))


def acme_handlers(
    rig: Rig,
    tools: dict[str, Tool],
    *,
    ledger: dict[str, bytes] | None = None,
    approvals: dict[str, bytes] | None = None,
    decided: dict[str, bytes] | None = None,
) -> StageHandlers:
    """The chain's handlers for acme, over tables the caller keeps (they outlive a "crash")."""
    config = acme()
    clients = Clients()
    clients.tools[config.tenant_id] = tools
    return StageHandlers(
        tenants=StaticTenants(config),
        clock=rig.clock,
        fingerprints={},
        groups={},
        ledger=MappingLedger({} if ledger is None else ledger),
        retry=RetryPolicy(max_attempts=1),
        approvals=Approvals({} if approvals is None else approvals, decided),
        clients=clients,
    )
