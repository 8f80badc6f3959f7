"""What each stage of the chain does with one event: the handlers the stage runners call.

Each handler checks the event type the registry says the stage consumes, looks up the tenant's
configuration, calls the stage's pure function (agents/*.py) and returns its outputs as
``(topic, key, event)``; the runner encodes and sends them. The state a handler keeps (first-report
fingerprints, fingerprint groups, the tool ledger) and its clock, tenants and HTTP clients are handed
in, never read from module globals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import orjson

from agents.approval import hold_decision, hold_plan, settle
from agents.intake import FingerprintGroup, group, group_key, intake
from agents.llm import LLMClassifier
from agents.playbook import plan
from agents.policy import decide
from agents.tool import Ledger, RetryPolicy, execute
from agents.tools import Tool, build_tools
from agents.triage import triage
from app.stores import BytesMapping, Decoded, stored
from app.worker.approvals import Approvals
from app.worker.items import Handler, Output, StageError
from app.worker.ports import Clock, Tenants
from app.worker.registry import GROUP, INTAKE, OPERATIONS, PLAYBOOK, POLICY, TOOL, TRIAGE, Stage
from schemas.config import TenantConfig
from schemas.events import (
    Decision,
    Event,
    EventBase,
    ExceptionAccepted,
    ExceptionApprovalSubmitted,
    ExceptionCompleted,
    ExceptionPlanned,
    follow,
)

E = TypeVar("E", bound=EventBase)

# How many of a fingerprint group's latest outputs are kept with it (see StageHandlers.group).
RECENT_OUTPUTS = 32


def expect(event: Event, stage: Stage[E]) -> E:
    """``event`` as the type the registry says ``stage`` consumes."""
    if not isinstance(event, stage.consumes):
        raise StageError(
            f"the {stage.name} stage reads {stage.consumes.__name__} events, got {event.event_type}"
        )
    return event


class Clients:
    """Per-tenant HTTP clients, tools and classifiers, created on first use inside the worker's loop."""

    def __init__(self) -> None:
        self.http: httpx.AsyncClient | None = None
        self.tools: dict[str, dict[str, Tool]] = {}
        self.classifiers: dict[str, LLMClassifier] = {}

    def client(self) -> httpx.AsyncClient:
        if self.http is None:
            self.http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20)
            )
        return self.http

    def tools_for(self, config: TenantConfig) -> dict[str, Tool]:
        if config.tenant_id not in self.tools:
            self.tools[config.tenant_id] = build_tools(config, self.client())
        return self.tools[config.tenant_id]

    def classifier_for(self, config: TenantConfig) -> LLMClassifier | None:
        if not config.triage.llm.enabled:
            return None
        if config.tenant_id not in self.classifiers:
            self.classifiers[config.tenant_id] = LLMClassifier(config.triage.llm, self.client())
        return self.classifiers[config.tenant_id]

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None


async def _nothing() -> None:
    return None


class StageHandlers:
    """The chain's six handlers, sharing one worker's tables, tenants, clock and clients."""

    def __init__(
        self,
        *,
        tenants: Tenants,
        clock: Clock,
        fingerprints: BytesMapping,
        groups: BytesMapping,
        ledger: Ledger,
        retry: RetryPolicy,
        approvals: Approvals | None = None,
        clients: Clients | None = None,
        decoded_groups: Decoded[str, dict[str, Any]] | None = None,
        durable: Callable[[], Awaitable[None]] = _nothing,
    ) -> None:
        self.tenants = tenants
        self.clock = clock
        self.fingerprints = fingerprints
        self.groups = groups
        self.ledger = ledger
        self.retry = retry
        self.approvals = approvals or Approvals({})
        self.clients = clients or Clients()
        # tenant:fingerprint -> the group table's value, decoded (None: nothing kept)
        self.decoded_groups = decoded_groups
        self.durable = durable  # waits until the ledger's latest write is acknowledged

    def by_stage(self) -> dict[str, Handler]:
        return {
            INTAKE.name: self.intake,
            GROUP.name: self.group,
            TRIAGE.name: self.triage,
            POLICY.name: self.policy,
            PLAYBOOK.name: self.playbook,
            TOOL.name: self.tool,
        }

    def tenant(self, event: EventBase) -> TenantConfig:
        config = self.tenants.get(event.tenant_id)
        if config is None:
            raise StageError(
                f"tenant {event.tenant_id!r} has no configuration in {self.tenants.where}; "
                "add the tenant's TOML file, restart the workers and redrive the event"
            )
        return config

    async def intake(self, event: Event, redriven: bool = False) -> list[Output]:
        ingested = expect(event, INTAKE)
        self.tenant(ingested)
        key = ingested.exception_id
        known = stored(self.fingerprints, key)
        out = intake(ingested, known.decode() if known else None, self.clock())
        if known is None:
            self.fingerprints[key] = out.payload.fingerprint.encode()
        return [(INTAKE.outputs[0], group_key(out).encode(), out)]

    async def group(self, event: Event, redriven: bool = False) -> list[Output]:
        """Count repeats of a fingerprint. The group state and the output are stored together, so
        a redelivered input (after a crash between the table write and the idempotency mark)
        resends the recorded output instead of counting the same event twice."""
        fingerprinted = expect(event, GROUP)
        config = self.tenant(fingerprinted)
        key = group_key(fingerprinted)
        held = self.decoded_groups.get(key) if self.decoded_groups is not None else None
        if held is None:
            raw = stored(self.groups, key)
            held = orjson.loads(raw) if raw else {"group": None, "recent": {}}
        eid = str(fingerprinted.event_id)
        if eid in held["recent"]:
            accepted = ExceptionAccepted.model_validate(held["recent"][eid])
        else:
            state = FingerprintGroup.model_validate(held["group"]) if held["group"] else None
            accepted, new_state = group(
                fingerprinted, state, config.intake.repeat_window_seconds, self.clock()
            )
            recent = {**held["recent"], eid: accepted.model_dump(mode="json")}
            while len(recent) > RECENT_OUTPUTS:
                recent.pop(next(iter(recent)))
            held = {"group": new_state.model_dump(mode="json"), "recent": recent}
            self.groups[key] = orjson.dumps(held)
        if self.decoded_groups is not None:
            self.decoded_groups.put(key, held)
        return [(GROUP.outputs[0], accepted.exception_id.encode(), accepted)]

    async def triage(self, event: Event, redriven: bool = False) -> list[Output]:
        accepted = expect(event, TRIAGE)
        config = self.tenant(accepted)
        classifier = self.clients.classifier_for(config)
        classification = await classifier.classify(accepted) if classifier else None
        out = triage(accepted, config.triage, self.clock(), classification)
        return [(TRIAGE.outputs[0], out.exception_id.encode(), out)]

    async def policy(self, event: Event, redriven: bool = False) -> list[Output]:
        triaged = expect(event, POLICY)
        out = decide(triaged, self.tenant(triaged).policy, self.clock())
        return [(POLICY.outputs[0], out.exception_id.encode(), out)]

    async def playbook(self, event: Event, redriven: bool = False) -> list[Output]:
        """Plan a decision. One that policy holds for approval is planned as approval would let it
        run, and held here (agents/approval.py) until a decision about it arrives."""
        if isinstance(event, ExceptionApprovalSubmitted):
            return await self.decide(event)
        decided = expect(event, PLAYBOOK)
        key = decided.exception_id.encode()
        playbooks = self.tenant(decided).playbooks
        if decided.payload.decision == Decision.awaiting_approval:
            approved = plan(decided, playbooks, self.clock(), approved=True)
            if approved is None:  # plan() plans every awaiting decision when approved
                raise StageError(f"no plan for the held decision {decided.event_id}")
            note = self.approvals.hold(hold_decision(decided, approved, self.clock()))
            return [(OPERATIONS, key, note)]
        out = plan(decided, playbooks, self.clock())
        return [] if out is None else [(PLAYBOOK.outputs[0], key, out)]

    async def tool(self, event: Event, redriven: bool = False) -> list[Output]:
        """Run the plan. A step that still fails after its retries dead-letters the plan (nothing
        is emitted), so the exception is quarantined here until an operator redrives it; the
        ledger keeps the steps that did succeed, and the redrive does not call them again."""
        if isinstance(event, ExceptionApprovalSubmitted):
            return await self.decide(event, redriven)
        planned = expect(event, TOOL)
        key = planned.exception_id.encode()
        if planned.payload.awaiting_approval:  # held here until a decision about it arrives
            return [(OPERATIONS, key, self.approvals.hold(hold_plan(planned, self.clock())))]
        out = await self.run_plan(planned, redriven)
        return [(TOOL.outputs[0], key, out)]

    async def run_plan(self, planned: ExceptionPlanned, redriven: bool) -> ExceptionCompleted:
        out = await execute(
            planned,
            self.clients.tools_for(self.tenant(planned)),
            self.ledger,
            self.clock,
            self.retry,
            durable=self.durable,
            retry_in_doubt=redriven,
        )
        if out.payload.outcome == "failed":
            failed = next(r for r in out.payload.results if r.status == "failed")
            raise StageError(
                f"step {failed.step_id!r} ({failed.tool}.{failed.action}) failed: "
                f"{failed.detail.get('message')}",
                error_class=str(failed.detail.get("error_class", "permanent")),
                kind=f"tool:{failed.tool}",
                attempts=int(failed.detail.get("attempts") or 1),
            )
        return out

    async def decide(
        self, submission: ExceptionApprovalSubmitted, redriven: bool = False
    ) -> list[Output]:
        """A person's approve or reject (or the timer's expire) of what this stage holds. The
        decided hold is written before any held work runs, so a decision that comes again after
        a crash finds it decided by itself and gives the same outputs; another one is refused."""
        self.tenant(submission)
        key = submission.exception_id.encode()
        hold = self.approvals.get(submission.exception_id)
        settled = settle(submission, hold, self.clock())
        if settled.hold is not None:
            self.approvals.put(settled.hold)
        outputs: list[Output] = [(OPERATIONS, key, settled.result)]
        if not settled.run or settled.hold is None:
            return outputs
        runnable = settled.hold.runnable_plan()
        if settled.hold.stage == PLAYBOOK.name:
            planned = follow(
                settled.result, ExceptionPlanned, "playbook", runnable.payload, self.clock()
            )
            outputs.append((PLAYBOOK.outputs[0], key, planned))
        else:
            # The steps keep the held plan's idempotency keys; the completion follows the approval.
            done = await self.run_plan(runnable, redriven)
            completed = follow(
                settled.result, ExceptionCompleted, "tool", done.payload, self.clock()
            )
            outputs.append((TOOL.outputs[0], key, completed))
        return outputs
