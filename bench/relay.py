"""Phases a and a2: the limit a relay sets. The pipeline's six hops relayed by plain aiokafka
consumers and producers (a), then by a bare chain of Faust agents (a2, :mod:`bench.chain`), timed
flat out and at half the rate they reached."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import typer

from bench.context import BenchContext
from bench.kafka import Watcher, ensure, new_producer, produce, seen_after_ack, send_paced
from bench.procs import BenchError, Proc, echo
from bench.stats import latency_summary, rate
from bench.system import CpuMeter
from bench.workload import phase_of

HOPS = 6


def relay_main() -> None:
    """Entry of a relay subprocess: ``python -c 'from bench.relay import relay_main; relay_main()'
    '<json config>'``. Prints ``ready`` once every hop has its partitions; SIGTERM stops it."""
    config = json.loads(sys.argv[1])
    asyncio.run(_relay(config))


async def _relay(config: dict[str, Any]) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    bootstrap = config["bootstrap"]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    consumers = []
    for src, _dst in config["hops"]:
        consumer = AIOKafkaConsumer(
            src,
            bootstrap_servers=bootstrap,
            group_id=f"{config['group']}-{src}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        consumers.append(consumer)

    async def hop(consumer: Any, dst: str) -> None:
        last_commit = time.monotonic()
        pending = False
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100)
            futures = [
                await producer.send(dst, rec.value, key=rec.key)
                for records in batch.values()
                for rec in records
            ]
            if futures:
                await asyncio.gather(*futures)  # acked before the offsets are committed
                pending = True
            if pending and time.monotonic() - last_commit >= config["commit_interval"]:
                await consumer.commit()
                last_commit, pending = time.monotonic(), False

    tasks = [
        asyncio.create_task(hop(c, dst))
        for c, (_src, dst) in zip(consumers, config["hops"], strict=True)
    ]
    try:
        while True:
            if all(c.assignment() for c in consumers):
                break
            await asyncio.sleep(0.05)
        typer.echo("ready")
        sys.stdout.flush()
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in consumers:
            await c.stop()
        await producer.stop()


async def run_raw(
    ctx: BenchContext, events: int, mode: str, warmup: int, within: float, paced: int = 0
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    topics = [f"bench-raw-{tag}.h{i}" for i in range(HOPS + 1)]
    await ensure(ctx.bootstrap, topics, ctx.partitions)
    hops = list(itertools.pairwise(topics))
    groups = [hops] if mode == "tasks" else [[h] for h in hops]
    relays: list[Proc] = []
    for i, group in enumerate(groups):
        cfg = {
            "bootstrap": ctx.bootstrap,
            "hops": group,
            "group": f"raw-{tag}",
            "commit_interval": 1,
        }
        code = "from bench.relay import relay_main; relay_main()"
        relays.append(
            ctx.procs.start(f"relay-{tag}-{i}", [sys.executable, "-c", code, json.dumps(cfg)])
        )
    echo(f"raw relay ({mode}): {events:,} records over {HOPS} hops")
    figures = await relay_through(ctx, relays, topics, "raw", events, warmup, within, paced)
    return {
        "mode": mode,
        "processes": len(relays),
        **figures,
        "semantics": "getmany -> send batch -> await acks (acks=all) -> commit at most every 1s",
    }


async def run_chain(
    ctx: BenchContext, events: int, warmup: int, within: float, paced: int = 0
) -> dict[str, Any]:
    """Phase a2: the same hops as a bare chain of Faust agents (bench/chain.py), batched and
    configured as the pipeline's stages are: Faust's own ceiling for one agent per stage."""
    from app.kafka_local import free_port
    from app.settings import Settings

    tag = uuid.uuid4().hex[:8]
    topics = [f"bench-chain-{tag}.h{i}" for i in range(HOPS + 1)]
    await ensure(ctx.bootstrap, topics, ctx.partitions)
    env = ctx.env(
        SLUICE_APP_ID=f"{ctx.app_id}-chain",
        SLUICE_WORKER_WEB_PORT=str(free_port()),
        SLUICE_WORKER_DATA_DIR=str(ctx.root / "chain-data"),
        SLUICE_BENCH_HOPS=json.dumps(list(itertools.pairwise(topics))),
    )
    chain = ctx.procs.start(f"chain-{tag}", [sys.executable, "-m", "bench.chain"], env)
    echo(f"Faust chain: {events:,} records over {HOPS} agents")
    figures = await relay_through(ctx, [chain], topics, "chain", events, warmup, within, paced)
    return {
        **figures,
        "batch_max": Settings().worker_batch_max,
        "semantics": (
            "one Faust agent per hop, Sluice's app settings and batching: take the fetched "
            "records -> send each (force, acks=all) -> await the acks -> ack"
        ),
    }


async def relay_through(
    ctx: BenchContext,
    relays: list[Proc],
    topics: list[str],
    name: str,
    events: int,
    warmup: int,
    within: float,
    paced: int = 0,
) -> dict[str, Any]:
    """Push ``events`` records into ``topics[0]`` and time them out of ``topics[-1]``, once the
    ``relays`` (stopped at the end) are ready and a warm-up went through; their CPU is metered.
    Then, with ``paced`` > 0, send that many at half the rate reached and time each one from its
    produce ack to its sight on ``topics[-1]`` (as phase c does for the pipeline)."""
    half_rate: dict[str, Any] | None = None
    try:
        await _wait_ready_lines(relays, within=90)
        watcher = Watcher(ctx.bootstrap, topics[-1], ctx.partitions)
        await watcher.start()
        producer = new_producer(ctx.bootstrap)
        await producer.start()
        try:
            if warmup:
                await produce(producer, topics[0], ctx.maker.batch(f"{name}warm", 0, warmup))
                warm = phase_of(ctx.maker.key(f"{name}warm", 0))
                await watcher.wait_for(warm, warmup, within, f"{name} warm-up", procs=relays)
            payload = list(ctx.maker.batch(name, 0, events))
            phase = phase_of(payload[0][0])
            meter = CpuMeter(
                {f"relay{i}": p.pid for i, p in enumerate(relays)} | ctx.broker_pid()
            ).start()
            t0 = time.perf_counter()
            await produce(producer, topics[0], payload)
            produced_s = time.perf_counter() - t0
            ok = await watcher.wait_for(phase, events, within, name, procs=relays)
            end = watcher.last_new.get(phase, time.perf_counter())
            cpu = meter.stop()
            if paced and ok:
                target = max(1.0, round(rate(watcher.counts[phase], end - t0) / 2, 1))
                half_rate = await _paced_through(
                    ctx, relays, producer, watcher, topics[0], name, paced, target, within
                )
        finally:
            await producer.stop()
            await watcher.stop()
    finally:
        for proc in relays:
            ctx.procs.stop(proc)
    done = watcher.counts[phase]
    elapsed = end - t0
    return {
        "hops": HOPS,
        "partitions": ctx.partitions,
        "events": events,
        "completed": done,
        "timed_out": not ok,
        "message_bytes": len(payload[0][1]),
        "seconds": round(elapsed, 3),
        "produce_seconds": round(produced_s, 3),
        "records_per_s": rate(done, elapsed),
        "hop_records_per_s": rate(done * HOPS, elapsed),
        **relay_cpu(cpu, done),
        "cpu": cpu,
        "half_rate": half_rate,
    }


async def _paced_through(
    ctx: BenchContext,
    relays: list[Proc],
    producer: Any,
    watcher: Watcher,
    topic: str,
    name: str,
    count: int,
    target: float,
    within: float,
) -> dict[str, Any]:
    """``count`` records sent into ``topic`` at ``target``/s, each timed from its produce ack to
    its sight by ``watcher``."""
    echo(f"{name}: {count:,} records at {target:,.1f}/s (~{count / target:,.0f}s)")
    payload = list(ctx.maker.batch(f"{name}lat", 0, count))
    phase = phase_of(payload[0][0])
    watcher.timed_phases.add(phase)
    meter = CpuMeter({f"relay{i}": p.pid for i, p in enumerate(relays)}).start()
    sent_s, acked = await send_paced(producer, topic, payload, target)
    ok = await watcher.wait_for(phase, count, within, f"{name} at half rate", procs=relays)
    cpu = meter.stop()
    done = watcher.counts[phase]
    return {
        "target_rate": target,
        "achieved_rate": rate(count, sent_s),
        "events": count,
        "completed": done,
        "timed_out": not ok,
        "latency": latency_summary(seen_after_ack(watcher, acked)),
        "measured_from": "producer ack (acks=all) to first sight on the last hop's topic",
        **relay_cpu(cpu, done),
    }


def relay_cpu(cpu: dict[str, float], records: int) -> dict[str, float | None]:
    """The relaying processes' CPU (``relay<n>`` in ``cpu``): seconds, % of one core, and what one
    record cost them at one hop (comparable between the relay and the Faust chain)."""
    spent = sum(v for k, v in cpu.items() if k.startswith("relay") and k.endswith("_cpu_s"))
    wall = cpu.get("wall_s")
    return {
        "relay_cpu_s": round(spent, 2),
        "relay_cpu_pct": round(100 * spent / wall, 1) if wall else None,
        "cpu_us_per_record_hop": round(1e6 * spent / (records * HOPS), 1) if records else None,
    }


async def _wait_ready_lines(procs: Sequence[Proc], within: float) -> None:
    """Relay children print 'ready' into their log once every hop has its partitions."""
    deadline = time.monotonic() + within
    pending = list(procs)
    while pending:
        for proc in list(pending):
            if not proc.alive():
                raise BenchError(f"{proc.name} exited early:\n{proc.log_tail()}")
            if proc.log_path and "ready" in proc.log_path.read_text(errors="replace"):
                pending.remove(proc)
        if time.monotonic() > deadline:
            raise BenchError("relay processes did not get their partitions in time")
        await asyncio.sleep(0.1)
