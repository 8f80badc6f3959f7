"""The worker's consumer: which partitions it seeks to their start after a rebalance."""

from __future__ import annotations

from aiokafka import TopicPartition

from app.consumer import uncommitted


def test_partitions_without_a_committed_offset_are_the_ones_sought_to_their_start() -> None:
    committed: dict[TopicPartition, int | None] = {
        TopicPartition("p.ingested", 0): None,  # never committed
        TopicPartition("p.ingested", 1): 0,  # committed at the start: aiokafka skips it too
        TopicPartition("p.ingested", 2): 17,  # aiokafka seeks this one itself
        TopicPartition("app-exceptions-changelog", 0): None,  # a table's: recovery owns it
    }
    sources = {"p.ingested"}

    assert uncommitted(committed, sources.__contains__) == [
        TopicPartition("p.ingested", 0),
        TopicPartition("p.ingested", 1),
    ]
