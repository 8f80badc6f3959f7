"""The Faust shell around the pure stages: topics, tables and one thin agent per stage.

Every agent runs the same loop (:class:`StageRunner`): decode the record, drop an input event id the
stage has already processed, call the stage's pure function (agents/*.py), send the output events and
wait for the broker's ack, and only then mark the input as processed. That order is what makes
at-least-once delivery plus idempotency tables effectively-once:

- a crash before the outputs are acked leaves the input unmarked and uncommitted, so it is processed
  again and re-emits outputs with the same derived event ids, which the next stage drops;
- a crash after the mark was written to the changelog but before the offset commit redelivers the
  input, and the mark drops it: its outputs were already acked.

Faust acks an event whose agent raised and never retries it, so nothing may escape the loop: poison
records and failures go to the stage's DLQ topic with the raw bytes and the cause in headers, and a
send that fails is retried until it succeeds (the partition waits; nothing is skipped).

Agents run with concurrency=1: higher concurrency can commit past an in-flight event and breaks
per-key order (faust-streaming#606, robinhood/faust#422).
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import faust
import httpx
import orjson
from faust.types import TableT
from mode import BaseSignalT

from agents.intake import FingerprintGroup, group, group_key, intake
from agents.llm import LLMClassifier
from agents.playbook import plan
from agents.policy import decide
from agents.tool import RetryPolicy, execute
from agents.tools import Tool, build_tools
from agents.triage import triage
from app.faust_app import app, settings, topics
from app.stores import MappingLedger, MappingProcessedStore
from schemas.codec import PoisonEvent, decode, encode
from schemas.config import TenantConfig, load_tenants
from schemas.events import (
    Event,
    EventBase,
    ExceptionAccepted,
    ExceptionDecided,
    ExceptionFingerprinted,
    ExceptionIngested,
    ExceptionPlanned,
    ExceptionTriaged,
)
from schemas.state import ExceptionRecord, apply

log = logging.getLogger("sluice.pipeline")

TENANTS: dict[str, TenantConfig] = load_tenants(settings.config_dir)


class StageError(Exception):
    """A failure processing one event. ``error_class`` is permanent (retrying the same input cannot
    help: wrong event type, unknown tenant) or transient (it might succeed later)."""

    def __init__(self, message: str, error_class: str = "permanent") -> None:
        super().__init__(message)
        self.error_class = error_class


def now() -> datetime:
    return datetime.now(UTC)


def tenant(event: EventBase) -> TenantConfig:
    config = TENANTS.get(event.tenant_id)
    if config is None:
        raise StageError(
            f"tenant {event.tenant_id!r} has no configuration in {settings.config_dir}/tenants; "
            "add the tenant's TOML file, restart the workers and redrive the event"
        )
    return config


E = TypeVar("E", bound=EventBase)


def expect(event: Event, cls: type[E], stage: str) -> E:
    if not isinstance(event, cls):
        raise StageError(f"the {stage} stage reads {cls.__name__} events, got {event.event_type}")
    return event


# ------------------------------------------------------------------------------------------ topics


def _topic(name: str) -> faust.TopicT:
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        value_serializer="raw",
        partitions=settings.partitions,
        internal=True,
    )


ingested_topic = _topic(topics.ingested)
fingerprinted_topic = _topic(topics.fingerprinted)
accepted_topic = _topic(topics.accepted)
triaged_topic = _topic(topics.triaged)
decided_topic = _topic(topics.decided)
planned_topic = _topic(topics.planned)
completed_topic = _topic(topics.completed)
history_topic = app.topic(
    *topics.history(), key_type=bytes, value_type=bytes, value_serializer="raw"
)

# ------------------------------------------------------------------------------------------ tables

_TTL_MS = settings.processed_ttl_seconds * 1000
# Idempotency and ledger entries expire: locally through RocksDB's TTL, and in the changelog through
# time retention (compaction alone would keep every key forever and restore it on recovery).
_EXPIRING = {"cleanup.policy": "compact,delete", "retention.ms": str(_TTL_MS)}
_ROCKSDICT = {"driver": "rocksdict"}


def _expiring_table(name: str) -> TableT[Any, Any]:
    return app.Table(
        name,
        key_type=str,
        value_type=bytes,
        options={**_ROCKSDICT, "ttl": settings.processed_ttl_seconds},
        extra_topic_configs=_EXPIRING,
    )


def _table(name: str, key_type: type = str) -> TableT[Any, Any]:
    return app.Table(name, key_type=key_type, value_type=bytes, options=_ROCKSDICT)


exceptions_table = _table("exceptions", key_type=bytes)  # exception id -> ExceptionRecord JSON
fingerprints_table = _table("exception-fingerprints")  # exception id -> fingerprint of 1st report
groups_table = _expiring_table("fingerprint-groups")  # tenant:fingerprint -> group + recent outputs
ledger_table = _expiring_table("tool-ledger")  # idempotency key -> StepResult


# ---------------------------------------------------------------------------------------- runner

Output = tuple[faust.TopicT, bytes, EventBase]


@dataclass
class StageStats:
    processed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    emitted: int = 0
    last_event_at: float | None = None


STATS: dict[str, StageStats] = {}


@dataclass
class StageRunner:
    name: str
    handler: Callable[[Event], Awaitable[list[Output]]]
    processed: MappingProcessedStore
    dlq: faust.TopicT
    stats: StageStats = field(default_factory=StageStats)

    def __post_init__(self) -> None:
        STATS[self.name] = self.stats

    async def run(self, stream: faust.StreamT[bytes]) -> None:
        async for record in stream.events():
            await self.process(record)

    async def process(self, record: faust.EventT) -> None:
        try:
            event = decode(record.value)
        except PoisonEvent as exc:
            await self.dead_letter(record, "poison", exc.kind, str(exc), None)
            return
        if self.processed.seen(str(event.event_id)):
            self.stats.duplicates += 1
            return
        try:
            outputs = await self.handler(event)
        except StageError as exc:
            await self.dead_letter(record, exc.error_class, "stage_error", str(exc), event)
            return
        except Exception as exc:  # Faust would ack and drop it: dead-letter with the cause instead
            await self.dead_letter(record, "permanent", type(exc).__name__, str(exc), event)
            return
        await send_all([(topic, key, encode(out)) for topic, key, out in outputs])
        self.processed.mark(str(event.event_id), now())
        self.stats.processed += 1
        self.stats.emitted += len(outputs)
        self.stats.last_event_at = time.time()

    async def dead_letter(
        self,
        record: faust.EventT,
        error_class: str,
        kind: str,
        message: str,
        event: EventBase | None,
    ) -> None:
        msg = record.message
        headers = {
            "sluice.original.topic": msg.topic,
            "sluice.original.partition": str(msg.partition),
            "sluice.original.offset": str(msg.offset),
            "sluice.original.timestamp": str(msg.timestamp),
            "sluice.stage": self.name,
            "sluice.error.class": error_class,
            "sluice.error.kind": kind,
            "sluice.error.message": message[:4000],
            "sluice.error.stacktrace": traceback.format_exc()[-8000:],
            "sluice.error.attempts": "1",
            "sluice.error.first_failure_at": now().isoformat(),
        }
        if event is not None:
            headers["sluice.tenant_id"] = event.tenant_id
            headers["sluice.exception_id"] = event.exception_id
            headers["sluice.event_id"] = str(event.event_id)
        await send_all(
            [(self.dlq, msg.key, msg.value)],
            headers=[(k, v.encode()) for k, v in headers.items()],
        )
        self.stats.dead_lettered += 1
        log.warning(
            "%s: dead-lettered %s[%s]@%s (%s: %s)",
            self.name,
            msg.topic,
            msg.partition,
            msg.offset,
            kind,
            message,
        )


async def send_all(
    items: list[tuple[faust.TopicT, bytes | None, bytes | None]],
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    """Send and wait for the broker's ack of every item; retry until it succeeds.

    ``force=True`` bypasses Faust's attachments (which would publish only when the input is acked,
    after our idempotency mark, and so could lose the output on a crash).
    """
    delay = 0.1
    while True:
        try:
            futures = [
                await topic.send(key=key, value=value, headers=headers, force=True)
                for topic, key, value in items
            ]
            for fut in futures:
                await fut
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker is unreachable or refused: wait and send again
            log.warning("send failed (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _runner(name: str, handler: Callable[[Event], Awaitable[list[Output]]]) -> StageRunner:
    processed = _expiring_table(f"processed-{name}")
    dlq = _topic(topics.dlq(name))
    return StageRunner(name, handler, MappingProcessedStore(processed), dlq)


# -------------------------------------------------------------------------------------- handlers


async def handle_intake(event: Event) -> list[Output]:
    ingested = expect(event, ExceptionIngested, "intake")
    tenant(ingested)
    known = fingerprints_table.get(ingested.exception_id)
    out = intake(ingested, known.decode() if known else None, now())
    if known is None:
        fingerprints_table[ingested.exception_id] = out.payload.fingerprint.encode()
    return [(fingerprinted_topic, group_key(out).encode(), out)]


_RECENT_OUTPUTS = 32


async def handle_group(event: Event) -> list[Output]:
    """Count repeats of a fingerprint. The group state and the output are stored together, so a
    redelivered input (after a crash between the table write and the idempotency mark) resends the
    recorded output instead of counting the same event twice."""
    fingerprinted = expect(event, ExceptionFingerprinted, "group")
    config = tenant(fingerprinted)
    key = group_key(fingerprinted)
    raw = groups_table.get(key)
    stored: dict[str, Any] = orjson.loads(raw) if raw else {"group": None, "recent": {}}
    eid = str(fingerprinted.event_id)
    if eid in stored["recent"]:
        accepted = ExceptionAccepted.model_validate(stored["recent"][eid])
    else:
        state = FingerprintGroup.model_validate(stored["group"]) if stored["group"] else None
        accepted, new_state = group(
            fingerprinted, state, config.intake.repeat_window_seconds, now()
        )
        recent = {**stored["recent"], eid: accepted.model_dump(mode="json")}
        while len(recent) > _RECENT_OUTPUTS:
            recent.pop(next(iter(recent)))
        groups_table[key] = orjson.dumps(
            {"group": new_state.model_dump(mode="json"), "recent": recent}
        )
    return [(accepted_topic, accepted.exception_id.encode(), accepted)]


class _Clients:
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


clients = _Clients()


async def handle_triage(event: Event) -> list[Output]:
    accepted = expect(event, ExceptionAccepted, "triage")
    config = tenant(accepted)
    classifier = clients.classifier_for(config)
    classification = await classifier.classify(accepted) if classifier else None
    out = triage(accepted, config.triage, now(), classification)
    return [(triaged_topic, out.exception_id.encode(), out)]


async def handle_policy(event: Event) -> list[Output]:
    triaged = expect(event, ExceptionTriaged, "policy")
    out = decide(triaged, tenant(triaged).policy, now())
    return [(decided_topic, out.exception_id.encode(), out)]


async def handle_playbook(event: Event) -> list[Output]:
    decided = expect(event, ExceptionDecided, "playbook")
    out = plan(decided, tenant(decided).playbooks, now())
    return [] if out is None else [(planned_topic, out.exception_id.encode(), out)]


RETRY = RetryPolicy(
    max_attempts=settings.tool_max_attempts,
    base_seconds=settings.tool_backoff_base_seconds,
    max_seconds=settings.tool_backoff_max_seconds,
)
ledger = MappingLedger(ledger_table)


async def handle_tool(event: Event) -> list[Output]:
    planned = expect(event, ExceptionPlanned, "tool")
    if planned.payload.awaiting_approval:
        return []  # the chain waits for an approval; the projection shows awaiting_approval
    out = await execute(planned, clients.tools_for(tenant(planned)), ledger, now, RETRY)
    return [(completed_topic, out.exception_id.encode(), out)]


async def handle_projection(event: Event) -> list[Output]:
    key = event.exception_id.encode()
    raw = exceptions_table.get(key)
    record = ExceptionRecord.model_validate_json(raw) if raw else None
    if record is not None and record.state.tenant_id != event.tenant_id:
        raise StageError(
            f"event {event.event_id} claims tenant {event.tenant_id!r} for exception "
            f"{event.exception_id}, which belongs to another tenant; refusing to merge them"
        )
    updated = apply(record, event)
    if updated is not None:
        exceptions_table[key] = updated.model_dump_json().encode()
    return []


# ---------------------------------------------------------------------------------------- agents

intake_runner = _runner("intake", handle_intake)
group_runner = _runner("group", handle_group)
triage_runner = _runner("triage", handle_triage)
policy_runner = _runner("policy", handle_policy)
playbook_runner = _runner("playbook", handle_playbook)
tool_runner = _runner("tool", handle_tool)
projection_runner = _runner("projection", handle_projection)


@app.agent(ingested_topic, concurrency=1)
async def take_in_exceptions(stream: faust.StreamT[bytes]) -> None:
    await intake_runner.run(stream)


@app.agent(fingerprinted_topic, concurrency=1)
async def group_repeats(stream: faust.StreamT[bytes]) -> None:
    await group_runner.run(stream)


@app.agent(accepted_topic, concurrency=1)
async def triage_exceptions(stream: faust.StreamT[bytes]) -> None:
    await triage_runner.run(stream)


@app.agent(triaged_topic, concurrency=1)
async def apply_policy(stream: faust.StreamT[bytes]) -> None:
    await policy_runner.run(stream)


@app.agent(decided_topic, concurrency=1)
async def choose_playbook(stream: faust.StreamT[bytes]) -> None:
    await playbook_runner.run(stream)


@app.agent(planned_topic, concurrency=1)
async def execute_tools(stream: faust.StreamT[bytes]) -> None:
    await tool_runner.run(stream)


@app.agent(history_topic, concurrency=1)
async def project_state(stream: faust.StreamT[bytes]) -> None:
    await projection_runner.run(stream)


async def _close_clients(
    sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
) -> None:
    await clients.close()


app.on_before_shutdown.connect(_close_clients)
