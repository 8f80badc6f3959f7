"""The Sluice workers under test: started (one or N of one app id, each with its own port, folder
and log), waited for, and asked for their figures (CPU, RSS, /sluice/stats)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bench.context import BenchContext
from bench.procs import Proc, wait_http
from bench.system import memory_of, sum_memory

if TYPE_CHECKING:
    import httpx


def worker_name(index: int) -> str:
    """Worker 1 keeps the single-worker name (``worker``, logging to ``worker.log``); the others
    are ``worker-2``, ``worker-3``, ..."""
    return "worker" if index == 1 else f"worker-{index}"


def distinct_ports(count: int, pick: Callable[[], int]) -> list[int]:
    """``count`` different ports from ``pick``: two free ports asked for in a row can be the same
    one, as nothing listens on the first yet."""
    ports: list[int] = []
    while len(ports) < count:
        if (port := pick()) not in ports:
            ports.append(port)
    return ports


def start_workers(ctx: BenchContext) -> list[Proc]:
    """``ctx.worker_count`` workers of the bench's app id, each with its own port, folder and log
    (the same command for each: ``--worker-command`` or ``python -m app.cli worker``)."""
    from app.kafka_local import free_port

    command = ctx.worker_command or [sys.executable, "-m", "app.cli", "worker"]
    ctx.worker_ports = distinct_ports(ctx.worker_count, free_port)
    for index, port in enumerate(ctx.worker_ports, start=1):
        ctx.workers.append(
            ctx.procs.start(worker_name(index), command, ctx.worker_env(index, port))
        )
    return ctx.workers


def wait_workers_ready(ctx: BenchContext, within: float) -> None:
    """Until every worker answers /sluice/ready in one pass. Each worker joining the group makes
    it rebalance, and a rebalancing worker is not ready: the ones found ready are asked again."""
    deadline = time.monotonic() + within
    waited = True
    while waited:
        waited = False
        for proc, port in zip(ctx.workers, ctx.worker_ports, strict=True):
            resp = worker_get(port, "/sluice/ready", timeout=2)
            if resp is None or not resp.is_success:
                url = f"http://127.0.0.1:{port}/sluice/ready"
                wait_http(url, proc, max(0.0, deadline - time.monotonic()))
                waited = True


def worker_get(port: int, path: str, timeout: float) -> httpx.Response | None:
    """GET ``path`` from the worker on ``port``: the response, or None if it did not answer."""
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=timeout)
    except httpx.HTTPError:
        return None


def workers_memory(procs: Sequence[Proc]) -> dict[str, Any]:
    """RSS and peak RSS summed over ``procs``, and each one's under ``per_worker``."""
    per_worker = [{"worker": p.name, "pid": p.pid, **memory_of(p.pid)} for p in procs]
    return {**sum_memory(per_worker), "per_worker": per_worker}


def worker_figures(cpu: dict[str, float], done: int, memory: dict[str, Any]) -> dict[str, Any]:
    """A phase's worker CPU and RSS, summed over every worker: ``cpu`` from
    :meth:`BenchContext.worker_meter` (it keeps each worker's too), ``memory`` from
    :func:`workers_memory`."""
    return {
        "worker_cpu_s": cpu.get("workers_cpu_s"),
        "worker_cpu_pct": cpu.get("workers_cpu_pct"),
        "worker_cpu_ms_per_exception": _per(cpu.get("workers_cpu_s"), done),
        "worker_rss_bytes": memory["rss_bytes"],
        "worker_hwm_bytes": memory["hwm_bytes"],
        "per_worker_memory": memory["per_worker"],
    }


def worker_stats(ctx: BenchContext) -> dict[str, Any] | None:
    """Worker 1's /sluice/stats (which adds what it gets from the group's other workers)."""
    resp = worker_get(ctx.worker_ports[0], "/sluice/stats", timeout=5)
    try:
        data: dict[str, Any] | None = None if resp is None else resp.json()
    except ValueError:
        return None
    return data


def _per(cpu_s: float | None, count: int) -> float | None:
    return round(1000 * cpu_s / count, 3) if cpu_s is not None and count else None
