"""The stage runner's hardest paths, on in-memory ports: no broker, no Faust, in milliseconds."""

from __future__ import annotations

import pytest

from agents.tools import TransientToolError
from app.worker.registry import POLICY
from app.worker.runner import StageRunner
from schemas.events import (
    ExceptionDeadLettered,
    ExceptionDiscardRequested,
    ExceptionParked,
    ExceptionQuarantineLifted,
    ExceptionRedriveRequested,
)
from tests.unit.worker.conftest import Rig, Script, request, triaged

DLQ = "t.policy.dlq"


async def test_first_delivery_is_processed_and_a_redelivery_is_skipped(
    rig: Rig, script: Script
) -> None:
    runner = rig.runner(script)
    event = triaged("exc-1")

    assert await runner.process([rig.item(event)], rig.generation())
    assert [e.event_id for e in rig.events_to("decided")] == [event.event_id]
    assert str(event.event_id) in rig.processed
    assert rig.changelog.settled == 1  # the batch's table writes were awaited before any ack

    # The same event again (a redelivery after a crash before the offset commit), alone and
    # twice within one batch: the handler is not called again and nothing more is sent.
    assert await runner.process([rig.item(event), rig.item(event)], rig.generation())
    assert len(script.calls) == 1
    assert len(rig.events_to("decided")) == 1
    assert rig.stat("policy", "processed") == 1
    assert rig.stat("policy", "duplicates") == 2
    assert rig.metric("sluice_events_duplicates_total", stage="policy") == 2
    assert rig.metric("sluice_events_processed_total", stage="policy") == 1


async def test_a_duplicate_within_one_batch_is_dropped_before_the_batch_is_flushed(
    rig: Rig, script: Script
) -> None:
    runner = rig.runner(script)
    event = triaged("exc-1")

    await runner.process([rig.item(event), rig.item(event)], rig.generation())

    assert len(script.calls) == 1
    assert len(rig.events_to("decided")) == 1
    assert rig.stat("policy", "duplicates") == 1


async def test_transient_failures_are_retried_with_backoff(rig: Rig, script: Script) -> None:
    script.fail("exc-1", ConnectionError("refused"), TimeoutError("slow"))
    runner = rig.runner(script)

    assert await runner.process([rig.item(triaged("exc-1"))], rig.generation())

    assert len(script.calls) == 3
    assert len(rig.events_to("decided")) == 1
    assert len(rig.sleeps.delays) == 2
    # full jitter under an exponential ceiling: base 0.2 s, then 0.4 s
    assert 0 <= rig.sleeps.delays[0] <= 0.2
    assert 0 <= rig.sleeps.delays[1] <= 0.4
    assert rig.stat("policy", "retried") == 2
    assert rig.stat("policy", "failed") == 2
    assert rig.metric("sluice_events_retried_total", stage="policy") == 2
    assert rig.metric("sluice_events_failed_total", stage="policy", error_class="transient") == 2
    assert rig.producer.to(DLQ) == []


async def test_a_retry_waits_at_least_the_retry_after_the_failure_carries(
    rig: Rig, script: Script
) -> None:
    script.fail("exc-1", TransientToolError("HTTP 429", status=429, retry_after=7.5))
    runner = rig.runner(script)

    assert await runner.process([rig.item(triaged("exc-1"))], rig.generation())

    assert len(rig.sleeps.delays) == 1
    assert rig.sleeps.delays[0] >= 7.5  # the backoff alone would be at most 0.2 s
    assert len(rig.events_to("decided")) == 1


async def test_retries_exhausted_dead_letter_the_event_with_its_cause(
    rig: Rig, script: Script
) -> None:
    script.fail("exc-1", *(ConnectionError(f"refused #{n}") for n in range(3)))
    runner = rig.runner(script)
    event = triaged("exc-1")
    item = rig.item(event)

    # A dead letter is an outcome, not a failure of the batch: the batch may be acked.
    assert await runner.process([item], rig.generation())

    assert len(script.calls) == 3  # RetryPolicy.max_attempts
    assert len(rig.sleeps.delays) == 2
    assert rig.events_to("decided") == []
    [dead] = rig.producer.to(DLQ)
    assert dead.value == item.value and dead.key == b"exc-1"  # the original bytes, untouched
    assert dead.headers["sluice.error.class"] == b"transient"
    assert dead.headers["sluice.error.kind"] == b"ConnectionError"
    assert dead.headers["sluice.error.message"] == b"refused #2"
    assert dead.headers["sluice.error.attempts"] == b"3"
    assert dead.headers["sluice.original.offset"] == str(item.offset).encode()
    assert b"ConnectionError" in dead.headers["sluice.error.stacktrace"]
    [note] = rig.events_to("operations")
    assert isinstance(note, ExceptionDeadLettered)
    assert note.payload.failed_event_id == event.event_id
    assert note.payload.error_class == "transient" and note.payload.attempts == 3
    held = rig.held("policy", "exc-1")
    assert held is not None and held["head"]["offset"] == item.offset and held["parked"] == []
    assert rig.stat("policy", "dead_lettered") == 1
    assert (
        rig.metric("sluice_events_dead_lettered_total", stage="policy", error_class="transient")
        == 1
    )
    # not marked processed: a redrive must be able to run it again
    assert str(event.event_id) not in rig.processed


async def test_a_permanent_failure_is_dead_lettered_without_retrying(
    rig: Rig, script: Script
) -> None:
    script.fail("exc-1", ValueError("no such rule"))
    runner = rig.runner(script)

    await runner.process([rig.item(triaged("exc-1"))], rig.generation())

    assert len(script.calls) == 1 and rig.sleeps.delays == []
    [dead] = rig.producer.to(DLQ)
    assert dead.headers["sluice.error.class"] == b"permanent"
    assert dead.headers["sluice.error.kind"] == b"ValueError"


async def test_a_quarantined_exception_parks_its_later_events_and_a_redrive_resumes_them_in_order(
    rig: Rig, script: Script
) -> None:
    script.fail("exc-1", ValueError("bad rule"))
    runner = rig.runner(script)
    first, second, third = (triaged("exc-1", n) for n in (1, 2, 3))
    other = triaged("exc-2")

    batch = [rig.item(first), rig.item(second), rig.item(other), rig.item(third)]
    await runner.process(batch, rig.generation())

    # exc-2 flows past; exc-1's later events wait behind its dead letter, in arrival order
    assert [e.exception_id for e in rig.events_to("decided")] == ["exc-2"]
    held = rig.held("policy", "exc-1")
    assert held is not None
    assert [p["event_id"] for p in held["parked"]] == [str(second.event_id), str(third.event_id)]
    parked = [e for e in rig.events_to("operations") if isinstance(e, ExceptionParked)]
    assert [p.payload.parked_event_id for p in parked] == [second.event_id, third.event_id]
    assert [p.payload.position for p in parked] == [1, 2]
    assert rig.stat("policy", "parked") == 2

    # The same records delivered again (a crash before the offset commit) are already held:
    # neither dead-lettered nor parked twice.
    await runner.process(batch, rig.generation())
    held = rig.held("policy", "exc-1")
    assert held is not None and len(held["parked"]) == 2
    assert len(rig.producer.to(DLQ)) == 1
    assert rig.stat("policy", "duplicates") == 4  # exc-1 held three times, exc-2 marked once

    # A later event of exc-1 joins the end of the line.
    fourth = triaged("exc-1", 4)
    await runner.process([rig.item(fourth)], rig.generation())

    # The operator's redrive arrives on the stage's own input, keyed by the exception.
    script.calls.clear()
    redrive = request(ExceptionRedriveRequested, "exc-1")
    assert await runner.process([rig.item(redrive)], rig.generation())

    replayed = [call[0] for call in script.calls]
    assert replayed == [str(e.event_id) for e in (first, second, third, fourth)]
    assert all(redriven for _, redriven in script.calls)
    decided = [str(e.event_id) for e in rig.events_to("decided") if e.exception_id == "exc-1"]
    assert decided == replayed  # sent in the original order
    assert rig.held("policy", "exc-1") is None
    [lifted] = [e for e in rig.events_to("operations") if isinstance(e, ExceptionQuarantineLifted)]
    assert lifted.payload.action == "redrive" and lifted.payload.released == 3
    assert lifted.payload.requested_by == "ops-alice"
    assert rig.stat("policy", "redriven") == 1
    assert rig.metric("sluice_events_redriven_total", stage="policy") == 1

    # The same request redelivered does nothing more.
    script.calls.clear()
    await runner.process([rig.item(redrive)], rig.generation())
    assert script.calls == []


async def test_a_discard_drops_the_dead_letter_and_releases_what_was_parked(
    rig: Rig, script: Script
) -> None:
    script.fail("exc-1", ValueError("bad rule"))
    runner = rig.runner(script)
    first, second = triaged("exc-1", 1), triaged("exc-1", 2)
    await runner.process([rig.item(first), rig.item(second)], rig.generation())

    script.calls.clear()
    await runner.process([rig.item(request(ExceptionDiscardRequested, "exc-1"))], rig.generation())

    assert [c[0] for c in script.calls] == [str(second.event_id)]
    assert rig.held("policy", "exc-1") is None
    assert rig.stat("policy", "discarded") == 1


async def test_a_redrive_that_fails_again_keeps_the_rest_parked_behind_the_new_dead_letter(
    rig: Rig, script: Script
) -> None:
    script.fail("exc-1", ValueError("bad rule"), ValueError("still bad"))
    runner = rig.runner(script)
    first, second = triaged("exc-1", 1), triaged("exc-1", 2)
    await runner.process([rig.item(first), rig.item(second)], rig.generation())

    await runner.process([rig.item(request(ExceptionRedriveRequested, "exc-1"))], rig.generation())

    held = rig.held("policy", "exc-1")
    assert held is not None and "replaying" not in held
    assert held["head"]["error_class"] == "permanent" and held["head"]["attempts"] == 2
    assert [p["offset"] for p in held["parked"]] == [1]
    assert rig.events_to("decided") == []


async def test_a_request_for_another_stage_passes_through(rig: Rig, script: Script) -> None:
    runner = rig.runner(script)

    await runner.process([rig.item(request(ExceptionRedriveRequested, "exc-1", "triage"))], 0)

    assert script.calls == [] and rig.producer.sent == []


async def test_poison_bytes_go_to_the_dlq_and_quarantine_their_key(
    rig: Rig, script: Script
) -> None:
    runner = rig.runner(script)
    poison = rig.item(b"{not json", key=b"exc-9")
    keyless = rig.item(b"[1, 2]", key=None)

    assert await runner.process([poison, keyless], rig.generation())

    assert script.calls == []
    dead, dead_keyless = rig.producer.to(DLQ)
    assert dead.value == b"{not json"
    assert dead.headers["sluice.error.class"] == b"poison"
    assert dead.headers["sluice.error.kind"] == b"malformed"
    assert dead.headers["sluice.exception_id"] == b"exc-9"
    assert dead_keyless.headers["sluice.error.kind"] == b"invalid"
    assert "sluice.exception_id" not in dead_keyless.headers
    assert rig.events_to("operations") == []  # no event to name, so no note
    assert rig.held("policy", "exc-9") is not None
    assert rig.stat("policy", "dead_lettered") == 2

    # A valid event of the poisoned exception waits behind it.
    await runner.process([rig.item(triaged("exc-9"))], rig.generation())
    assert script.calls == []
    assert len(rig.held("policy", "exc-9")["parked"]) == 1  # type: ignore[index]


async def test_a_rebalance_during_a_batch_ends_it_and_leaves_it_unacked(rig: Rig) -> None:
    seen: list[str] = []

    async def handler(event: object, redriven: bool = False) -> list[object]:
        exception_id = getattr(event, "exception_id")  # noqa: B009
        seen.append(exception_id)
        if exception_id == "exc-b":
            rig.generation.rebalance()  # the partitions move while exc-b is being handled
        return [("decided", exception_id.encode(), event)]

    runner: StageRunner = rig.runner(handler)  # type: ignore[arg-type]
    batch = [triaged("exc-a"), triaged("exc-b"), triaged("exc-c")]

    may_ack = await runner.process([rig.item(e) for e in batch], rig.generation())

    assert may_ack is False  # the caller must not ack: the records come again from Kafka
    assert seen == ["exc-a", "exc-b"]  # nothing after the rebalance was started
    # What was handled is sent and marked, so the redelivery (here or on the new owner, which
    # shares the changelogged tables) drops it and only exc-c is processed.
    assert [e.exception_id for e in rig.events_to("decided")] == ["exc-a", "exc-b"]
    new_owner = rig.runner(handler)  # type: ignore[arg-type]
    assert await new_owner.process([rig.item(e) for e in batch], rig.generation())
    assert seen == ["exc-a", "exc-b", "exc-c"]
    assert [e.exception_id for e in rig.events_to("decided")] == ["exc-a", "exc-b", "exc-c"]
    assert rig.stat("policy", "duplicates") == 2


async def test_a_batch_cut_off_by_a_crash_keeps_nothing_and_is_done_again(
    rig: Rig, script: Script
) -> None:
    runner = rig.runner(script)
    events = [triaged("exc-a"), triaged("exc-b")]
    rig.producer.fail_next = 1  # the sends of the batch never get their acks

    with pytest.raises(ConnectionError):
        await runner.process([rig.item(e) for e in events], rig.generation())

    assert rig.processed == {}  # nothing marked: both are processed again
    assert await runner.process([rig.item(e) for e in events], rig.generation())
    assert [e.exception_id for e in rig.events_to("decided")] == ["exc-a", "exc-b"]
    assert POLICY.name in rig.recorder.stats
