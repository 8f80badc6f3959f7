"""Latency statistics of the bench: nearest-rank percentiles, their summary in milliseconds, where
the time goes stage by stage (from the records' own timestamps), and rates."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``p`` % of values <= it."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, float | int]:
    """p50/p95/p99/max/mean in milliseconds of latencies given in seconds."""
    if not seconds:
        return {"count": 0}
    ordered = sorted(seconds)
    ms = 1000.0
    return {
        "count": len(ordered),
        "p50_ms": round(percentile(ordered, 50) * ms, 2),
        "p95_ms": round(percentile(ordered, 95) * ms, 2),
        "p99_ms": round(percentile(ordered, 99) * ms, 2),
        "max_ms": round(ordered[-1] * ms, 2),
        "mean_ms": round(sum(ordered) / len(ordered) * ms, 2),
    }


HOP_STAGES = ("intake", "group", "triage", "policy", "playbook", "tool")


def hop_breakdown(
    stamps: Sequence[dict[str, float]],
    seen: dict[str, float] | None = None,
    stages: Sequence[str] = HOP_STAGES,
) -> dict[str, dict[str, float | int]]:
    """Where the end-to-end time goes, per stage.

    ``stamps[i]`` maps exception id -> timestamp (epoch seconds) of its record on the i-th topic of
    the chain (ingested, fingerprinted, ..., completed: one more topic than ``stages``). A stage's
    time is its output record's timestamp minus its input's: queueing, fetch, processing and the
    send up to the output's creation. ``seen`` (exception id -> epoch seconds when the completed
    record was consumed) adds the delivery of the last record to a consumer.
    """
    if len(stamps) != len(stages) + 1:
        raise ValueError(f"{len(stages)} stages need {len(stages) + 1} topics, got {len(stamps)}")
    out: dict[str, dict[str, float | int]] = {}
    complete = set(stamps[0]).intersection(*stamps[1:])
    for i, stage in enumerate(stages):
        out[stage] = latency_summary([stamps[i + 1][x] - stamps[i][x] for x in complete])
    if seen is not None:
        last = stamps[-1]
        out["completed -> consumer"] = latency_summary(
            [seen[x] - last[x] for x in complete if x in seen]
        )
    return out


def stage_finish(
    stamps: Sequence[dict[str, float]], start: float, stages: Sequence[str] = HOP_STAGES
) -> dict[str, float | None]:
    """Seconds from ``start`` until each stage wrote its last output (and until the producer's
    last input record, as ``input``): under a burst it shows which stage the others wait for."""
    names = ["input", *stages]
    return {
        name: round(max(s.values()) - start, 2) if s else None
        for name, s in zip(names, stamps, strict=True)
    }


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0
