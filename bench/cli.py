"""`sluice bench`: measure Sluice on a real Kafka broker, against the limit a raw relay sets.

One run starts a local single-node broker (:class:`app.kafka_local.LocalKafka` in a temporary state
folder; or uses ``KAFKA_BOOTSTRAP_SERVERS``) and measures, in this order:

a. **raw relay**: the same six hops as the pipeline (ingested -> fingerprinted -> accepted -> triaged
   -> decided -> planned -> completed) relayed by plain aiokafka consumers and producers (getmany,
   send the batch, await the acks, then commit: at-least-once), with the same partition count and
   the same encoded ``ExceptionIngested`` bytes. Records/s end to end is the ceiling.
a2. **Faust chain** (``--skip-chain`` leaves it out): the same hops as a bare chain of Faust agents
   (:mod:`bench.chain`), with the pipeline's app settings, batching and sends but no work per
   record. What it moves bounds what any design of one Faust agent per stage can move; the
   pipeline's share of it is what Sluice's own work costs. Both a and a2 report the CPU one record
   costs at one hop.
b. **pipeline**: a real ``sluice worker`` subprocess with every guarantee on (idempotency tables,
   tool ledger, acked sends before the mark, projection). N events are produced to the ingested topic
   as fast as possible; exceptions/s runs from the first produce to the last ``ExceptionCompleted``
   seen on the completed topic. Tools are ``noop`` (or a loopback HTTP sink with ``--tools http``).
   ``--workers N`` runs b, c and f against N worker processes of the same app id (each with its own
   port, table folder and log): their CPU and RSS are summed, py-spy samples worker 1.
c. **latency** at a fixed rate (default half of b): per exception, the time from the produce ack to
   the moment a consumer of the completed topic sees it; p50/p95/p99/max, the worker's CPU seconds
   (``/proc/<pid>/stat``) and RSS (``/proc/<pid>/status``); with py-spy on PATH (or ``--py-spy``),
   the worker is sampled and its CPU split by stage and by activity.
f. **memory** (``--memory``): worker RSS and the size of its table folder at checkpoints of
   distinct exceptions pushed through.
g. **approvals** (``--approvals``): ``--approvals-held`` exceptions held for approval through the
   pipeline, then the ``exceptions`` table grown to each of ``--approvals-checkpoints`` by synthetic
   completions sent to the projection alone; at each, the list of pending approvals timed on a
   worker and on the API (p50/p95/max of ``--approvals-requests`` requests).
d. **API ingest**: a ``sluice api`` subprocess under a bounded load generator (fixed concurrency,
   fixed count) on loopback, for ``POST /v1/exceptions`` and ``POST /v1/exceptions:batch``.

Progress goes to stderr, a table to stdout, and everything to ``results/bench-<timestamp>.json``.
Every process started here (broker, worker, API, relays, chain, py-spy) is stopped on exit, Ctrl-C
included.

This module is the command and the order of the phases. The phases are in :mod:`bench.relay` (a,
a2), :mod:`bench.pipeline` (b, c), :mod:`bench.memory` (f), :mod:`bench.approvals` (g) and
:mod:`bench.ingest` (d); the JSON document in :mod:`bench.results`, the table in
:mod:`bench.report`. Their pure helpers (percentiles, /proc parsing, profile attribution, targets,
table) are unit tested.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from bench.context import BenchContext, Options
from bench.ingest import run_api
from bench.memory import parse_checkpoints
from bench.pipeline import run_pipeline_phases
from bench.procs import BenchError, Processes, echo
from bench.relay import run_chain, run_raw
from bench.report import summary_table
from bench.results import build_result
from bench.system import code_version, host_info
from bench.workload import EventMaker, write_config

# The help `sluice bench --help` shows (`sluice bench` execs `python -m bench`: app/cli.py).
bench_cli = typer.Typer(
    add_completion=False, help="Throughput, latency and memory on a real broker."
)


async def _main(ctx: BenchContext, opts: Options, phases: dict[str, Any], notes: list[str]) -> None:
    if not opts.skip_raw:
        phases["raw"] = await run_raw(
            ctx, opts.events, opts.raw_mode, opts.warmup, opts.timeout, opts.latency_events
        )
        echo(f"raw relay: {phases['raw']['records_per_s']:,}/s")
    if not opts.skip_chain:
        phases["chain"] = await run_chain(
            ctx, opts.events, opts.warmup, opts.timeout, opts.latency_events
        )
        echo(f"Faust chain: {phases['chain']['records_per_s']:,}/s")
    await run_pipeline_phases(ctx, opts, phases, notes)
    pipe = phases.get("pipeline") or {}
    echo(f"pipeline: {pipe.get('exceptions_per_s')}/s with {opts.workers} worker(s)")
    if not opts.skip_api:
        phases["api"] = await run_api(ctx, opts)


def run_bench(opts: Options) -> dict[str, Any]:
    from app.kafka_local import LocalKafka

    started = datetime.now(UTC)
    opts.stamp = started.strftime("%Y%m%dT%H%M%SZ")
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    procs = Processes(root)
    phases: dict[str, Any] = {}
    notes: list[str] = []
    broker: LocalKafka | None = None
    tools_server: Any = None
    tag = uuid.uuid4().hex[:8]
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # run the same cleanup as Ctrl-C

    signal.signal(signal.SIGTERM, on_term)
    failed: BaseException | None = None
    config: dict[str, Any] = opts.as_config()
    try:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if bootstrap:
            echo(f"using the broker at {bootstrap}")
            broker_label = f"external ({bootstrap})"
        else:
            broker = LocalKafka(root / "kafka")
            echo(f"starting a local Kafka {broker.version} broker in {broker.state_dir} ...")
            broker.start()
            bootstrap = broker.bootstrap_servers
            broker_label = (
                f"local Apache Kafka {broker.version} (KRaft, 1 node, heap {broker.heap})"
            )
        if opts.tools == "http":
            from bench.demo_tools import DemoToolServer

            tools_server = DemoToolServer().start()
        write_config(root / "config", tools_server.url if tools_server else None)
        ctx = BenchContext(
            bootstrap=bootstrap,
            partitions=opts.partitions,
            root=root,
            procs=procs,
            maker=EventMaker(tag),
            broker=broker,
            app_id=f"sluice-bench-{tag}",
            prefix=f"bench{tag}",
            log_level=opts.worker_log_level,
            worker_command=shlex.split(opts.worker_command) if opts.worker_command else None,
            worker_count=opts.workers,
        )
        config = {**opts.as_config(), "broker": broker_label}
        asyncio.run(_main(ctx, opts, phases, notes))
    except KeyboardInterrupt as exc:
        failed = exc
        notes.append("interrupted: the figures are partial")
        echo("interrupted; stopping everything ...")
    except BenchError as exc:
        failed = exc
        notes.append(f"failed: {exc}")
        echo(f"failed: {exc}")
    except Exception as exc:  # a bug or an unexpected failure: keep what was measured
        failed = exc
        notes.append(f"failed: {type(exc).__name__}: {exc}")
        echo(f"failed: {type(exc).__name__}: {exc}")
    finally:
        procs.stop_all()
        if failed is not None:  # keep the children's logs for the post-mortem
            logs = opts.output_dir / f"bench-{opts.stamp}-logs"
            for log in root.glob("*.log"):
                logs.mkdir(parents=True, exist_ok=True)
                shutil.copy2(log, logs / log.name)
            if logs.exists():
                notes.append(f"logs of the run's processes: {logs}")
        if tools_server is not None:
            tools_server.stop()
        if broker is not None:
            echo("stopping the broker ...")
            broker.stop()
        signal.signal(signal.SIGTERM, previous_term)
        if opts.keep:
            echo(f"kept the run's folder: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    result = build_result(
        started_at=started,
        command=["sluice", "bench", *sys.argv[1:]],
        host={**host_info(), "code": code_version()},
        config=config,
        phases=phases,
        notes=notes,
    )
    path = opts.output_dir / f"bench-{opts.stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["_path"] = str(path)
    if failed is not None:
        result["_failed"] = True
    return result


@bench_cli.callback(invoke_without_command=True)
def bench(
    events: Annotated[
        int, typer.Option(min=1, help="Events for the raw relay and pipeline throughput.")
    ] = 5000,
    latency_events: Annotated[
        int, typer.Option(min=1, help="Events sent at a fixed rate for latency.")
    ] = 3000,
    rate_: Annotated[
        float | None,
        typer.Option("--rate", min=0.1, help="Latency phase rate, events/s (default: half max)."),
    ] = None,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions per topic.")] = 8,
    skip_api: Annotated[bool, typer.Option(help="Skip the API ingest phase.")] = False,
    skip_raw: Annotated[bool, typer.Option(help="Skip the raw aiokafka relay.")] = False,
    skip_chain: Annotated[
        bool, typer.Option(help="Skip the bare Faust chain (Faust's own ceiling).")
    ] = False,
    memory: Annotated[bool, typer.Option(help="Sample RSS and table size at checkpoints.")] = False,
    memory_checkpoints: Annotated[
        str, typer.Option(help="Distinct exceptions at which --memory samples (100k, 1M ok).")
    ] = "100k,250k,500k,1M",
    approvals: Annotated[
        bool,
        typer.Option(
            help="Time the list of pending approvals as the exceptions table grows (phase g)."
        ),
    ] = False,
    approvals_held: Annotated[
        int, typer.Option(min=1, help="Exceptions --approvals holds through the pipeline.")
    ] = 200,
    approvals_checkpoints: Annotated[
        str,
        typer.Option(help="Stored exceptions at which --approvals times the list (1k, 1M ok)."),
    ] = "1k,1M",
    approvals_requests: Annotated[
        int, typer.Option(min=1, help="Timed list requests per checkpoint, worker and API each.")
    ] = 50,
    tools: Annotated[
        str, typer.Option(help="'noop' tools, or 'http': a webhook to a loopback HTTP sink.")
    ] = "noop",
    raw_mode: Annotated[
        str, typer.Option(help="'tasks': one relay process, a task set per hop; 'procs': one each.")
    ] = "tasks",
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up events before measuring.")] = 200,
    timeout: Annotated[float, typer.Option(help="Deadline of each phase, seconds.")] = 900.0,
    output_dir: Annotated[Path, typer.Option(help="Where the JSON result goes.")] = Path("results"),
    py_spy: Annotated[
        str | None,
        typer.Option(help="py-spy binary to sample the worker (default: py-spy on PATH)."),
    ] = None,
    profile: Annotated[bool, typer.Option(help="Sample the worker with py-spy if found.")] = True,
    profile_throughput: Annotated[
        bool, typer.Option(help="Also run a py-spy-sampled max-throughput pass.")
    ] = False,
    api_single: Annotated[int, typer.Option(min=1, help="Exceptions POSTed one by one.")] = 5000,
    api_batched: Annotated[int, typer.Option(min=1, help="Exceptions POSTed in batches.")] = 20000,
    api_batch_size: Annotated[int, typer.Option(min=1, max=500)] = 100,
    api_concurrency: Annotated[int, typer.Option(min=1, help="In-flight single POSTs.")] = 32,
    api_batch_concurrency: Annotated[int, typer.Option(min=1, help="In-flight batches.")] = 4,
    keep: Annotated[bool, typer.Option(help="Keep the temp folder (logs, tables).")] = False,
    worker_log_level: Annotated[
        str, typer.Option(help="SLUICE_LOG_LEVEL of the worker under test.")
    ] = "warning",
    worker_command: Annotated[
        str | None,
        typer.Option(
            help="Run this instead of 'python -m app.cli worker' (same environment; for A/B "
            "runs of a tuned worker)."
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes of the same app id for the pipeline phases (CPU and RSS "
            "summed; py-spy samples worker 1).",
        ),
    ] = 1,
) -> None:
    """Benchmark Sluice on a real broker: raw relay limit, pipeline throughput and latency, memory,
    the approvals list, API ingest. Progress on stderr, a table on stdout, JSON in results/."""
    if tools not in ("noop", "http"):
        raise typer.BadParameter("--tools is 'noop' or 'http'")
    if raw_mode not in ("tasks", "procs"):
        raise typer.BadParameter("--raw-mode is 'tasks' or 'procs'")
    try:
        checkpoints = parse_checkpoints(memory_checkpoints)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        held_checkpoints = parse_checkpoints(approvals_checkpoints)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--approvals-checkpoints") from exc
    spy = (py_spy or shutil.which("py-spy")) if profile else None
    opts = Options(
        events=events,
        latency_events=latency_events,
        rate=rate_,
        partitions=partitions,
        skip_api=skip_api,
        skip_raw=skip_raw,
        skip_chain=skip_chain,
        memory=memory,
        checkpoints=checkpoints,
        tools=tools,
        raw_mode=raw_mode,
        warmup=warmup,
        timeout=timeout,
        output_dir=output_dir,
        py_spy=spy,
        profile_throughput=profile_throughput,
        api_single=api_single,
        api_batched=api_batched,
        api_batch_size=api_batch_size,
        api_concurrency=api_concurrency,
        api_batch_concurrency=api_batch_concurrency,
        keep=keep,
        worker_log_level=worker_log_level,
        worker_command=worker_command,
        workers=workers,
        approvals=approvals,
        approvals_held=approvals_held,
        approvals_checkpoints=held_checkpoints,
        approvals_requests=approvals_requests,
    )
    if profile and spy is None:
        echo("py-spy not found: CPU is reported per process only, not per stage")
    result = run_bench(opts)
    typer.echo(summary_table(result))
    typer.echo(f"\nresults: {result['_path']}")
    if result.get("_failed"):
        raise typer.Exit(1)
