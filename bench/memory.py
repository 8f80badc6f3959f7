"""Phase f (``--memory``): worker RSS, table folders on disk and RocksDB's own gauges at checkpoints
of distinct exceptions pushed through, and the readers of each."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.context import BenchContext, Options
from bench.kafka import Watcher, produce
from bench.procs import BenchError, echo
from bench.report import human_bytes
from bench.workers import worker_get, workers_memory
from bench.workload import phase_of


def parse_checkpoints(text: str) -> list[int]:
    """'100k,250k,1M' or '10000,50000' -> sorted distinct positive counts."""
    out: set[int] = set()
    for raw in text.split(","):
        item = raw.strip().lower().replace("_", "")
        if not item:
            continue
        factor = 1
        if item.endswith("k"):
            factor, item = 1_000, item[:-1]
        elif item.endswith("m"):
            factor, item = 1_000_000, item[:-1]
        value = int(float(item) * factor)
        if value <= 0:
            raise ValueError(f"a checkpoint must be positive, got {raw!r}")
        out.add(value)
    if not out:
        raise ValueError("no checkpoints given")
    return sorted(out)


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (like ``du -s``, in 512-byte blocks), 0 if it is missing."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def table_sizes(path: Path) -> dict[str, int]:
    """Bytes allocated per table under a worker's folder: Faust keeps one RocksDB folder per table
    and partition (``.../tables/<table>-<partition>.db``); the partitions of a table are summed."""
    sizes: dict[str, int] = {}
    for db in sorted(path.glob("**/tables/*.db")):
        table = db.name.removesuffix(".db").rpartition("-")[0] or db.name
        sizes[table] = sizes.get(table, 0) + disk_usage(db)
    return sizes


def sum_counts(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    """The figures of several dicts added up by name (a name one dict lacks counts 0 there)."""
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return dict(total)


def parse_table_metrics(text: str) -> dict[str, Any]:
    """The worker's RocksDB gauges from its /metrics page: per table the bytes of each kind plus
    ``keys_estimate``, and the shared cache and memtable budget under ``shared``."""
    from prometheus_client.parser import text_string_to_metric_families

    tables: dict[str, dict[str, int]] = {}
    shared: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            value = int(sample.value)
            if sample.name == "sluice_table_bytes":
                tables.setdefault(sample.labels["table"], {})[sample.labels["kind"]] = value
            elif sample.name == "sluice_table_keys_estimate":
                tables.setdefault(sample.labels["table"], {})["keys_estimate"] = value
            elif sample.name == "sluice_table_cache_bytes":
                shared[sample.labels["kind"]] = value
    return {"tables": tables, "shared": shared}


def sum_table_metrics(parts: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Several workers' :func:`parse_table_metrics` added up per table and kind (each worker has its
    own tables, cache and memtables); None if a worker did not answer."""
    known = [p for p in parts if p is not None]
    if not known or len(known) < len(parts):
        return None
    names = dict.fromkeys(table for p in known for table in p["tables"])
    return {
        "tables": {t: sum_counts(p["tables"].get(t, {}) for p in known) for t in names},
        "shared": sum_counts(p["shared"] for p in known),
    }


def worker_table_memory(port: int) -> dict[str, Any] | None:
    """What a worker's RocksDB reports (its /metrics), None if the worker does not answer."""
    resp = worker_get(port, "/metrics", timeout=10)
    if resp is None or resp.status_code != 200:
        return None
    return parse_table_metrics(resp.text)


def workers_table_memory(ctx: BenchContext) -> dict[str, Any] | None:
    """Every worker's RocksDB gauges added up, None if one does not answer."""
    return sum_table_metrics([worker_table_memory(port) for port in ctx.worker_ports])


async def run_memory(
    ctx: BenchContext,
    opts: Options,
    producer: Any,
    watcher: Watcher,
    topics: Any,
    phases: dict[str, Any],
) -> dict[str, Any]:
    """Push distinct exceptions through and sample at each checkpoint. The result is
    ``phases["memory"]`` from the start and grows a point per checkpoint, so an interrupted run
    (a million exceptions take hours) still reports the checkpoints it reached."""
    if not ctx.workers:
        raise BenchError("no worker is running")
    phase_key = phase_of(ctx.maker.key("mem", 0))
    before = watcher_total = sum(watcher.counts.values())
    points: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "checkpoints": points,
        "counted": "distinct exceptions completed by the workers since they started (all phases)",
        "workers": len(ctx.workers),
        "rss": "rss_bytes and hwm_bytes are summed over the workers, per_worker has each one's",
        "data_dir": "du of the workers' table folders (RocksDB stores of every table), summed",
        "table_bytes": "du of each table's RocksDB folders, summed over its partitions",
        "rocksdb": "the workers' sluice_table_* gauges, summed over the workers: per table "
        "memtables, table readers, SST bytes and estimated keys; the shared caches' capacity, usage"
        " and pinned bytes (one cache per worker)",
    }
    phases["memory"] = result
    start = time.perf_counter()
    sent = 0
    chunk = 5_000
    echo(f"memory: checkpoints {opts.checkpoints} distinct exceptions (counting {before:,} so far)")
    for checkpoint in opts.checkpoints:
        need = checkpoint - before
        while sent < need:
            n = min(chunk, need - sent)
            # keep at most ~4 chunks in flight so a checkpoint means "pushed through", not queued
            ahead_ok = await watcher.wait_for(
                phase_key, max(0, sent - 4 * chunk), opts.timeout, "memory", procs=ctx.workers
            )
            if not ahead_ok:
                raise BenchError("the memory phase stalled")
            await produce(producer, topics.ingested, ctx.maker.batch("mem", sent, n))
            sent += n
        if not await watcher.wait_for(
            phase_key, need, opts.timeout, f"memory {checkpoint:,}", procs=ctx.workers
        ):
            raise BenchError(f"the memory phase stalled before {checkpoint:,}")
        watcher_total = before + watcher.counts[phase_key]
        mem = workers_memory(ctx.workers)
        point: dict[str, Any] = {
            "exceptions": watcher_total,
            "rss_bytes": mem["rss_bytes"],
            "hwm_bytes": mem["hwm_bytes"],
            "per_worker": mem["per_worker"],
            "data_dir_bytes": sum(disk_usage(d) for d in ctx.worker_dirs),
            "table_bytes": sum_counts(table_sizes(d) for d in ctx.worker_dirs),
            "rocksdb": await asyncio.to_thread(workers_table_memory, ctx),
            "elapsed_s": round(time.perf_counter() - start, 1),
        }
        points.append(point)
        shared = (point["rocksdb"] or {}).get("shared", {})
        echo(
            f"memory checkpoint {watcher_total:,}: RSS {human_bytes(mem['rss_bytes'])}, "
            f"tables {human_bytes(point['data_dir_bytes'])}, RocksDB cache "
            f"{human_bytes(shared.get('usage'))} of {human_bytes(shared.get('capacity'))}"
        )
    return result
