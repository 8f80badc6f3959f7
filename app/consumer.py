"""Faust's aiokafka transport with a consumer that a rebalance cannot make skip a record.

On a rebalance Faust drops the records waiting in its agents' buffers and, once the tables are
recovered, seeks every partition back to its committed offset so that they are fetched again. Four
faults around that let a record go unprocessed while later offsets are committed past it; a
two-worker test under load (tests/integration/test_failures.py, rebalances) lost exceptions
through them:

1. aiokafka's ``seek_to_committed`` leaves a partition alone when its committed offset is missing
   or 0. Its fetch position stays after the dropped records, which are never fetched again, and
   Faust (whose check for a gap at the head of the acked offsets is skipped when nothing was
   committed) commits the next processed offsets past them. Here such partitions of the agents'
   topics are sought to their beginning, where a fresh consumer starts (auto_offset_reset is
   earliest): nothing in them is committed, and the idempotency tables drop what was processed.
2. Faust's streams skip *and acknowledge* a record fetched before the latest rebalance, or taken
   while a rebalance suspends the flow. That counts its offset as processed, so a commit can pass
   the copy fetched again before it is processed, and a crash then loses it. Here acknowledgements
   are not counted while a rebalance is under way or for records of an earlier one; the copy
   fetched again after the seek is processed and acknowledged in its turn.
3. Faust's check for an unacked record at the head of a partition lets one record through (see
   ``_new_offset``).
4. Faust's recovery can resume the flow, then seek to the committed offsets and resume it again;
   that second resume empties the agents' buffers, and the seek moves positions under records
   being delivered, so the read offset jumps and Faust counts the offsets it jumped over as
   processed ("gaps", meant for compacted topics). Here the flow is stopped before such a seek,
   so everything after the committed offsets is fetched again, and a jump is logged and its
   offsets left unacked, so commits stop before them.

And one crash: Faust's livelock detector reads every assigned partition's fetch position, which
aiokafka asserts is set, while a partition just assigned by a rebalance has none until it is sought.
That AssertionError stopped the whole worker (a two-worker start under load,
tests/integration/test_pipeline.py); here the check skips such a partition.

The broker URL scheme ``sluice://`` (registered below) selects this transport.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import TopicPartition
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message

TRANSPORT_SCHEME = "sluice"
TRANSPORTS.aliases[TRANSPORT_SCHEME] = "app.consumer:Transport"

log = logging.getLogger("sluice.consumer")


def uncommitted(committed: Mapping[Any, int | None], is_source: Callable[[str], bool]) -> list[Any]:
    """The partitions of ``committed`` (as seek_to_committed returns it) that aiokafka did not
    seek: no committed offset, or 0; only those ``is_source(topic)`` accepts."""
    return [tp for tp, offset in committed.items() if not offset and is_source(tp.topic)]


def positioned(thread: Any, tp: TP) -> bool:
    """Whether the aiokafka consumer of Faust's consumer ``thread`` has a fetch position for
    ``tp``; False too while it has no assignment to look in."""
    try:
        subscription = thread._ensure_consumer()._fetcher._subscriptions.subscription
        state = subscription.assignment.state_value(TopicPartition(tp.topic, tp.partition))
    except AttributeError:  # no subscription or assignment yet (a rebalance is under way)
        return False
    return state is not None and bool(state.has_valid_position)


class Consumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with the fixes in the module docstring."""

    _stale_logged_for: int | None = None

    def verify_event_path(self, now: float, tp: TP) -> None:
        # Faust's livelock detector: it only logs partitions that stopped moving. aiokafka asserts
        # when asked for the position of a partition it has not positioned yet, and that must not
        # stop the worker; the partition is checked again at the next round.
        try:
            super().verify_event_path(now, tp)
        except AssertionError:
            if positioned(self._thread, tp):
                raise
            log.debug("livelock check skipped %s: no fetch position yet", tp)

    def ack(self, message: Message) -> bool:
        generation = self.app.consumer_generation_id
        if message.generation_id != generation or not self.app.flow_control.is_active():
            # A rebalance is under way, or the record was fetched before the latest one: this is
            # the stream skipping it (or an agent finishing it while its partitions are revoked).
            # Left unacked, the record is fetched again after the seek and acknowledged then.
            if self._stale_logged_for != generation:
                self._stale_logged_for = generation
                log.info(
                    "not counting acks of records fetched before rebalance %s (first: %s@%s)",
                    generation,
                    message.tp,
                    message.offset,
                )
            return False
        return bool(super().ack(message))

    def _new_offset(self, tp: TP) -> int | None:
        # Faust lets a commit through when the lowest acked offset is the committed one plus 1,
        # which passes over the committed offset itself (the next record to process) while it is
        # unacked. Wait until it is acked. (No gaps are recorded to fill holes: see _add_gap.)
        acked = self._acked[tp]
        committed = self._committed_offset[tp]
        if acked and committed is not None and min(acked) > committed:
            return None
        result: int | None = super()._new_offset(tp)
        return result

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # Faust counts offsets it did not see delivered as processed ("gaps", for compacted or
        # transactional topics). Sluice's topics have neither, so a jump means records were
        # skipped: leave them unacked, so that commits stop before them instead of passing them.
        log.warning(
            "records %s..%s of %s were not delivered in order; not counting them as processed",
            offset_from,
            offset_to - 1,
            tp,
        )

    async def perform_seek(self) -> None:
        if self.flow_active and self.app.flow_control.is_active():
            # Faust's recovery can resume the flow and later seek and resume once more, and that
            # resume empties the agents' buffers. Moving positions under records being delivered
            # and then dropping them loses them: stop the flow first, so that everything after
            # the committed offsets is fetched again once it resumes.
            log.info("stopping the flow to seek partitions that records are flowing from")
            self.stop_flow()
            self.app.flow_control.suspend()
            await self.wait_for_stopped_flow()
        await super().perform_seek()

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed = await super().seek_to_committed()
        fresh = uncommitted(committed, self.app.topics.acks_enabled_for)
        if fresh:
            log.info("seeking %d partitions without a committed offset to their start", len(fresh))
            await self._thread.seek_to_beginning(*fresh)
        return committed


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
