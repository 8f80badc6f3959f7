"""The human summary of a run: the table printed to stdout, one row per figure, then the targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.results import share_of


def summary_table(result: dict[str, Any]) -> str:
    """The human summary: one row per measured figure, then the targets."""
    rows: list[tuple[str, str, object, str]] = []
    raw, pipe, lat = result.get("raw"), result.get("pipeline"), result.get("latency")
    chain = result.get("chain")
    if raw:
        rows.append(
            ("a raw relay", "records/s end to end", raw.get("records_per_s"), _raw_note(raw))
        )
        rows.extend(_half_rate_rows("a raw relay", raw))
    if chain:
        note = (
            f"{chain.get('hops')} agents, CPU {chain.get('relay_cpu_pct')}%, "
            f"{chain.get('cpu_us_per_record_hop')} us/record/hop, "
            f"other processes {(chain.get('cpu') or {}).get('others_cpu_pct', '-')}%"
        )
        rows.append(("a2 Faust chain", "records/s end to end", chain.get("records_per_s"), note))
        if (pct := share_of(chain.get("records_per_s"), raw)) is not None:
            rows.append(("a2 Faust chain", "% of raw relay", pct, ""))
        rows.extend(_half_rate_rows("a2 Faust chain", chain))
    if pipe:
        note = (
            f"{pipe.get('completed')}/{pipe.get('events')} done, "
            f"workers={pipe.get('workers', 1)}, tools={pipe.get('tools')}"
        )
        rows.append(("b pipeline", "exceptions/s end to end", pipe.get("exceptions_per_s"), note))
        for label, whole in (("% of raw relay", raw), ("% of Faust chain", chain)):
            if (pct := share_of(pipe.get("exceptions_per_s"), whole)) is not None:
                rows.append(("b pipeline", label, pct, ""))
        for stage, secs in (pipe.get("stage_finish_s") or {}).items():
            rows.append(("b pipeline", f"  {stage} last output at s", secs, "after first produce"))
        if "caught_up_after_s" in pipe:
            note = "after the last completion (projection included; offsets commit every ~3s)"
            rows.append(
                ("b pipeline", "every agent caught up at s", pipe["caught_up_after_s"], note)
            )
        rows.append(
            (
                "b pipeline",
                "worker CPU % (of one core)",
                pipe.get("worker_cpu_pct"),
                f"{_summed(pipe)}broker {pipe.get('broker_cpu_pct', '-')}%, "
                f"other processes {pipe.get('others_cpu_pct', '-')}%",
            )
        )
    if lat:
        latency = lat.get("latency") or {}
        at = f"at {lat.get('achieved_rate')}/s (target {lat.get('target_rate')}/s)"
        for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
            rows.append(("c latency", f"ack->completed {key[:-3]} ms", latency.get(key), at))
        rows.append(
            (
                "c latency",
                "worker CPU s / % of one core",
                lat.get("worker_cpu_s"),
                f"{_summed(lat)}{lat.get('worker_cpu_pct')}%, "
                f"{lat.get('worker_cpu_ms_per_exception')} ms/exc, "
                f"other processes {lat.get('others_cpu_pct', '-')}%",
            )
        )
        rows.append(
            (
                "c latency",
                "worker RSS MiB",
                _mib(lat.get("worker_rss_bytes")),
                f"{_summed(lat)}at phase end",
            )
        )
        for stage, summary in (lat.get("per_stage") or {}).items():
            rows.append(
                (
                    "c latency",
                    f"  stage {stage} p50 ms",
                    summary.get("p50_ms"),
                    f"p99 {summary.get('p99_ms')} ms",
                )
            )
    prof = result.get("profile") or {}
    for phase_name, data in prof.items():
        if not isinstance(data, dict) or "cpu_by_stage" not in data:
            continue
        for item in data["cpu_by_stage"]:
            rows.append(
                (
                    f"  profile {phase_name}",
                    f"CPU s {item['name']}",
                    item.get("cpu_s"),
                    f"{item['pct']}% of busy samples",
                )
            )
        for item in data.get("by_activity", [])[:10]:
            rows.append(
                (
                    f"  profile {phase_name}",
                    f"% {item['name']}",
                    item["pct"],
                    f"{item['samples']} samples",
                )
            )
    mem = result.get("memory") or {}
    for point in mem.get("checkpoints", []):
        rows.append(
            (
                "f memory",
                f"at {point['exceptions']:,} exceptions",
                _mib(point.get("rss_bytes")),
                f"RSS MiB; tables on disk {human_bytes(point.get('data_dir_bytes'))}",
            )
        )
    rows.extend(_approvals_rows(result.get("approvals") or {}))
    api = result.get("api") or {}
    for kind in ("single", "batch"):
        data = api.get(kind)
        if data:
            note = (
                f"{data.get('accepted')}/{data.get('exceptions')} accepted, "
                f"concurrency {data.get('concurrency')}, API CPU {data.get('api_cpu_pct')}%, "
                f"client CPU {data.get('client_cpu_pct')}%, others {data.get('others_cpu_pct')}%"
            )
            rows.append((f"d api {kind}", "exceptions/s", data.get("exceptions_per_s"), note))
    text = format_table(["phase", "figure", "value", "notes"], rows)
    target_rows = [
        (t["name"], t.get("measured", "-"), t["status"]) for t in result.get("targets", [])
    ]
    return text + "\n\n" + format_table(["target", "measured", "status"], target_rows)


def _approvals_rows(approvals: dict[str, Any]) -> list[tuple[str, str, object, str]]:
    """Per checkpoint of phase g: the worker's list p50, and in the note its p95 and max, the
    API's p50 and how long the table took to grow there."""
    rows: list[tuple[str, str, object, str]] = []
    for point in approvals.get("checkpoints", []):
        worker, api = point.get("worker") or {}, point.get("api") or {}
        fill = (
            f"filled {point['filled']:,} in {point.get('fill_s')} s ({point.get('fill_per_s')}/s)"
            if point.get("filled")
            else "no fill"
        )
        note = (
            f"p95 {worker.get('p95_ms', '-')}, max {worker.get('max_ms', '-')} ms; API p50 "
            f"{api.get('p50_ms', '-')} ms; {point.get('pending')} pending; {fill}"
        )
        label = f"list p50 ms at {point['stored_exceptions']:,} stored"
        rows.append(("g approvals", label, worker.get("p50_ms"), note))
    if "fill_progress" in approvals:  # a run stopped during a fill
        progress = approvals["fill_progress"]
        note = f"{progress.get('folded_per_s')}/s, after {progress.get('elapsed_s')} s"
        rows.append(("g approvals", "fill stopped at, folded", progress.get("folded"), note))
    return rows


def _half_rate_rows(phase: str, figures: dict[str, Any]) -> list[tuple[str, str, object, str]]:
    """The rows of a relay's pass at half its rate (none when it was not run)."""
    half = figures.get("half_rate")
    if not half:
        return []
    latency = half.get("latency") or {}
    note = (
        f"p50 {latency.get('p50_ms')} ms, at {half.get('achieved_rate')}/s, "
        f"CPU {half.get('relay_cpu_pct')}%, {half.get('cpu_us_per_record_hop')} us/record/hop"
    )
    return [(phase, "ack->last hop p99 ms at half rate", latency.get("p99_ms"), note)]


def _raw_note(raw: dict[str, Any]) -> str:
    others = (raw.get("cpu") or {}).get("others_cpu_pct", "-")
    return (
        f"{raw.get('mode')}, {raw.get('hops')} hops, relay CPU {raw.get('relay_cpu_pct')}%, "
        f"{raw.get('cpu_us_per_record_hop')} us/record/hop, "
        f"other processes {others}%"
    )


def _summed(phase: dict[str, Any]) -> str:
    """The start of a note on a figure that adds up several workers' (nothing for one)."""
    workers = phase.get("workers", 1)
    return f"sum of {workers} workers, " if workers > 1 else ""


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 1_048_576, 1)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table: text left-aligned, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [
        max(len(str(headers[i])), *(len(r[i]) for r in cells)) if cells else len(str(headers[i]))
        for i in range(len(headers))
    ]
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) or r[i] is None for r in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line([str(h) for h in headers]), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
