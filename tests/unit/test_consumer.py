"""The worker's consumer: which partitions it seeks to their start after a rebalance, and the
livelock check on partitions that have no fetch position yet."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import TopicPartition
from faust.types import TP

from app.consumer import Consumer, positioned, uncommitted


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


class _State:
    def __init__(self, position: int | None) -> None:
        self.has_valid_position = position is not None


class _Thread:
    """Faust's consumer thread as far as the livelock check goes: aiokafka's subscription state,
    and a check that asserts on a partition without a position as aiokafka's does."""

    def __init__(self, states: dict[TopicPartition, _State]) -> None:
        self.states = states
        self.checked: list[TP] = []
        assignment = SimpleNamespace(state_value=states.get)
        self._consumer = SimpleNamespace(
            _fetcher=SimpleNamespace(
                _subscriptions=SimpleNamespace(subscription=SimpleNamespace(assignment=assignment))
            )
        )

    def _ensure_consumer(self) -> Any:
        return self._consumer

    def verify_event_path(self, now: float, tp: TP) -> None:
        self.checked.append(tp)
        state = self.states.get(TopicPartition(tp.topic, tp.partition))
        assert state is not None and state.has_valid_position


def _consumer(thread: _Thread) -> Consumer:
    consumer = Consumer.__new__(Consumer)  # the check needs no broker, app or service state
    consumer._thread = cast(Any, thread)
    return consumer


def test_the_livelock_check_skips_a_partition_assigned_but_not_positioned_yet() -> None:
    fresh, moving = TP("p.planned", 0), TP("p.planned", 1)
    thread = _Thread(
        {TopicPartition("p.planned", 0): _State(None), TopicPartition("p.planned", 1): _State(7)}
    )
    consumer = _consumer(thread)

    consumer.verify_event_path(0.0, fresh)  # aiokafka's assertion does not escape
    consumer.verify_event_path(0.0, moving)

    assert thread.checked == [fresh, moving]
    assert not positioned(thread, fresh)
    assert positioned(thread, moving)


def test_the_livelock_check_still_raises_what_is_not_about_a_missing_position() -> None:
    class Broken(_Thread):
        def verify_event_path(self, now: float, tp: TP) -> None:
            raise AssertionError("something else")

    consumer = _consumer(Broken({TopicPartition("p.planned", 0): _State(3)}))

    with pytest.raises(AssertionError, match="something else"):
        consumer.verify_event_path(0.0, TP("p.planned", 0))


def test_no_subscription_yet_counts_as_not_positioned() -> None:
    thread = SimpleNamespace(_ensure_consumer=lambda: SimpleNamespace(_fetcher=None))

    assert not positioned(thread, TP("p.planned", 0))
