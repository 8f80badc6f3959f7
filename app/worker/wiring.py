"""The worker built on Faust: its topics, tables and one agent per stage, wired to the runners.

:func:`build_worker` is called when ``sluice worker`` starts (never at import): it reads the tenant
configuration, creates the Faust app (:mod:`app.worker.faust_app`), declares every topic and table,
gives each stage runner its ports (:class:`FaustProducer`, :class:`FaustChangelog`, the worker's
:class:`~app.worker.outcomes.Recorder`) and registers the agents and the web views.

Agents run with concurrency=1: higher concurrency can commit past an in-flight event and breaks
per-key order (faust-streaming#606, robinhood/faust#422). Events are acked by hand: a batch is acked
only if no rebalance happened while it was taken or processed (see :meth:`StageRunner.process`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import faust
from faust.streams import _current_event
from mode import BaseSignalT

from agents.tool import RetryPolicy
from app.retention import Sweep
from app.rocks import Store
from app.settings import Settings
from app.stores import Decoded, MappingLedger, MappingProcessedStore
from app.telemetry import Metrics, metrics, start_send_span
from app.topics import TopicNames
from app.worker.approvals import Approvals, ExpiryTimer
from app.worker.faust_app import create_app, take_batches
from app.worker.items import Item, Outgoing
from app.worker.outcomes import Recorder
from app.worker.ports import KafkaHeaders, StageContext
from app.worker.projection import Projection
from app.worker.registry import PROJECTION, STAGE_NAMES, STAGES, Stage, topic_suffixes
from app.worker.runner import StageRunner, Unrecorded
from app.worker.stages import Clients, StageHandlers
from app.worker.tenants import FileTenants

log = logging.getLogger("sluice.pipeline")


def now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------ the ports


class FaustChangelog:
    """Table writes go to the changelog partition of Faust's current event: :meth:`bind` sets it.
    Writes made inside :meth:`collect` are awaited by :meth:`settle`.

    The settle is there because Faust's flush of its producer before an offset commit gives up
    after 0.1 s without a send (``ProducerBuffer.flush_atmost``): a commit could pass an input whose
    table write never reached the changelog, and after a crash the recovery from the changelog
    would bring back the value before that write."""

    def __init__(self) -> None:
        # Each agent runs in its own task, so each sees its own item and its own batch.
        self._item: ContextVar[Item | None] = ContextVar("sluice_bound_item", default=None)
        self._writes: ContextVar[list[asyncio.Future[Any]] | None] = ContextVar(
            "sluice_batch_writes", default=None
        )

    def bind(self, item: Item | None) -> None:
        self._item.set(item)
        record = None if item is None else item.record
        _current_event.set(None if record is None else weakref.ref(record))

    def bound(self) -> Item | None:
        return self._item.get()

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        token = self._writes.set([])
        try:
            yield
        finally:
            self._writes.reset(token)

    def note(self, write: asyncio.Future[Any]) -> None:
        writes = self._writes.get()
        if writes is not None:
            writes.append(write)

    async def settle(self) -> None:
        writes = self._writes.get()
        if writes:
            written = list(writes)
            writes.clear()
            await asyncio.gather(*written)


class AckedTable(faust.Table):
    """A table whose changelog writes can be awaited: those of the current batch (see
    :class:`FaustChangelog`), and the latest one (the tool ledger's in-flight marker must be
    acknowledged by Kafka before the tool is called, or a crash could forget the call)."""

    last_write: asyncio.Future[Any] | None = None
    changelog: FaustChangelog | None = None

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        fut = super().send_changelog(*args, **kwargs)
        self.last_write = fut
        if self.changelog is not None:
            self.changelog.note(fut)
        return fut

    async def durable(self) -> None:
        """Wait until this table's latest write is acknowledged by Kafka."""
        if self.last_write is not None:
            await self.last_write


class FaustProducer:
    """Sends through the app's topics with ``force=True``, which bypasses Faust's attachments
    (those publish only when the input is acked, after our idempotency mark, so a crash could lose
    the output). Each record's send span is a child of the span that made it."""

    def __init__(self, topics: dict[str, faust.TopicT]) -> None:
        self.topics = topics

    async def send(self, records: Sequence[Outgoing], headers: KafkaHeaders | None = None) -> None:
        """Send every record, then wait for the broker's ack of each; retry until all succeed. A
        retry resends the whole list: the duplicates carry the same event ids and the next stage
        drops them."""
        if not records:
            return
        delay = 0.1
        while True:
            try:
                futures = []
                for name, key, value, parent in records:
                    sending = start_send_span(name, key, context=parent)
                    fut = asyncio.ensure_future(
                        await self.topics[name].send(
                            key=key, value=value, headers=sending.inject(headers or []), force=True
                        )
                    )
                    sending.end_when_done(fut)
                    futures.append(fut)
                for fut in futures:
                    await fut
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker is unreachable or refused: wait and send again
                log.warning("send failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def item_of(record: faust.EventT) -> Item:
    """A Faust event as the runner's :class:`Item` (with the trace headers only)."""
    msg = record.message
    raw: Any = msg.headers.items() if isinstance(msg.headers, dict) else (msg.headers or ())
    headers = tuple(
        (str(k), v if isinstance(v, bytes) else str(v).encode())
        for k, v in raw
        if k in ("traceparent", "tracestate")
    )
    return Item(
        msg.key,
        msg.value or b"",
        msg.topic,
        msg.partition,
        msg.offset,
        msg.timestamp,
        headers=headers,
        record=record,
    )


# ------------------------------------------------------------------------- drain and rebalances


class Drain:
    """Graceful stop: no agent starts another batch, the batches in flight finish (a tool call cut
    off mid-flight would be in doubt), then Faust stops."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.stopped = asyncio.Event()

    async def in_flight_done(self, within: float) -> bool:
        """Stop taking batches and wait up to ``within`` seconds for those in flight; True if all
        ended."""
        self.draining = True
        if self.in_flight:
            self.idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), within)
        return self.in_flight == 0


class Rebalances:
    """Counts partition revocations, assignments and completed table recoveries, to tell whether
    one happened meanwhile."""

    def __init__(self) -> None:
        self.count = 0

    def current(self) -> int:
        return self.count

    async def on_signal(self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        self.count += 1


# ---------------------------------------------------------------------------------- the worker


@dataclass
class Tables:
    exceptions: Any  # exception id -> ExceptionRecord JSON
    fingerprints: Any  # exception id -> fingerprint of its first report
    groups: Any  # tenant:fingerprint -> group and its recent outputs
    ledger: Any  # idempotency key -> StepResult or an in-flight marker
    quarantine: Any  # <stage>:<exception id> -> dead letter and parked items
    approvals: Any  # exception id -> the pending hold of the stage that holds it for approval
    approvals_decided: Any  # exception id -> its decided hold (expires like the marks)
    audit: Any  # event id -> an operator action (app.worker.audit)
    processed: dict[str, Any] = field(default_factory=dict)  # processed-<stage>


@dataclass
class Worker:
    """One worker process: the Faust app and everything built around it."""

    app: faust.App
    settings: Settings
    topics: TopicNames
    tables: Tables
    recorder: Recorder
    runners: dict[str, StageRunner]
    clients: Clients
    drain: Drain
    rebalances: Rebalances

    @property
    def stats(self) -> dict[str, Any]:
        return self.recorder.stats


class _Declare:
    """Declares the app's topics and tables from the settings."""

    def __init__(self, app: faust.App, settings: Settings, changelog: FaustChangelog) -> None:
        self.app = app
        self.settings = settings
        self.changelog = changelog
        ttl_ms = settings.processed_ttl_seconds * 1000
        # Idempotency and ledger entries expire: locally through RocksDB's TTL, and in the changelog
        # through time retention (compaction alone would keep every key forever and restore it on
        # recovery).
        self.expiring = {"cleanup.policy": "compact,delete", "retention.ms": str(ttl_ms)}

    def topic(self, name: str) -> faust.TopicT:
        return self.app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            value_serializer="raw",
            partitions=self.settings.partitions,
            internal=True,
        )

    def _rocksdb(self, **extra: Any) -> dict[str, Any]:
        """The options of one table's RocksDB stores (a fresh dict: Faust pops keys out of it).

        A worker opens one RocksDB instance per table and partition. Their memory is bounded in
        app.rocks (the app's store): one cache and one memtable budget for all of them. These are
        each instance's own: memtable size and count, and open files (settings.table_*)."""
        return {
            "driver": "rocksdict",
            "write_buffer_size": self.settings.table_write_buffer_kib * 1024,
            "max_write_buffer_number": 2,
            "max_open_files": self.settings.table_max_open_files,
            **extra,
        }

    def _add(self, name: str, **kwargs: Any) -> Any:
        table = AckedTable(self.app, name=name, beacon=self.app.tables.beacon, **kwargs)
        table.changelog = self.changelog
        return self.app.tables.add(table)

    def table(self, name: str, key_type: type = str) -> Any:
        return self._add(name, key_type=key_type, value_type=bytes, options=self._rocksdb())

    def expiring_table(self, name: str) -> Any:
        """An expiring str -> bytes table."""
        return self._add(
            name,
            key_type=str,
            value_type=bytes,
            options=self._rocksdb(ttl=self.settings.processed_ttl_seconds),
            extra_topic_configs=self.expiring,
        )


def build_worker(settings: Settings, worker_metrics: Metrics = metrics) -> Worker:
    """The worker's Faust app with its topics, tables, runners, agents and web views."""
    from app.worker.web import is_ready, register_views

    tenants = FileTenants(settings.config_dir)  # a ConfigError names the file and the problem
    app = create_app(settings)
    names = TopicNames(settings.topic_prefix)
    changelog = FaustChangelog()
    declare = _Declare(app, settings, changelog)
    topics = {names.of(s): declare.topic(names.of(s)) for s in topic_suffixes()}
    topics.update({names.dlq(s): declare.topic(names.dlq(s)) for s in STAGE_NAMES})
    tables = Tables(
        exceptions=declare.table("exceptions", key_type=bytes),
        fingerprints=declare.table("exception-fingerprints"),
        groups=declare.expiring_table("fingerprint-groups"),
        ledger=declare.expiring_table("tool-ledger"),
        quarantine=declare.table("quarantine"),
        approvals=declare.table("approvals"),
        approvals_decided=declare.expiring_table("approvals-decided"),
        audit=declare.table("audit"),
    )
    rebalances = Rebalances()
    for signal in (
        app.on_partitions_revoked,
        app.on_partitions_assigned,
        app.on_rebalance_complete,
    ):
        signal.connect(rebalances.on_signal)
    recorder = Recorder(worker_metrics, consumer_group=app.conf.id)
    recorder.declare(list(STAGE_NAMES))  # every series at zero before the first event
    retry = RetryPolicy(
        max_attempts=settings.tool_max_attempts,
        base_seconds=settings.tool_backoff_base_seconds,
        max_seconds=settings.tool_backoff_max_seconds,
    )
    ctx = StageContext(
        producer=FaustProducer(topics),
        changelog=changelog,
        quarantine=tables.quarantine,
        telemetry=recorder,
        topics=names,
        clock=now,
        generation=rebalances.current,
        retry=retry,
    )
    clients = Clients()
    handlers = StageHandlers(
        tenants=tenants,
        clock=now,
        fingerprints=tables.fingerprints,
        groups=tables.groups,
        ledger=MappingLedger(tables.ledger),
        retry=retry,
        approvals=Approvals(tables.approvals, tables.approvals_decided),
        clients=clients,
        decoded_groups=Decoded(settings.worker_decoded_cache, rebalances.current),
        durable=tables.ledger.durable,
    ).by_stage()
    projection = Projection(
        exceptions=tables.exceptions,
        fingerprints=tables.fingerprints,
        changelog=changelog,
        clock=now,
        metrics=worker_metrics,
        written=Decoded(settings.worker_decoded_cache, rebalances.current),
        retention_seconds=settings.exception_retention_seconds,
        sweep=Sweep(settings.exception_sweep_seconds),
        # Looked up when the first sweep runs: the store behind ``.data`` is opened on first use,
        # and opening it here would bind Faust to an event loop before the worker picks uvloop.
        scan=lambda partition, start: cast(Store, tables.exceptions.data).items_from(
            partition, start
        ),
        audit=tables.audit,
    )
    runners: dict[str, StageRunner] = {}
    for stage in STAGES:
        if stage is PROJECTION:
            runners[stage.name] = StageRunner(
                stage,
                projection.handle,
                Unrecorded(),
                ctx,
                on_flush=projection.write,
                on_discard=projection.discard,
            )
        else:
            processed = declare.expiring_table(f"processed-{stage.name}")
            tables.processed[stage.name] = processed
            runners[stage.name] = StageRunner(
                stage, handlers[stage.name], MappingProcessedStore(processed), ctx
            )
    worker = Worker(app, settings, names, tables, recorder, runners, clients, Drain(), rebalances)
    _register_agents(worker, topics)
    register_views(worker)
    timer = ExpiryTimer(Approvals(tables.approvals), ctx.producer, names, now)  # pending only

    @app.timer(interval=settings.approval_sweep_seconds, on_leader=False)
    async def expire_approvals() -> None:
        if not is_ready(app):
            return
        try:
            await timer.tick()
        except Exception:  # the next tick tries again; a timer that raised would stop for good
            log.exception("approvals: the expiry timer failed; trying again next tick")

    async def close_clients(
        sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
    ) -> None:
        await clients.close()

    app.on_before_shutdown.connect(close_clients)
    return worker


def _register_agents(worker: Worker, topics: dict[str, faust.TopicT]) -> None:
    """One agent per stage, named as the registry says (profiles attribute CPU by these names)."""
    app, names, runners = worker.app, worker.topics, worker.runners

    def source(stage: Stage[Any]) -> faust.TopicT:
        if len(stage.inputs) == 1:
            return topics[names.of(stage.inputs[0])]
        return app.topic(
            *(names.of(t) for t in stage.inputs),
            key_type=bytes,
            value_type=bytes,
            value_serializer="raw",
        )

    async def take_in_exceptions(stream: faust.StreamT[bytes]) -> None:
        await _run(worker, runners["intake"], stream)

    async def group_repeats(stream: faust.StreamT[bytes]) -> None:
        await _run(worker, runners["group"], stream)

    async def triage_exceptions(stream: faust.StreamT[bytes]) -> None:
        await _run(worker, runners["triage"], stream)

    async def apply_policy(stream: faust.StreamT[bytes]) -> None:
        await _run(worker, runners["policy"], stream)

    async def choose_playbook(stream: faust.StreamT[bytes]) -> None:
        await _run(worker, runners["playbook"], stream)

    async def execute_tools(stream: faust.StreamT[bytes]) -> None:
        await _run(worker, runners["tool"], stream)

    async def project_state(stream: faust.StreamT[bytes]) -> None:
        await _run(worker, runners["projection"], stream)

    agents = {
        f.__name__: f
        for f in (
            take_in_exceptions,
            group_repeats,
            triage_exceptions,
            apply_policy,
            choose_playbook,
            execute_tools,
            project_state,
        )
    }
    for stage in STAGES:
        app.agent(source(stage), name=stage.agent, concurrency=1)(agents[stage.agent])


async def _run(worker: Worker, runner: StageRunner, stream: faust.StreamT[bytes]) -> None:
    """A stage agent's body: the records already fetched, in batches (up to worker_batch_max),
    each acked only when :meth:`StageRunner.process` says it may be."""
    drain = worker.drain
    async for generation, records in take_batches(
        stream, worker.settings.worker_batch_max, worker.rebalances.current
    ):
        if drain.draining:
            await drain.stopped.wait()  # shutting down: leave them unacked for redelivery
        drain.in_flight += 1
        try:
            # A batch taken across a rebalance is not acked: its records are fetched again from
            # the committed offsets (app/consumer.py) by whichever worker owns them now.
            if await runner.process([item_of(r) for r in records], generation):
                for record in records:
                    record.ack()
        finally:
            drain.in_flight -= 1
            if drain.in_flight == 0:
                drain.idle.set()
