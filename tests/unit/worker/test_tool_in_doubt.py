"""The tool stage through the runner: a crash between a tool's side effect and the commit.

The real tool handler (app.worker.stages) and ledger (app.stores.MappingLedger) run on in-memory
ports; the "crash" is the worker's task being cancelled, and the restarted worker is a new runner
over the same tables (what the changelogs would restore).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.worker.registry import TOOL
from app.worker.runner import StageRunner
from schemas.events import (
    ExceptionCompleted,
    ExceptionPlanned,
    ExceptionRedriveRequested,
    PlannedStep,
)
from tests import factories
from tests.unit.worker.conftest import Rig, acme_handlers, request

STEP = factories.make_step()  # ticket.create


class Ticketing:
    """The tenant's ticket tool: counts its side effects, and can be told to kill the worker
    during a call (after the side effect, before the answer is recorded)."""

    name = "ticket"

    def __init__(self) -> None:
        self.created: list[str] = []  # idempotency keys of the calls that acted
        self.crash_during_next_call = False

    async def call(
        self, step: PlannedStep, idempotency_key: str, event: ExceptionPlanned
    ) -> dict[str, Any]:
        self.created.append(idempotency_key)
        if self.crash_during_next_call:
            self.crash_during_next_call = False
            raise asyncio.CancelledError("kill -9 while the call was in flight")
        return {"ticket": f"T-{len(self.created)}"}


def tool_runner(rig: Rig, ledger: dict[str, bytes], ticketing: Ticketing) -> StageRunner:
    """A tool-stage runner, as a (re)started worker builds it, over tables that survive it."""
    return rig.runner(acme_handlers(rig, {"ticket": ticketing}, ledger=ledger).tool, TOOL)


async def test_a_call_in_flight_at_a_crash_is_not_made_again_until_an_operator_redrives_it(
    rig: Rig,
) -> None:
    ledger: dict[str, bytes] = {}
    ticketing = Ticketing()
    plan = factories.planned(steps=[STEP], exception_id="exc-1")
    ticketing.crash_during_next_call = True

    with pytest.raises(asyncio.CancelledError):
        await tool_runner(rig, ledger, ticketing).process([rig.item(plan, stage=TOOL)], 0)
    assert len(ticketing.created) == 1  # the ticket exists; its answer was never recorded
    assert rig.processed == {}  # the plan was not marked, so Kafka delivers it again

    # The restarted worker gets the plan again. The ledger's in-flight marker says a call began
    # and has no answer: whether it acted is unknown, so it is not called again but dead-lettered
    # as in doubt, and the exception waits for an operator.
    restarted = tool_runner(rig, ledger, ticketing)
    assert await restarted.process([rig.item(plan, stage=TOOL)], 0)
    assert len(ticketing.created) == 1
    [dead] = rig.producer.to("t.tool.dlq")
    assert dead.headers["sluice.error.class"] == b"in_doubt"
    assert rig.held("tool", "exc-1") is not None
    assert rig.events_to("completed") == []

    # The operator's redrive calls again, with the same idempotency key, and the plan completes.
    redrive = request(ExceptionRedriveRequested, "exc-1", "tool")
    assert await restarted.process([rig.item(redrive, stage=TOOL)], 0)
    assert ticketing.created[0] == ticketing.created[1]
    [done] = rig.events_to("completed")
    assert isinstance(done, ExceptionCompleted) and done.payload.outcome == "resolved"
    assert rig.held("tool", "exc-1") is None


async def test_a_call_answered_before_a_crash_is_replayed_from_the_ledger_not_made_again(
    rig: Rig,
) -> None:
    ledger: dict[str, bytes] = {}
    ticketing = Ticketing()
    plan = factories.planned(steps=[STEP], exception_id="exc-1")
    rig.producer.fail_next = 1  # the worker dies before ExceptionCompleted is acked

    with pytest.raises(ConnectionError):
        await tool_runner(rig, ledger, ticketing).process([rig.item(plan, stage=TOOL)], 0)
    assert len(ticketing.created) == 1

    restarted = tool_runner(rig, ledger, ticketing)
    assert await restarted.process([rig.item(plan, stage=TOOL)], 0)

    assert len(ticketing.created) == 1  # the ledger held the answer
    [done] = rig.events_to("completed")
    assert isinstance(done, ExceptionCompleted)
    assert [(r.status, r.replayed) for r in done.payload.results] == [("succeeded", True)]
