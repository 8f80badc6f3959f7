"""The local broker is a real Kafka: produce with acks=all and an idempotent producer, consume back."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.conftest import Names


async def test_produce_and_consume_through_the_real_broker(
    kafka_bootstrap: str, names: Names
) -> None:
    topic = f"{names.topic_prefix}.roundtrip"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 3, 1)])
    cluster = await admin.describe_cluster()
    await admin.close()
    assert len(cluster["brokers"]) == 1

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    sent = {}
    try:
        for i in range(30):
            key = f"exc-{i % 5}".encode()
            md = await producer.send_and_wait(topic, f"v{i}".encode(), key=key)
            sent.setdefault(key, []).append((md.partition, f"v{i}".encode()))
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=names.app_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: dict[bytes, list[tuple[int, bytes]]] = {}
    try:
        while sum(len(v) for v in got.values()) < 30:
            batch = await consumer.getmany(timeout_ms=10_000)
            assert batch, "the broker returned nothing within 10 s"
            for tp, records in batch.items():
                for r in records:
                    assert r.key is not None and r.value is not None
                    got.setdefault(r.key, []).append((tp.partition, r.value))
    finally:
        await consumer.stop()
    # Same key -> same partition, and per-key order is the order of the writes.
    assert got == sent
