"""Phase g (``--approvals``): the list of pending approvals timed as the ``exceptions`` table grows.

GET /v1/approvals is served from the workers' small ``approvals`` table, never from a scan of the
exceptions (app/worker/approvals.py). This phase shows it. ``--approvals-held`` exceptions are held
for approval through the real pipeline (source ``held``, which the bench tenant holds: see
:mod:`bench.workload`), and once the workers list them all, the ``exceptions`` table is grown to
each of ``--approvals-checkpoints`` and the list is timed at each: ``--approvals-requests`` GETs one
after another of worker 1's ``/sluice/approvals?tenant=bench&limit=50`` (which gathers from every
worker of the group), then as many of the API's ``GET /v1/approvals?limit=50``.

The table grows fast, without the pipeline: synthetic ``ExceptionCompleted`` events (built and
validated by the event models, encoded by :func:`schemas.codec.encode`, one new exception id each,
keyed by it) go straight to the completed topic, which only the projection reads. An
``ExceptionCompleted`` for an id the table does not hold creates a record for it. A checkpoint is
measured once the workers' group has committed every record of that topic, so the projection has
folded them all. Such a record holds one event of history where a real one holds seven: the table
holds as many keys as after as many real exceptions, in fewer bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bench.context import BenchContext, Options
from bench.kafka import GroupLag, produce
from bench.memory import table_sizes, workers_table_memory
from bench.procs import BenchError, Proc, echo, wait_http
from bench.stats import latency_summary, rate
from bench.workers import workers_memory
from bench.workload import API_KEY, HELD_SOURCE, TENANT, phase_of
from schemas.codec import encode
from schemas.events import CompletedPayload, ExceptionCompleted, StepResult

if TYPE_CHECKING:
    import httpx

LIST_LIMIT = 50  # the page the timed requests ask for (the API's default)
PAGE_LIMIT = 200  # the largest page a worker gives: the count of everything listed uses it
WARMUP_REQUESTS = 3  # per target and checkpoint, before the timed ones
FILL_CHUNK = 10_000  # synthetic completions built and produced at a time (acks awaited per chunk)
FILL_PHASE = "fill"
HELD_PHASE = "held"
TARGET_RATIO = 1.5  # the list's p50 at the largest checkpoint may be at most this times the first's
WORKER_PATH = "/sluice/approvals"
API_PATH = "/v1/approvals"


# ------------------------------------------------------------------------------ synthetic events


def completed_event(exception_id: str, now: datetime) -> bytes:
    """One valid, encoded ``ExceptionCompleted`` of the bench tenant for ``exception_id``: the
    projection makes a record of it (resolved, one step recorded by the noop sink)."""
    event = ExceptionCompleted(
        event_id=uuid.uuid4(),
        tenant_id=TENANT,
        exception_id=exception_id,
        sequence=7,  # where the tool stage's event sits in a real chain
        occurred_at=now,
        causation_id=None,
        correlation_id=uuid.uuid4(),
        payload=CompletedPayload(
            playbook_id="bench",
            outcome="resolved",
            results=(
                StepResult(
                    step_id="record",
                    tool="sink",
                    action="record",
                    idempotency_key=f"{exception_id}:record",
                    status="succeeded",
                ),
            ),
        ),
    )
    return encode(event)


def fill_records(
    key: Callable[[str, int], bytes], start: int, count: int, now: datetime | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """``count`` synthetic completions of new exceptions, the i-th keyed by ``key("fill", i)``
    (:meth:`bench.workload.EventMaker.key`), which is also its exception id."""
    for i in range(start, start + count):
        exception_id = key(FILL_PHASE, i)
        yield exception_id, completed_event(exception_id.decode(), now or datetime.now(UTC))


# --------------------------------------------------------------------------------------- listing


def list_all(client: httpx.Client, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every item of a paged list (``{"items": [...], "next_cursor": ...}``), page after page."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = {**params, "limit": PAGE_LIMIT, **({"cursor": cursor} if cursor else {})}
        resp = client.get(path, params=query)
        if resp.status_code != 200:
            raise BenchError(f"GET {path} answered {resp.status_code}: {resp.text[:300]}")
        page = resp.json()
        items.extend(page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            return items


def time_list(
    client: httpx.Client,
    path: str,
    params: dict[str, Any],
    requests: int,
    warmup: int = WARMUP_REQUESTS,
    clock: Any = time.perf_counter,
) -> dict[str, Any]:
    """``requests`` GETs of ``path`` one after another (after ``warmup`` untimed ones): their
    statuses, how many items the answers held, and the time of the answered ones (status 200)."""
    seconds: list[float] = []
    statuses: Counter[int] = Counter()
    items: Counter[int] = Counter()
    detail = ""
    for i in range(warmup + requests):
        start = clock()
        resp = client.get(path, params=params)
        elapsed = clock() - start
        if i < warmup:
            continue
        statuses[resp.status_code] += 1
        if resp.status_code == 200:
            seconds.append(elapsed)
            items[len(resp.json()["items"])] += 1
        elif not detail:
            detail = resp.text[:300]
    figures = list_figures(seconds)
    out: dict[str, Any] = {
        "requests": requests,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "items_per_answer": {str(k): v for k, v in sorted(items.items())},
        **figures,
    }
    if detail:
        out["error"] = detail
    return out


def list_figures(seconds: Sequence[float]) -> dict[str, Any]:
    """The time of the answered requests: count, p50, p95, p99, max and mean in milliseconds."""
    return latency_summary(seconds)


def wait_listed(
    url: str, prefix: str, expected: int, within: float, procs: Sequence[Proc] = ()
) -> float:
    """Seconds until the worker at ``url`` lists ``expected`` pending approvals whose exception
    ids start with ``prefix``; BenchError if a worker exits or ``within`` s pass first."""
    import httpx

    start = time.perf_counter()
    deadline = start + within
    next_report = start + 5
    listed = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:
            for proc in procs:
                if not proc.alive():
                    raise BenchError(
                        f"{proc.name} exited with {proc.popen.returncode} while the held "
                        f"exceptions were awaited:\n{proc.log_tail()}"
                    )
            problem: Exception | None = None
            try:
                listed = count_listed(list_all(client, WORKER_PATH, {"tenant": TENANT}), prefix)
            except (httpx.HTTPError, BenchError) as exc:  # not ready yet (rebalancing): again
                problem = exc
            now = time.perf_counter()
            if listed >= expected:
                return now - start
            if now >= deadline:
                raise BenchError(
                    f"the workers listed {listed:,} of {expected:,} held exceptions after "
                    f"{within:.0f}s{f' (last error: {problem})' if problem else ''}"
                )
            if now >= next_report:
                echo(f"approvals: {listed:,}/{expected:,} held exceptions listed")
                next_report = now + 5
            time.sleep(0.25)


def count_listed(items: Sequence[dict[str, Any]], prefix: str) -> int:
    """How many distinct exceptions of ``items`` have an id starting with ``prefix``."""
    return len({i["exception_id"] for i in items if i["exception_id"].startswith(prefix)})


# ------------------------------------------------------------------------------------- the phase


async def run_approvals(
    ctx: BenchContext,
    opts: Options,
    producer: Any,
    topics: Any,
    phases: dict[str, Any],
    notes: list[str],
    completed: int,
) -> dict[str, Any]:
    """Hold ``opts.approvals_held`` exceptions, then grow the table to each checkpoint and time
    the list there. ``completed``: the exceptions the workers have completed so far (every phase's),
    all of them in the table. ``phases["approvals"]`` grows a point per checkpoint, so a run
    stopped early keeps the checkpoints it reached, and ``fill_progress`` says how far the fill
    under way had got."""
    if not ctx.workers:
        raise BenchError("no worker is running")
    held = opts.approvals_held
    points: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "held": held,
        "requests": opts.approvals_requests,
        "limit": LIST_LIMIT,
        "checkpoints": points,
        "stored": "exceptions in the table: those the pipeline phases completed, the held ones "
        "and the synthetic completions produced to the completed topic, every one folded (the "
        "workers' group had committed every record); keys_estimate is RocksDB's own estimate",
        "worker": f"GET {WORKER_PATH}?tenant={TENANT}&limit={LIST_LIMIT} on worker 1, one request "
        f"at a time, {WARMUP_REQUESTS} untimed first; milliseconds",
        "api": f"GET {API_PATH}?limit={LIST_LIMIT} on a sluice api process reading the workers, the "
        "same way",
        "fill": "synthetic ExceptionCompleted events produced to the completed topic; fill_s runs "
        "from the first produce to the group's commit of the last (offsets are committed every few "
        "seconds)",
        "target_ratio": TARGET_RATIO,
    }
    phases["approvals"] = result
    start = time.perf_counter()
    worker_url = f"http://127.0.0.1:{ctx.worker_ports[0]}"
    prefix = phase_of(ctx.maker.key(HELD_PHASE, 0)).decode() + "-"

    echo(f"approvals: holding {held:,} exceptions for approval through the pipeline")
    await produce(producer, topics.ingested, ctx.maker.batch(HELD_PHASE, 0, held, HELD_SOURCE))
    result["held_listed_s"] = round(
        await asyncio.to_thread(wait_listed, worker_url, prefix, held, opts.timeout, ctx.workers),
        2,
    )
    async with GroupLag(ctx.bootstrap, ctx.app_id, ctx.partitions) as group:
        # every record of the phases before folded: the count of stored exceptions starts exact
        if await group.caught_up(opts.timeout) is None:
            raise BenchError(f"the workers had not caught up {opts.timeout}s after holding")
        stored = completed + held
        echo(f"approvals: {held:,} listed after {result['held_listed_s']}s; {stored:,} stored")
        api, api_url = await _start_api(ctx)
        try:
            filled = 0
            for checkpoint in opts.approvals_checkpoints:
                need = max(0, checkpoint - stored)
                fill: dict[str, Any] = {"filled": need, "fill_s": 0.0, "fill_per_s": None}
                if need:
                    fill = await _fill(ctx, producer, topics, group, filled, need, opts, result)
                    filled += need
                    stored += need
                point = await asyncio.to_thread(
                    _measure, ctx, worker_url, api_url, prefix, opts.approvals_requests
                )
                point = {
                    "checkpoint": checkpoint,
                    "stored_exceptions": stored,
                    **fill,
                    **point,
                    "elapsed_s": round(time.perf_counter() - start, 1),
                }
                points.append(point)
                _check(point, held, notes)
                echo(
                    f"approvals at {stored:,} stored: list p50 {point['worker'].get('p50_ms')} ms "
                    f"(p95 {point['worker'].get('p95_ms')}, max {point['worker'].get('max_ms')}); "
                    f"API p50 {point['api'].get('p50_ms')} ms; {point['pending']:,} pending"
                )
        finally:
            ctx.procs.stop(api)
    return result


async def _start_api(ctx: BenchContext) -> tuple[Proc, str]:
    """A ``sluice api`` process that reads the bench's workers."""
    from app.kafka_local import free_port

    port = free_port()
    urls = json.dumps([f"http://127.0.0.1:{p}" for p in ctx.worker_ports])
    api = ctx.procs.start(
        "api-approvals",
        [sys.executable, "-m", "app.cli", "api", "--port", str(port)],
        ctx.env(SLUICE_WORKER_URLS=urls),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_http, f"{url}/healthz", api, 90)
    except BaseException:
        ctx.procs.stop(api)
        raise
    return api, url


async def _fill(
    ctx: BenchContext,
    producer: Any,
    topics: Any,
    group: GroupLag,
    start: int,
    count: int,
    opts: Options,
    result: dict[str, Any],
) -> dict[str, Any]:
    """Produce ``count`` synthetic completions and wait until the projection has folded them all
    (its group has committed every record of the completed topic, which had no lag before)."""
    echo(f"approvals: {count:,} synthetic completions to the completed topic")
    produced = 0
    t0 = time.perf_counter()

    async def send() -> None:
        nonlocal produced
        while produced < count:
            n = min(FILL_CHUNK, count - produced)
            await produce(
                producer, topics.completed, fill_records(ctx.maker.key, start + produced, n)
            )
            produced += n

    sending = asyncio.create_task(send(), name="approvals-fill")
    progress: dict[str, Any] = {"target": count, "produced": 0, "folded": 0}
    result["fill_progress"] = progress
    deadline = t0 + opts.timeout
    next_report = t0 + 10
    try:
        while True:
            await asyncio.sleep(1.0)
            if sending.done():
                sending.result()  # raises what stopped the producer
            lag = await group.lag([topics.completed])
            now = time.perf_counter()
            folded = max(0, produced - lag)
            progress.update(
                produced=produced,
                folded=folded,
                elapsed_s=round(now - t0, 1),
                folded_per_s=rate(folded, now - t0),
            )
            if sending.done() and lag == 0:
                break
            for proc in ctx.workers:
                if not proc.alive():
                    raise BenchError(
                        f"{proc.name} exited with {proc.popen.returncode} during the fill:\n"
                        f"{proc.log_tail()}"
                    )
            if now >= deadline:
                raise BenchError(
                    f"the projection folded {folded:,} of {count:,} synthetic completions in "
                    f"{opts.timeout:.0f}s ({progress['folded_per_s']}/s)"
                )
            if now >= next_report:
                echo(
                    f"approvals fill: {folded:,}/{count:,} folded, {produced:,} produced "
                    f"({progress['folded_per_s']:,}/s)"
                )
                next_report = now + 10
    finally:
        if not sending.done():
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
    elapsed = time.perf_counter() - t0
    del result["fill_progress"]
    return {"filled": count, "fill_s": round(elapsed, 1), "fill_per_s": rate(count, elapsed)}


def _measure(
    ctx: BenchContext, worker_url: str, api_url: str, prefix: str, requests: int
) -> dict[str, Any]:
    """One checkpoint: the held exceptions still pending, the list timed on worker 1 and on the
    API, and what the table and the workers hold."""
    import httpx

    params = {"tenant": TENANT, "limit": LIST_LIMIT}
    with httpx.Client(base_url=worker_url, timeout=30) as client:
        pending = count_listed(list_all(client, WORKER_PATH, {"tenant": TENANT}), prefix)
        worker = time_list(client, WORKER_PATH, params, requests)
    with httpx.Client(base_url=api_url, timeout=30, headers={"X-API-Key": API_KEY}) as client:
        api = time_list(client, API_PATH, {"limit": LIST_LIMIT}, requests)
    rocks = workers_table_memory(ctx) or {}
    sizes = [table_sizes(d).get("exceptions", 0) for d in ctx.worker_dirs]
    return {
        "pending": pending,
        "worker": worker,
        "api": api,
        "keys_estimate": ((rocks.get("tables") or {}).get("exceptions") or {}).get("keys_estimate"),
        "exceptions_table_bytes": sum(sizes),
        "worker_rss_bytes": workers_memory(ctx.workers)["rss_bytes"],
    }


def _check(point: dict[str, Any], held: int, notes: list[str]) -> None:
    """Say in the notes what makes a checkpoint's figures doubtful."""
    at = f"approvals at {point['stored_exceptions']:,} stored"
    if point["pending"] != held:
        notes.append(f"{at}: {point['pending']:,} of the {held:,} held exceptions were pending")
    for target in ("worker", "api"):
        statuses = point[target]["statuses"]
        if set(statuses) != {"200"}:
            error = point[target].get("error", "")
            notes.append(f"{at}: the {target} answered {statuses} to the list {error}".rstrip())
