"""Topic administration: create Sluice's topics with the configured partition count, idempotently.

Stage topics must exist with the same partition count as the tables' changelog topics (Faust refuses
to run otherwise), so Sluice creates them explicitly instead of relying on broker auto-creation.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app.settings import Settings
from app.topics import TopicNames


async def ensure_topics(settings: Settings, names: list[str] | None = None) -> list[str]:
    """Create the missing topics; return the names created. Existing topics are left as they are."""
    wanted = names if names is not None else TopicNames(settings.topic_prefix).all()
    client = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await client.start()
    try:
        existing = set(await client.list_topics())
        missing = [n for n in wanted if n not in existing]
        if missing:
            # Another worker or API may create one between list and create: that is fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                await client.create_topics(
                    [NewTopic(n, settings.partitions, settings.replication_factor) for n in missing]
                )
        return missing
    finally:
        await client.close()


async def ensure_changelogs(settings: Settings, app: Any) -> list[str]:
    """Create the Faust app's table changelog topics the way Faust would (compacted, the tables'
    extra configs, the stage topics' partition count), before the worker's consumer starts."""
    client = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await client.start()
    try:
        existing = set(await client.list_topics())
        wanted = []
        for table in app.tables.values():
            name = table.changelog_topic.get_topic_name()
            if name in existing:
                continue
            configs = {"cleanup.policy": "compact", **dict(table.extra_topic_configs or {})}
            wanted.append(
                NewTopic(
                    name,
                    settings.partitions,
                    settings.replication_factor,
                    topic_configs={k: str(v) for k, v in configs.items()},
                )
            )
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await client.create_topics(wanted)
        return [t.name for t in wanted]
    finally:
        await client.close()


async def metadata_error(bootstrap: str, within: float) -> Exception | None:
    """None when the cluster at ``bootstrap`` answers a metadata request within ``within`` seconds,
    else the error (one attempt)."""
    client = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=max(1, int(within * 1000))
    )
    try:
        async with asyncio.timeout(within):
            await client.start()
            await client.describe_cluster()
    except Exception as exc:  # any failure means "not reachable now"; the caller reports it
        return exc
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    return None


async def broker_problem(settings: Settings, within: float = 2.0) -> str | None:
    """None when the cluster answers a metadata request within ``within`` seconds, else why not."""
    exc = await metadata_error(settings.kafka_bootstrap_servers, within)
    if exc is None:
        return None
    return (
        f"Kafka at {settings.kafka_bootstrap_servers} did not answer: {exc or type(exc).__name__}"
    )
