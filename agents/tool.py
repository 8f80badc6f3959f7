"""The tool stage's core: run a plan's steps against the tenant's tools, once each.

:func:`execute` turns an ``ExceptionPlanned`` into an ``ExceptionCompleted``. It has no Faust import:
the agent decodes the plan, builds the tools (:func:`agents.tools.build_tools`), hands in a
:class:`Ledger` (``app.stores.MappingLedger`` in the worker) and a clock, and sends what comes back.

Effectively-once side effects rest on two things. Each step's idempotency key is derived from the
plan event and the step (:func:`idempotency_key`), so a redelivered plan produces the same keys and
endpoints can deduplicate. And every success is written to the ledger before the next step starts,
so a worker that crashes halfway replays the finished steps from the ledger instead of calling again.
Failures are not written: a later redrive of the plan tries the failed step afresh.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from agents.tools import Tool, ToolError
from schemas.events import (
    CompletedPayload,
    ExceptionCompleted,
    ExceptionPlanned,
    PlannedStep,
    StepResult,
    follow,
)

STAGE = "tool"


class Ledger(Protocol):
    """Tool steps by idempotency key: completed results, and calls begun but not yet answered."""

    def get(self, key: str) -> StepResult | None: ...

    def put(self, key: str, result: StepResult, at: datetime) -> None: ...

    def begin(self, key: str, at: datetime) -> None:
        """Record that a call is about to be made (an in-flight marker, replaced by put)."""
        ...

    def in_flight(self, key: str) -> datetime | None:
        """When a call was begun that has no result recorded (its outcome is unknown); None when
        there is no such call."""
        ...

    def abandon(self, key: str) -> None:
        """Drop an in-flight marker: the call ended in a known failure, so a redrive may call again."""
        ...

    def expire(self, before: datetime) -> int:
        """Forget results written before ``before``; return how many were forgotten."""
        ...


log = logging.getLogger("sluice.tool")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try a step whose tool fails transiently.

    ``max_attempts`` counts every call, the first included. ``retry_after_cap_seconds`` bounds how
    long a server's Retry-After can hold the stage (and with it the partition) on one step.
    """

    max_attempts: int = 3
    base_seconds: float = 0.2
    max_seconds: float = 10.0
    retry_after_cap_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 (got {self.max_attempts})")
        if min(self.base_seconds, self.max_seconds, self.retry_after_cap_seconds) < 0:
            raise ValueError("retry delays must not be negative")


def idempotency_key(event: ExceptionPlanned, step: PlannedStep) -> str:
    """The key a step's tool call carries; the same plan event and step always give the same key."""
    return f"{event.exception_id}:{event.event_id}:{step.step_id}"


def backoff_delay(
    attempt: int, policy: RetryPolicy, retry_after: float | None, rng: random.Random
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    Exponential backoff with full jitter, so retries from many partitions spread out instead of
    hitting a recovering endpoint together; never sooner than the server's Retry-After (capped).
    """
    ceiling = min(policy.max_seconds, policy.base_seconds * 2 ** max(attempt - 1, 0))
    delay = rng.uniform(0.0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(max(retry_after, 0.0), policy.retry_after_cap_seconds))
    return delay


async def _nothing() -> None:
    return None


async def execute(
    event: ExceptionPlanned,
    tools: Mapping[str, Tool],
    ledger: Ledger,
    now: Callable[[], datetime],
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
    durable: Callable[[], Awaitable[None]] = _nothing,
    retry_in_doubt: bool = False,
) -> ExceptionCompleted:
    """Run the plan's steps in order and report each one's result.

    A step already in the ledger is reported as replayed without a call. The first step that fails
    (permanently, or transiently ``policy.max_attempts`` times) ends the run: the steps after it are
    reported as skipped. Exceptions other than :class:`~agents.tools.ToolError` are bugs, not tool
    outcomes, and propagate to the agent.

    Before each call the ledger gets an in-flight marker, and ``durable()`` (the agent's "wait until
    the ledger write is acknowledged") runs; after the call, the result replaces the marker. A step
    found in flight was begun by a worker that died before recording the answer: whether the tool
    acted is unknown, so the step fails as ``in_doubt`` without calling again, unless
    ``retry_in_doubt`` (an operator's redrive) says to call again with the same idempotency key.
    """
    if event.payload.awaiting_approval:
        raise ValueError(
            f"plan {event.event_id} of exception {event.exception_id} is awaiting approval; "
            "the tool stage must not run it until it is approved"
        )
    rng = rng or random.Random()  # noqa: S311 - jitter, not security
    results: list[StepResult] = []
    failed = False
    for step in event.payload.steps:
        key = idempotency_key(event, step)
        if failed:
            results.append(
                _result(step, key, "skipped", {"reason": "an earlier step of the plan failed"})
            )
            continue
        done = ledger.get(key)
        if done is not None:
            results.append(done.model_copy(update={"replayed": True}))
            continue
        began = ledger.in_flight(key)
        if began is not None and not retry_in_doubt:
            at = now().isoformat()
            results.append(
                _failed(
                    step,
                    key,
                    error_class="in_doubt",
                    message=(
                        f"A worker stopped while step {step.step_id!r} was calling tool "
                        f"{step.tool!r} (the call began at {began.isoformat()}), so whether the "
                        "call took effect is unknown. Check the tool, then redrive (it calls "
                        "again with the same Idempotency-Key) or discard."
                    ),
                    attempts=0,
                    status=None,
                    first=at,
                    last=at,
                )
            )
            failed = True
            continue
        tool = tools.get(step.tool)
        if getattr(tool, "side_effects", True):
            ledger.begin(key, now())
            await durable()
        result = await _run_step(event, step, key, tool, now, policy, sleep, rng)
        if result.status == "succeeded":
            ledger.put(key, result, now())
        else:
            ledger.abandon(key)
            failed = True
        results.append(result)

    outcome: Literal["resolved", "failed", "no_action"]
    if not event.payload.steps:
        outcome = "no_action"
    elif failed:
        outcome = "failed"
    else:
        outcome = "resolved"
    payload = CompletedPayload(
        playbook_id=event.payload.playbook_id, results=tuple(results), outcome=outcome
    )
    return follow(event, ExceptionCompleted, STAGE, payload, now())


async def _run_step(
    event: ExceptionPlanned,
    step: PlannedStep,
    key: str,
    tool: Tool | None,
    now: Callable[[], datetime],
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]],
    rng: random.Random,
) -> StepResult:
    if tool is None:
        at = now().isoformat()
        return _failed(
            step,
            key,
            error_class="permanent",
            message=(
                f"Step {step.step_id!r} uses tool {step.tool!r}, which is not configured for "
                f"tenant {event.tenant_id!r}; declare it under [tools] and redrive the exception."
            ),
            attempts=0,
            status=None,
            first=at,
            last=at,
        )
    first_failure: str | None = None
    attempts = 0
    while True:
        attempts += 1
        try:
            detail = await tool.call(step, key, event)
        except ToolError as exc:
            last_failure = now().isoformat()
            first_failure = first_failure or last_failure
            if not exc.retryable or attempts >= policy.max_attempts:
                return _failed(
                    step,
                    key,
                    error_class="transient" if exc.retryable else "permanent",
                    message=exc.message,
                    attempts=attempts,
                    status=exc.status,
                    first=first_failure,
                    last=last_failure,
                )
            delay = backoff_delay(attempts, policy, exc.retry_after, rng)
            log.warning(
                "exception %s step %r (%s.%s): attempt %d of %d failed, again in %.2fs with "
                "Idempotency-Key %s: %s",
                event.exception_id,
                step.step_id,
                step.tool,
                step.action,
                attempts,
                policy.max_attempts,
                delay,
                key,
                exc.message,
            )
            await sleep(delay)
        else:
            return _result(step, key, "succeeded", {**detail, "attempts": attempts})


def _failed(
    step: PlannedStep,
    key: str,
    *,
    error_class: Literal["transient", "permanent", "in_doubt"],
    message: str,
    attempts: int,
    status: int | None,
    first: str,
    last: str,
) -> StepResult:
    detail = {
        "error_class": error_class,
        "message": message,
        "attempts": attempts,
        "status": status,
        "first_failure_at": first,
        "last_failure_at": last,
    }
    return _result(step, key, "failed", detail)


def _result(
    step: PlannedStep,
    key: str,
    status: Literal["succeeded", "failed", "skipped"],
    detail: dict[str, Any],
) -> StepResult:
    return StepResult(
        step_id=step.step_id,
        tool=step.tool,
        action=step.action,
        idempotency_key=key,
        status=status,
        detail=detail,
    )
