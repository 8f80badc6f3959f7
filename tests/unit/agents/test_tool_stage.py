"""The tool stage's core against real tools and a loopback server, with injected sleep and clock."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from agents.tool import RetryPolicy, backoff_delay, execute, idempotency_key
from agents.tools import NoopTool, Tool, build_tools
from app.stores import MappingLedger
from schemas.config import TenantConfig
from schemas.events import (
    ExceptionCompleted,
    ExceptionContext,
    ExceptionPlanned,
    ExceptionReport,
    PlannedPayload,
    PlannedStep,
    Severity,
    derive_event_id,
)
from tests.support.mock_http import MockHTTPServer

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=3, base_seconds=0.2, max_seconds=10.0)

TICKET = PlannedStep(step_id="open-ticket", tool="desk", action="create")
PAGE = PlannedStep(step_id="page", tool="chat", action="page", params={"channel": "#ops"})
HOOK = PlannedStep(step_id="callback", tool="hook", action="retry")


def planned(
    *steps: PlannedStep, awaiting_approval: bool = False, event_id: uuid.UUID | None = None
) -> ExceptionPlanned:
    report = ExceptionReport(source="payments", error_type="CardDeclined", message="declined")
    context = ExceptionContext(
        report=report,
        fingerprint="fp-1",
        is_repeat=False,
        occurrences_in_window=1,
        severity=Severity.high,
        category="payments",
    )
    return ExceptionPlanned(
        event_id=event_id or uuid.uuid4(),
        tenant_id="acme",
        exception_id="exc-1",
        sequence=5,
        occurred_at=T0,
        causation_id=uuid.uuid4(),
        correlation_id=uuid.uuid4(),
        payload=PlannedPayload(
            context=context,
            playbook_id="payments" if steps else "none",
            steps=steps,
            awaiting_approval=awaiting_approval,
        ),
    )


def seeded(seed: int) -> random.Random:
    """Jitter that repeats from run to run."""
    return random.Random(seed)  # noqa: S311 - backoff jitter, not security


class Clock:
    """A clock that moves only when the fake sleep says so."""

    def __init__(self) -> None:
        self.at = T0

    def __call__(self) -> datetime:
        return self.at


class FakeSleep:
    """Records the delays execute asks for and advances the clock instead of waiting."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.clock.at += timedelta(seconds=seconds)


@pytest.fixture
def server() -> Iterator[MockHTTPServer]:
    with MockHTTPServer() as mock:
        yield mock


@pytest.fixture
async def tools(server: MockHTTPServer) -> AsyncIterator[dict[str, Tool]]:
    tenant = TenantConfig.model_validate(
        {
            "tenant_id": "acme",
            "tools": {
                "desk": {"kind": "ticket", "url": server.url},
                "chat": {"kind": "notify", "url": server.url},
                "hook": {"kind": "webhook", "url": f"{server.url}/hook"},
                "noop": {"kind": "noop"},
            },
        }
    )
    async with httpx.AsyncClient() as client:
        yield build_tools(tenant, client)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sleep(clock: Clock) -> FakeSleep:
    return FakeSleep(clock)


@pytest.fixture
def ledger() -> MappingLedger:
    return MappingLedger({})


async def run(
    event: ExceptionPlanned,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
    policy: RetryPolicy = POLICY,
) -> ExceptionCompleted:
    return await execute(event, tools, ledger, clock, policy, sleep=sleep, rng=seeded(7))


# ------------------------------------------------------------------------------------ success


async def test_all_steps_succeed_in_order_and_land_in_the_ledger(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    event = planned(TICKET, PAGE, HOOK)
    out = await run(event, tools, ledger, clock, sleep)

    assert out.payload.outcome == "resolved"
    assert out.payload.playbook_id == "payments"
    assert [r.status for r in out.payload.results] == ["succeeded"] * 3
    assert [r.path for r in server.calls()] == ["/tickets", "/notify", "/hook"]
    assert out.payload.results[0].detail["ticket_id"] == "T-1"
    for result in out.payload.results:
        assert not result.replayed
        assert ledger.get(result.idempotency_key) == result
    assert sleep.delays == []


async def test_output_event_follows_the_plan(
    tools: dict[str, Tool], ledger: MappingLedger, clock: Clock, sleep: FakeSleep
) -> None:
    event = planned(PlannedStep(step_id="n", tool="noop", action="nothing"))
    out = await run(event, tools, ledger, clock, sleep)
    assert out.event_id == derive_event_id(event.event_id, "tool")
    assert out.causation_id == event.event_id
    assert out.correlation_id == event.correlation_id
    assert out.sequence == event.sequence + 1
    assert out.occurred_at == T0
    assert out.payload.results[0].detail["noop"] is True


async def test_empty_plan_is_no_action(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    out = await run(planned(), tools, ledger, clock, sleep)
    assert out.payload.outcome == "no_action"
    assert out.payload.results == ()
    assert server.calls() == []


# -------------------------------------------------------------------------------------- retries


async def test_transient_failures_are_retried_until_success(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.fail("/tickets", 503, times=2)
    with caplog.at_level(logging.WARNING, logger="sluice.tool"):
        out = await run(planned(TICKET), tools, ledger, clock, sleep)

    [result] = out.payload.results
    assert result.status == "succeeded"
    assert result.detail["attempts"] == 3
    assert out.payload.outcome == "resolved"
    assert server.calls_by_idempotency_key() == {result.idempotency_key: 3}
    assert len(sleep.delays) == 2
    assert all(0 <= d <= POLICY.max_seconds for d in sleep.delays)
    # Each call that is made again says so, with the key the endpoint sees twice.
    retried = [r.getMessage() for r in caplog.records if r.name == "sluice.tool"]
    assert len(retried) == 2
    assert "attempt 1 of 3 failed" in retried[0] and "attempt 2 of 3 failed" in retried[1]
    assert all(result.idempotency_key in m and "503" in m for m in retried)


async def test_retry_after_on_429_is_honoured(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    server.fail("/notify", 429, times=1, retry_after=4)
    out = await run(planned(PAGE), tools, ledger, clock, sleep)
    assert out.payload.results[0].status == "succeeded"
    # The jittered backoff alone is at most 0.2 s here: only the header can explain 4 s.
    assert sleep.delays == [4.0]


async def test_retry_after_is_capped_by_the_policy(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    server.fail("/notify", 429, times=1, retry_after=3600)
    policy = RetryPolicy(retry_after_cap_seconds=30.0)
    await run(planned(PAGE), tools, ledger, clock, sleep, policy)
    assert sleep.delays == [30.0]


async def test_past_the_bound_the_step_fails_and_the_rest_are_skipped(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    server.fail("/notify", 503, times=10)
    out = await run(planned(TICKET, PAGE, HOOK), tools, ledger, clock, sleep)

    ticket, page, hook = out.payload.results
    assert out.payload.outcome == "failed"
    assert ticket.status == "succeeded"
    assert page.status == "failed"
    assert hook.status == "skipped"
    assert page.detail["error_class"] == "transient"
    assert page.detail["attempts"] == 3
    assert page.detail["status"] == 503
    assert "HTTP 503" in page.detail["message"]
    first = datetime.fromisoformat(page.detail["first_failure_at"])
    last = datetime.fromisoformat(page.detail["last_failure_at"])
    assert first == T0
    # The clock only moved while the stage slept between attempts.
    assert abs(last - (T0 + timedelta(seconds=sum(sleep.delays)))) < timedelta(milliseconds=1)
    assert last > first
    assert len(server.calls("/notify")) == 3
    assert server.calls("/hook") == []
    # Only the success is remembered: a redrive retries the failed step and runs the skipped one.
    assert ledger.get(ticket.idempotency_key) == ticket
    assert ledger.get(page.idempotency_key) is None
    assert ledger.get(hook.idempotency_key) is None


async def test_permanent_failure_is_not_retried(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    server.fail("/tickets", 400)
    out = await run(planned(TICKET, PAGE), tools, ledger, clock, sleep)

    ticket, page = out.payload.results
    assert out.payload.outcome == "failed"
    assert ticket.status == "failed"
    assert ticket.detail["error_class"] == "permanent"
    assert ticket.detail["attempts"] == 1
    assert ticket.detail["status"] == 400
    assert page.status == "skipped"
    assert len(server.calls()) == 1
    assert sleep.delays == []
    assert ledger.get(ticket.idempotency_key) is None


async def test_unknown_tool_is_a_permanent_failure(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    missing = PlannedStep(step_id="sms", tool="sms", action="send")
    out = await run(planned(missing, PAGE), tools, ledger, clock, sleep)

    sms, page = out.payload.results
    assert sms.status == "failed"
    assert sms.detail["error_class"] == "permanent"
    assert "'sms'" in sms.detail["message"]
    assert "[tools]" in sms.detail["message"]
    assert page.status == "skipped"
    assert server.calls() == []


# ------------------------------------------------------------------------------ idempotency


async def test_redelivered_plan_replays_from_the_ledger_without_calling(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    event = planned(TICKET, PAGE)
    first = await run(event, tools, ledger, clock, sleep)
    second = await run(event, tools, ledger, clock, sleep)

    assert server.calls_by_idempotency_key() == {
        r.idempotency_key: 1 for r in first.payload.results
    }
    assert [r.replayed for r in second.payload.results] == [True, True]
    assert [r.model_copy(update={"replayed": False}) for r in second.payload.results] == list(
        first.payload.results
    )
    assert second.payload.outcome == "resolved"
    assert second.event_id == first.event_id


async def test_redrive_after_failure_retries_only_the_failed_step(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    server.fail("/notify", 404)
    event = planned(TICKET, PAGE)
    failed = await run(event, tools, ledger, clock, sleep)
    assert failed.payload.outcome == "failed"

    redriven = await run(event, tools, ledger, clock, sleep)
    assert redriven.payload.outcome == "resolved"
    ticket, page = redriven.payload.results
    assert ticket.replayed
    assert not page.replayed
    assert server.calls_by_idempotency_key() == {ticket.idempotency_key: 1, page.idempotency_key: 2}


def test_idempotency_keys_are_deterministic_and_distinct() -> None:
    event_id = uuid.uuid4()
    one = planned(TICKET, PAGE, event_id=event_id)
    again = planned(TICKET, PAGE, event_id=event_id)
    other_plan = planned(TICKET, PAGE)

    assert idempotency_key(one, TICKET) == idempotency_key(again, TICKET)
    assert idempotency_key(one, TICKET) == f"exc-1:{event_id}:open-ticket"
    assert idempotency_key(one, TICKET) != idempotency_key(one, PAGE)
    assert idempotency_key(one, TICKET) != idempotency_key(other_plan, TICKET)


async def test_plan_awaiting_approval_is_refused(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    with pytest.raises(ValueError, match="awaiting approval"):
        await run(planned(TICKET, awaiting_approval=True), tools, ledger, clock, sleep)
    assert server.calls() == []


# ---------------------------------------------------------------------------------- backoff


def test_backoff_grows_exponentially_within_the_ceiling() -> None:
    policy = RetryPolicy(base_seconds=1.0, max_seconds=5.0)
    rng = seeded(1)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)]:
        delays = [backoff_delay(attempt, policy, None, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        # Full jitter spreads over the whole range, not around one value.
        assert max(delays) > ceiling * 0.8
        assert min(delays) < ceiling * 0.2


def test_backoff_is_never_shorter_than_retry_after() -> None:
    policy = RetryPolicy(base_seconds=1.0, max_seconds=5.0, retry_after_cap_seconds=20.0)
    rng = seeded(2)
    assert all(backoff_delay(3, policy, 12.0, rng) >= 12.0 for _ in range(50))
    assert backoff_delay(1, policy, 999.0, rng) == 20.0


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(base_seconds=-1)


# ------------------------------------------------------------------------------------ in doubt


async def test_a_call_begun_but_never_answered_is_in_doubt_and_not_repeated(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    event = planned(TICKET, PAGE)
    # A previous worker recorded the intent for the first step and died before the answer.
    ledger.begin(idempotency_key(event, TICKET), T0)
    out = await run(event, tools, ledger, clock, sleep)

    assert out.payload.outcome == "failed"
    first, second = out.payload.results
    assert (first.status, first.detail["error_class"]) == ("failed", "in_doubt")
    assert "redrive" in first.detail["message"]
    assert f"began at {T0.isoformat()}" in first.detail["message"]
    assert second.status == "skipped"
    assert server.calls() == [], "an in-doubt call must not be repeated on its own"
    assert ledger.in_flight(idempotency_key(event, TICKET)) == T0


async def test_an_operator_redrive_calls_an_in_doubt_step_again_with_the_same_key(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    event = planned(TICKET)
    key = idempotency_key(event, TICKET)
    ledger.begin(key, T0)
    out = await execute(
        event, tools, ledger, clock, POLICY, sleep=sleep, rng=seeded(7), retry_in_doubt=True
    )
    assert out.payload.outcome == "resolved"
    assert [c.idempotency_key for c in server.calls()] == [key]
    assert ledger.in_flight(key) is None
    assert ledger.get(key) == out.payload.results[0]


async def test_the_intent_is_made_durable_before_the_call(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    event = planned(TICKET, PAGE)
    seen: list[tuple[bool, int]] = []

    async def durable() -> None:
        # Called after begin(), before the tool is called.
        key = idempotency_key(event, (TICKET, PAGE)[len(seen)])
        seen.append((ledger.in_flight(key) is not None, len(server.calls())))

    out = await execute(
        event, tools, ledger, clock, POLICY, sleep=sleep, rng=seeded(7), durable=durable
    )
    assert out.payload.outcome == "resolved"
    assert seen == [(True, 0), (True, 1)]


async def test_a_known_failure_clears_the_intent_so_a_redrive_calls_again(
    server: MockHTTPServer,
    tools: dict[str, Tool],
    ledger: MappingLedger,
    clock: Clock,
    sleep: FakeSleep,
) -> None:
    server.fail("/tickets", 404)
    event = planned(TICKET)
    out = await run(event, tools, ledger, clock, sleep)
    assert out.payload.results[0].detail["error_class"] == "permanent"
    assert ledger.in_flight(idempotency_key(event, TICKET)) is None


async def test_a_noop_step_needs_no_durable_intent(
    ledger: MappingLedger, clock: Clock, sleep: FakeSleep
) -> None:
    step = PlannedStep(step_id="record", tool="noop", action="record")
    event = planned(step)
    waits: list[bool] = []

    async def durable() -> None:
        waits.append(True)

    out = await execute(
        event, {"noop": NoopTool()}, ledger, clock, POLICY, sleep=sleep, durable=durable
    )
    assert out.payload.outcome == "resolved"
    assert waits == []  # no side effect outside Sluice, nothing to make durable first
    assert ledger.get(idempotency_key(event, step)) == out.payload.results[0]
