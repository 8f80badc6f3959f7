"""The bench's approvals phase (``--approvals``), its pure parts: the tenant rule that holds its
exceptions (and only those), the synthetic completions that grow the ``exceptions`` table, the
timed listing, the figures and the target. No broker, no processes, no wall-clock assertion."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agents.policy import decide
from agents.triage import triage
from bench import approvals, cli, context, procs, report, results, stats, workload
from schemas.codec import decode
from schemas.config import load_tenants
from schemas.events import Decision, ExceptionCompleted, ExceptionIngested
from schemas.state import apply
from tests import factories

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _decision(tmp_path: Path, value: bytes) -> Decision:
    """What the bench tenant's real triage and policy decide for one of the bench's events."""
    config = load_tenants(workload.write_config(tmp_path, None))[workload.TENANT]
    ingested = decode(value)
    assert isinstance(ingested, ExceptionIngested)
    accepted = factories.accepted(
        ingested.payload.report,
        tenant_id=ingested.tenant_id,
        exception_id=ingested.exception_id,
    )
    return decide(triage(accepted, config.triage, NOW), config.policy, NOW).payload.decision


def test_only_the_held_source_is_held_for_approval(tmp_path: Path) -> None:
    maker = workload.EventMaker("run1")
    # every other phase's events run to completion
    assert _decision(tmp_path, maker.make("thr", 1)[1]) == Decision.proceed
    held_key, held = maker.make("held", 1, source=workload.HELD_SOURCE)
    assert held_key == b"run1-held-000000001"
    event = decode(held)
    assert isinstance(event, ExceptionIngested) and event.payload.report.source == "held"
    assert _decision(tmp_path, held) == Decision.awaiting_approval


def test_held_exceptions_wait_longer_than_any_run(tmp_path: Path) -> None:
    config = load_tenants(workload.write_config(tmp_path, None))[workload.TENANT]
    (rule,) = config.policy.rules
    assert rule.then.approval_required_for == ("*",)
    assert rule.then.approval_timeout_seconds == workload.HELD_TIMEOUT_SECONDS >= 86_400


# ------------------------------------------------------------------------- synthetic completions


def test_a_synthetic_completion_is_a_valid_event_that_creates_a_record() -> None:
    event = decode(approvals.completed_event("run1-fill-000000001", NOW))
    assert isinstance(event, ExceptionCompleted)
    assert (event.tenant_id, event.exception_id) == (workload.TENANT, "run1-fill-000000001")
    # what the projection does with it: the table did not hold the id, now it holds a record
    record = apply(None, event)
    assert record is not None
    assert (record.state.exception_id, record.state.status) == ("run1-fill-000000001", "resolved")
    assert record.state.event_count == 1


def test_synthetic_completions_are_new_exceptions_keyed_by_their_id() -> None:
    maker = workload.EventMaker("run1")
    records = list(approvals.fill_records(maker.key, 10, 3, NOW))
    keys = [key for key, _ in records]
    assert keys == [b"run1-fill-000000010", b"run1-fill-000000011", b"run1-fill-000000012"]
    events = [decode(value) for _, value in records]
    assert [e.exception_id.encode() for e in events] == keys
    assert len({e.event_id for e in events}) == 3
    # never the id of an exception another phase sent
    assert not set(keys) & {maker.key(p, i) for p in ("thr", "lat", "held") for i in range(20)}


# --------------------------------------------------------------------------------------- listing


def _held(n: int, prefix: str = "run1-held-") -> dict[str, Any]:
    return {"exception_id": f"{prefix}{n:09d}", "tenant_id": "bench"}


def _pages(items: list[dict[str, Any]], seen: list[dict[str, str]]) -> httpx.Client:
    """A worker that pages ``items`` 2 at a time (whatever limit is asked), and records queries."""

    def answer(request: httpx.Request) -> httpx.Response:
        query = dict(request.url.params)
        seen.append(query)
        start = int(query.get("cursor", "0"))
        more = start + 2 < len(items)
        body = {"items": items[start : start + 2], "next_cursor": str(start + 2) if more else None}
        return httpx.Response(200, json=body)

    return httpx.Client(base_url="http://worker", transport=httpx.MockTransport(answer))


def test_list_all_follows_the_cursor_to_the_last_page() -> None:
    items = [_held(i) for i in range(5)]
    seen: list[dict[str, str]] = []
    with _pages(items, seen) as client:
        assert approvals.list_all(client, "/sluice/approvals", {"tenant": "bench"}) == items
    assert [q.get("cursor") for q in seen] == [None, "2", "4"]
    assert {(q["tenant"], q["limit"]) for q in seen} == {("bench", str(approvals.PAGE_LIMIT))}


def test_list_all_fails_on_an_error_answer() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(503, text="not ready"))
    with (
        httpx.Client(base_url="http://worker", transport=transport) as client,
        pytest.raises(procs.BenchError, match="503"),
    ):
        approvals.list_all(client, "/sluice/approvals", {"tenant": "bench"})


def test_count_listed_counts_distinct_ids_of_the_phase() -> None:
    items = [_held(1), _held(2), _held(2), _held(3, "other-held-")]
    assert approvals.count_listed(items, "run1-held-") == 2


def test_time_list_times_the_answered_requests_after_the_warm_up() -> None:
    answers = iter([200] * 3 + [200, 200, 403, 200])
    transport = httpx.MockTransport(
        lambda request: httpx.Response(
            status := next(answers),
            json={"items": [_held(1)] * 2} if status == 200 else {"detail": "role"},
        )
    )
    ticks = iter(range(100))  # a fake clock: the n-th request takes n + 1 ticks (ms below)
    clock_values: list[float] = []
    for n in range(7):
        start = next(ticks)
        for _ in range(n):
            next(ticks)
        clock_values += [start / 1000, next(ticks) / 1000]
    clock = iter(clock_values).__next__

    with httpx.Client(base_url="http://worker", transport=transport) as client:
        out = approvals.time_list(client, "/sluice/approvals", {"limit": 50}, 4, clock=clock)

    assert out["requests"] == 4
    assert out["statuses"] == {"200": 3, "403": 1}
    assert out["items_per_answer"] == {"2": 3}
    assert out["error"] == '{"detail":"role"}'
    # the three warm-up requests (1, 2, 3 ticks) are not in the figures, nor is the refused one
    assert (out["count"], out["p50_ms"], out["max_ms"]) == (3, 5.0, 7.0)


def test_list_figures_are_p50_p95_and_max_in_ms() -> None:
    figures = approvals.list_figures([0.002] * 18 + [0.004, 0.010])
    assert (figures["count"], figures["p50_ms"], figures["p95_ms"]) == (20, 2.0, 4.0)
    assert figures["max_ms"] == 10.0
    assert approvals.list_figures([]) == {"count": 0}


# ------------------------------------------------------------------------ result, table, target


def _point(stored: int, p50: float, filled: int = 0) -> dict[str, Any]:
    return {
        "checkpoint": stored,
        "stored_exceptions": stored,
        "filled": filled,
        "fill_s": 10.0 if filled else 0.0,
        "fill_per_s": filled / 10 if filled else None,
        "pending": 200,
        "worker": {**stats.latency_summary([p50 / 1000] * 5), "statuses": {"200": 5}},
        "api": {**stats.latency_summary([2 * p50 / 1000] * 5), "statuses": {"200": 5}},
    }


def _with(points: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return results.build_result(
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        command=[],
        host={},
        config={},
        phases={"approvals": {"checkpoints": points, **extra}},
    )


def _target(result: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in result["targets"] if t["name"] == results.APPROVALS_TARGET)


def test_the_result_keeps_the_approvals_points_under_their_own_key() -> None:
    result = _with([_point(1_520, 3.0), _point(1_000_000, 3.3, filled=998_480)])
    assert "approvals" in results.RESULT_KEYS
    assert list(result) == list(results.RESULT_KEYS)
    assert [p["stored_exceptions"] for p in result["approvals"]["checkpoints"]] == [
        1_520,
        1_000_000,
    ]
    empty = results.build_result(
        started_at=datetime(2026, 1, 1, tzinfo=UTC), command=[], host={}, config={}, phases={}
    )
    assert empty["approvals"] is None
    assert _target(empty)["status"] == "not run"


def test_approvals_target_compares_the_p50s_as_a_ratio() -> None:
    flat = _target(_with([_point(1_520, 3.0), _point(1_000_000, 3.3, filled=998_480)]))
    assert (flat["status"], flat["ratio"]) == ("pass", 1.1)
    assert (
        flat["measured"] == "1.10x: 3.3 ms at 1,000,000 against 3.0 ms at 1,520 stored exceptions"
    )
    assert flat["range_covered"] == [1_520, 1_000_000]
    slower = _target(_with([_point(1_520, 3.0), _point(1_000_000, 4.6, filled=998_480)]))
    assert (slower["status"], slower["ratio"]) == ("miss", 1.533)
    # flat, but not up to 1M: not the target's range
    short = _target(_with([_point(405, 3.0), _point(2_000, 3.1, filled=1_595)]))
    assert short["status"] == "partial"
    assert _target(_with([_point(1_520, 3.0)]))["status"] == "not run"


def test_summary_table_has_a_row_per_checkpoint_and_the_target() -> None:
    text = report.summary_table(_with([_point(1_520, 3.0), _point(1_000_000, 3.3, filled=998_480)]))
    assert "list p50 ms at 1,520 stored" in text
    assert "list p50 ms at 1,000,000 stored" in text
    assert "filled 998,480 in 10.0 s (99848.0/s)" in text
    assert results.APPROVALS_TARGET in text
    stopped = _with([_point(1_520, 3.0)], fill_progress={"folded": 5_000, "folded_per_s": 500.0})
    assert "fill stopped at, folded" in report.summary_table(stopped)


# ------------------------------------------------------------------------------------ the option


def test_the_phase_is_off_unless_asked_for() -> None:
    opts = context.Options(**_OPTIONS)
    assert opts.approvals is False
    assert opts.as_config()["approvals"] is None
    on = context.Options(**_OPTIONS, approvals=True, approvals_checkpoints=[1_000, 1_000_000])
    assert on.as_config()["approvals"] == {
        "held": 200,
        "checkpoints": [1_000, 1_000_000],
        "requests": 50,
    }


def test_bad_checkpoints_are_refused_by_name() -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.bench_cli, ["--approvals", "--approvals-checkpoints", "0"])
    assert result.exit_code == 2
    assert "--approvals-checkpoints" in result.output


_OPTIONS: dict[str, Any] = {
    "events": 10,
    "latency_events": 10,
    "rate": None,
    "partitions": 2,
    "skip_api": True,
    "skip_raw": True,
    "memory": False,
    "checkpoints": [100_000],
    "tools": "noop",
    "raw_mode": "tasks",
    "warmup": 0,
    "timeout": 60.0,
    "output_dir": Path("results"),
    "py_spy": None,
    "profile_throughput": False,
    "api_single": 1,
    "api_batched": 1,
    "api_batch_size": 1,
    "api_concurrency": 1,
    "api_batch_concurrency": 1,
    "keep": False,
}
