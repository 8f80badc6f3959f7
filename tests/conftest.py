"""Shared fixtures. The broker fixture lives here so unit tests never start it (it is lazy)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.kafka_local import LocalKafka


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Kafka broker for the whole session: KAFKA_BOOTSTRAP_SERVERS if set, else a local one."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@dataclass(frozen=True)
class Names:
    """Unique app id and topic prefix for one test, so tests never see each other's data."""

    app_id: str
    topic_prefix: str


@pytest.fixture
def names() -> Names:
    tag = uuid.uuid4().hex[:10]
    return Names(app_id=f"sluice-test-{tag}", topic_prefix=f"t{tag}")


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    return tmp_path
