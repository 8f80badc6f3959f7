"""Phase d: a ``sluice api`` process under a bounded load generator (fixed concurrency, fixed
count) on loopback, for ``POST /v1/exceptions`` and ``POST /v1/exceptions:batch``."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import Counter
from typing import Any

import orjson

from bench.context import BenchContext, Options
from bench.procs import echo, wait_http
from bench.stats import latency_summary, rate
from bench.system import CpuMeter
from bench.workload import API_KEY, SOURCE


async def run_api(ctx: BenchContext, opts: Options) -> dict[str, Any]:
    from app.kafka_local import free_port

    port = free_port()
    api = ctx.procs.start(
        "api",
        [sys.executable, "-m", "app.cli", "api", "--port", str(port)],
        ctx.env(SLUICE_WORKER_URLS='["http://127.0.0.1:9"]'),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_http, f"{url}/healthz", api, 90)
        out: dict[str, Any] = {
            "url": "loopback",
            "client": "httpx.AsyncClient in the bench process",
        }
        # a short warm-up so connection setup and first-call costs are not in the figures
        await _load(url, api.pid, ctx, 50, 1, 8, "apiwarm", opts.timeout)
        out["single"] = await _load(
            url, api.pid, ctx, opts.api_single, 1, opts.api_concurrency, "apis", opts.timeout
        )
        batches = max(1, opts.api_batched // opts.api_batch_size)
        out["batch"] = await _load(
            url,
            api.pid,
            ctx,
            batches * opts.api_batch_size,
            opts.api_batch_size,
            opts.api_batch_concurrency,
            "apib",
            opts.timeout,
        )
        out["api_alive_after"] = api.alive()
        if not api.alive() or any(out[k]["transport_errors"] for k in ("single", "batch")):
            out["api_log_tail"] = api.log_tail(30)
        return out
    finally:
        ctx.procs.stop(api)


async def _load(
    url: str,
    api_pid: int,
    ctx: BenchContext,
    exceptions: int,
    per_request: int,
    conc: int,
    tag: str,
    within: float,
) -> dict[str, Any]:
    import httpx

    requests = max(1, exceptions // per_request)
    label = "single" if per_request == 1 else f"batch of {per_request}"
    if tag != "apiwarm":
        echo(f"api {label}: {requests:,} requests, concurrency {conc}")
    counter = itertools.count()
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    accepted = 0
    latencies: list[float] = []
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}

    def body(i: int) -> bytes:
        report = {
            "source": SOURCE,
            "error_type": f"BenchError{i % 256:03d}",
            "message": f"Card declined for order {i:08d} (customer {i % 9973}, amount 99.90 EUR)",
            "external_ref": f"ord-{i:08d}",
            "attributes": {"region": "eu-west", "customer_tier": "standard", "n": i},
        }
        if per_request == 1:
            return orjson.dumps(report)
        return orjson.dumps({"items": [report] * per_request})

    path = "/v1/exceptions" if per_request == 1 else "/v1/exceptions:batch"
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal accepted
        while (i := next(counter)) < requests:
            t = time.perf_counter()
            try:
                resp = await client.post(path, content=body(i), headers=headers)
            except httpx.HTTPError as exc:  # counted, not fatal: the figure says how many failed
                errors[type(exc).__name__] += 1
                continue
            latencies.append(time.perf_counter() - t)
            statuses[resp.status_code] += 1
            if per_request == 1:
                accepted += resp.status_code == 202
            elif resp.status_code == 200:
                accepted += int(resp.json().get("accepted", 0))

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        meter = CpuMeter({"api": api_pid} | ctx.broker_pid()).start()
        await asyncio.wait_for(
            asyncio.gather(*(worker(client) for _ in range(conc))), timeout=within
        )
        cpu = meter.stop()
    return {
        "requests": requests,
        "per_request": per_request,
        "exceptions": requests * per_request,
        "accepted": accepted,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "transport_errors": dict(errors),
        "concurrency": conc,
        "seconds": cpu["wall_s"],
        "exceptions_per_s": rate(accepted, cpu["wall_s"]),
        "requests_per_s": rate(requests, cpu["wall_s"]),
        "request_latency": latency_summary(latencies),
        "api_cpu_pct": cpu.get("api_cpu_pct"),
        "client_cpu_pct": cpu.get("client_cpu_pct"),
        "broker_cpu_pct": cpu.get("broker_cpu_pct"),
        "others_cpu_pct": cpu.get("others_cpu_pct"),
    }
