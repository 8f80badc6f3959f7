"""Phases b and c, on real Sluice workers: the startup probe and warm-up, throughput flat out (b),
latency at a fixed rate (c), the optional profiled pass, then phases f (:mod:`bench.memory`) and g
(:mod:`bench.approvals`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from bench.approvals import run_approvals
from bench.context import BenchContext, Options
from bench.kafka import (
    GroupLag,
    Watcher,
    ensure,
    new_producer,
    produce,
    read_stamps,
    seen_after_ack,
    send_paced,
)
from bench.memory import run_memory
from bench.procs import BenchError, Proc, echo
from bench.stats import hop_breakdown, latency_summary, rate, stage_finish
from bench.workers import (
    start_workers,
    wait_workers_ready,
    worker_figures,
    worker_stats,
    workers_memory,
)
from bench.workload import phase_of


async def run_pipeline_phases(
    ctx: BenchContext, opts: Options, phases: dict[str, Any], notes: list[str]
) -> None:
    from app.topics import TopicNames

    topics = TopicNames(ctx.prefix)
    await ensure(ctx.bootstrap, topics.all(), ctx.partitions)
    echo(
        f"starting {ctx.worker_count} worker(s) (app id {ctx.app_id}, "
        f"{ctx.partitions} partitions) ..."
    )
    t_start = time.perf_counter()
    workers = start_workers(ctx)
    startup: dict[str, Any] = {"workers": len(workers)}
    phases["startup"] = startup
    try:
        await asyncio.to_thread(wait_workers_ready, ctx, 180)
        startup["ready_s"] = round(time.perf_counter() - t_start, 1)
        await _measure_pipeline(ctx, opts, topics, phases, notes)
    finally:
        echo("stopping the worker(s) ...")
        for proc in reversed(workers):
            code = ctx.procs.stop(proc, timeout=60)
            if code not in (0, None):
                notes.append(f"{proc.name} exited with {code} when stopped")


async def _measure_pipeline(
    ctx: BenchContext, opts: Options, topics: Any, phases: dict[str, Any], notes: list[str]
) -> None:
    """Probe, warm-up, then phases b, c, the profiled pass, f and g, once every worker is ready."""
    workers = ctx.workers
    startup = phases["startup"]
    watcher = Watcher(ctx.bootstrap, topics.completed, ctx.partitions)
    await watcher.start()
    producer = new_producer(ctx.bootstrap)
    await producer.start()
    try:
        # A probe before measuring. On a fresh deployment the worker can start before the metadata
        # of its newest changelog topics reached its consumer; agents writing those tables then
        # crash on PartitionsMismatch (Faust restarts them) until the consumer's next metadata
        # refresh, up to 5 minutes. The probe waits that out, and the run says it happened.
        t_probe = time.perf_counter()
        await produce(producer, topics.ingested, ctx.maker.batch("probe", 0, 20))
        probe_ok = await watcher.wait_for(
            phase_of(ctx.maker.key("probe", 0)),
            20,
            max(opts.timeout, 420),
            "startup probe",
            procs=workers,
        )
        crashes = sum(_crashes(w) for w in workers)
        startup.update(
            probe_ok=probe_ok,
            probe_s=round(time.perf_counter() - t_probe, 1),
            agent_crashes_during_probe=crashes,
        )
        if crashes:
            notes.append(
                f"worker startup: {crashes} agent crash(es) in the worker logs "
                f"({_first_crash(workers)}); the first 20 events took {startup['probe_s']}s to "
                "complete. Measurements start after that."
            )
            echo(f"worker agents crashed {crashes} times at startup (see notes)")
        if not probe_ok:
            raise BenchError(f"the startup probe did not complete:\n{_log_tails(workers)}")
        if opts.warmup:
            echo(f"pipeline warm-up: {opts.warmup} events")
            t_warm = time.perf_counter()
            await produce(producer, topics.ingested, ctx.maker.batch("warm", 0, opts.warmup))
            if not await watcher.wait_for(
                phase_of(ctx.maker.key("warm", 0)),
                opts.warmup,
                opts.timeout,
                "warm-up",
                procs=workers,
            ):
                raise BenchError(f"warm-up did not complete:\n{_log_tails(workers)}")
            startup["warmup_s"] = round(time.perf_counter() - t_warm, 2)
            startup["agent_crashes_after_warmup"] = sum(_crashes(w) for w in workers)

        # (b) throughput
        echo(f"pipeline: {opts.events:,} events, as fast as possible")
        payload = list(ctx.maker.batch("thr", 0, opts.events))
        phase = phase_of(payload[0][0])
        meter = ctx.worker_meter().start()
        t0_wall = time.time()
        t0 = time.perf_counter()
        await produce(producer, topics.ingested, payload)
        produced_s = time.perf_counter() - t0
        ok = await watcher.wait_for(phase, opts.events, opts.timeout, "pipeline", procs=workers)
        end = watcher.last_new.get(phase, time.perf_counter())
        cpu = meter.stop()
        done = watcher.counts[phase]
        elapsed = end - t0
        phases["pipeline"] = {
            "events": opts.events,
            "completed": done,
            "timed_out": not ok,
            "partitions": ctx.partitions,
            "workers": len(workers),
            "tools": opts.tools_label,
            "message_bytes": len(payload[0][1]),
            "seconds": round(elapsed, 3),
            "produce_seconds": round(produced_s, 3),
            "exceptions_per_s": rate(done, elapsed),
            **worker_figures(cpu, done, workers_memory(workers)),
            "broker_cpu_pct": cpu.get("broker_cpu_pct"),
            "others_cpu_pct": cpu.get("others_cpu_pct"),
            "cpu": cpu,
            "stats_from_worker_1": await asyncio.to_thread(worker_stats, ctx),
        }
        chain = _chain(topics)
        stamps = await read_stamps(ctx.bootstrap, chain, ctx.partitions, phase.decode() + "-")
        phases["pipeline"]["stage_finish_s"] = stage_finish(stamps, t0_wall)
        phases["pipeline"]["per_stage"] = hop_breakdown(stamps)
        del payload
        watcher.forget(phase)
        if not ok:
            notes.append(f"pipeline phase timed out after {opts.timeout}s with {done} done")
        max_rate = phases["pipeline"]["exceptions_per_s"]
        # The last completion is not the end of the work: the projection (and the group stage)
        # may still be folding a backlog. Phase c starts on idle workers, or it measures that too.
        caught_up = await wait_caught_up(ctx, opts.timeout)
        if caught_up is None:
            raise BenchError(f"the workers had not caught up {opts.timeout}s after phase b")
        after = phases["pipeline"]["caught_up_after_s"] = round(caught_up - end, 1)
        echo(f"every agent caught up {after}s after the last completion")

        # (c) latency at a fixed rate
        target = opts.rate or max(1.0, round(max_rate / 2, 1))
        phases["latency"] = await run_latency(ctx, opts, producer, watcher, topics, target)
        if "latency_profile" in phases["latency"]:
            phases.setdefault("profile", {})["latency"] = phases["latency"].pop("latency_profile")

        # optional profiled throughput pass (not used for the figure above)
        if opts.profile_throughput and opts.py_spy:
            phases.setdefault("profile", {})["throughput"] = await run_profiled_throughput(
                ctx, opts, producer, watcher, topics
            )

        # (f) memory
        if opts.memory:
            # run_memory fills phases["memory"] as it goes: a run stopped early keeps its checkpoints
            await run_memory(ctx, opts, producer, watcher, topics, phases)

        # (g) approvals
        if opts.approvals:
            completed = sum(watcher.counts.values())
            # its synthetic completions are for the projection only: the watcher would keep every
            # id of a million in memory, and take CPU from the workers, to count them
            await watcher.stop()
            await run_approvals(ctx, opts, producer, topics, phases, notes, completed)
    finally:
        await producer.stop()
        await watcher.stop()


def _chain(topics: Any) -> list[str]:
    return [
        topics.ingested,
        topics.fingerprinted,
        topics.accepted,
        topics.triaged,
        topics.decided,
        topics.planned,
        topics.completed,
    ]


def _crashes(proc: Proc) -> int:
    if proc.log_path is None or not proc.log_path.exists():
        return 0
    return proc.log_path.read_text(errors="replace").count("Crashed reason=")


def _first_crash(procs: Sequence[Proc]) -> str:
    for proc in procs:
        if proc.log_path is None or not proc.log_path.exists():
            continue
        for line in proc.log_path.read_text(errors="replace").splitlines():
            if "Crashed reason=" in line:
                return f"{proc.name}: {line.split('Crashed reason=', 1)[1][:160]}"
    return ""


def _log_tails(procs: Sequence[Proc]) -> str:
    """The end of each process's log, under its name when there are several."""
    if len(procs) == 1:
        return procs[0].log_tail()
    return "\n".join(f"--- {proc.name}\n{proc.log_tail()}" for proc in procs)


async def run_latency(
    ctx: BenchContext,
    opts: Options,
    producer: Any,
    watcher: Watcher,
    topics: Any,
    target: float,
) -> dict[str, Any]:
    if not ctx.workers:
        raise BenchError("no worker is running")
    count = opts.latency_events
    echo(f"latency: {count:,} events at {target:,.1f}/s (~{count / target:,.0f}s)")
    payload = list(ctx.maker.batch("lat", 0, count))
    phase = phase_of(payload[0][0])
    watcher.timed_phases.add(phase)
    profiler = None
    if opts.py_spy:
        out = opts.output_dir / f"profile-{opts.stamp}-latency.txt"
        profiler = ctx.profiler(opts.py_spy, out).start(count / target + 60)
    meter = ctx.worker_meter().start()
    send_s, acked = await send_paced(producer, topics.ingested, payload, target)
    ok = await watcher.wait_for(phase, count, opts.timeout, "latency", procs=ctx.workers)
    cpu = meter.stop()
    mem = workers_memory(ctx.workers)
    done = watcher.counts[phase]
    result: dict[str, Any] = {
        "target_rate": round(target, 1),
        "achieved_rate": rate(count, send_s),
        "events": count,
        "completed": done,
        "timed_out": not ok,
        "latency": latency_summary(seen_after_ack(watcher, acked)),
        "measured_from": "producer ack (acks=all) to first sight on the completed topic",
        "workers": len(ctx.workers),
        **worker_figures(cpu, done, mem),
        "broker_cpu_pct": cpu.get("broker_cpu_pct"),
        "others_cpu_pct": cpu.get("others_cpu_pct"),
        "cpu": cpu,
    }
    stamps = await read_stamps(ctx.bootstrap, _chain(topics), ctx.partitions, phase.decode() + "-")
    result["per_stage"] = hop_breakdown(stamps, dict(watcher.first_seen_wall))
    result["per_stage_method"] = (
        "output record CreateTime minus input record CreateTime, per exception (ms); the "
        "completed -> consumer row is the bench's consumer clock minus the completed record's"
    )
    if profiler is not None:
        result["latency_profile"] = profiler.finish(cpu)
        result["cpu_per_stage"] = "py-spy samples, see profile.latency"
    else:
        result["cpu_per_stage"] = "not attributed (py-spy not found): total only"
    watcher.timed_phases.discard(phase)
    watcher.first_seen.clear()
    watcher.first_seen_wall.clear()
    watcher.forget(phase)
    return result


async def run_profiled_throughput(
    ctx: BenchContext, opts: Options, producer: Any, watcher: Watcher, topics: Any
) -> dict[str, Any]:
    if not ctx.workers or opts.py_spy is None:
        raise BenchError("no worker is running, or py-spy is missing")
    count = opts.events
    echo(f"profiled throughput pass: {count:,} events under py-spy")
    payload = list(ctx.maker.batch("prof", 0, count))
    phase = phase_of(payload[0][0])
    out = opts.output_dir / f"profile-{opts.stamp}-throughput.txt"
    profiler = ctx.profiler(opts.py_spy, out).start(opts.timeout)
    meter = ctx.worker_meter(broker=False).start()
    t0 = time.perf_counter()
    await produce(producer, topics.ingested, payload)
    ok = await watcher.wait_for(
        phase, count, opts.timeout, "profiled throughput", procs=ctx.workers
    )
    end = watcher.last_new.get(phase, time.perf_counter())
    cpu = meter.stop()
    data = profiler.finish(cpu)
    data["exceptions_per_s_under_profiler"] = rate(watcher.counts[phase], end - t0)
    data["worker_cpu_pct"] = cpu.get("workers_cpu_pct")  # every worker's, summed
    data["cpu"] = cpu
    data["timed_out"] = not ok
    watcher.forget(phase)
    return data


async def wait_caught_up(ctx: BenchContext, within: float) -> float | None:
    """The ``perf_counter`` time at which the workers' group had committed every record of its
    input topics (the projection and every agent idle), or None if not within ``within`` s.
    Offsets are committed every few seconds, so it is late by up to that much."""
    async with GroupLag(ctx.bootstrap, ctx.app_id, ctx.partitions) as group:
        return await group.caught_up(within)
