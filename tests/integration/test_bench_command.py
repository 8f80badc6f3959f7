"""`sluice bench` (what `make bench` calls, plus the opt-in approvals phase), run small against
the session's broker: every phase moves every record it sends, and the JSON and the table report
each one. Its figures are not checked against any speed: this machine is shared, and the figures
are the bench's output, not a test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.results import APPROVALS_TARGET
from tests.support.procs import ROOT


def test_bench_runs_every_phase_to_completion_and_reports_it(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    out_dir = tmp_path / "results"
    args = [
        "bench",
        *("--events", "300", "--latency-events", "60", "--rate", "20", "--warmup", "20"),
        *("--partitions", "2", "--no-profile", "--timeout", "240"),
        *("--api-single", "100", "--api-batched", "1000", "--output-dir", str(out_dir)),
        # 405 exceptions stored before it (probe 20, warm-up 20, 300, 60, 5 held): two fills
        *("--approvals", "--approvals-held", "5", "--approvals-checkpoints", "500,2000"),
        *("--approvals-requests", "5"),
    ]
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out_dir.glob("bench-*.json")
    result = json.loads(path.read_text())
    assert result["notes"] == [], result["notes"]

    for phase in ("raw", "chain", "pipeline"):
        figures = result[phase]
        assert (figures["completed"], figures["timed_out"]) == (300, False), (phase, figures)
        assert figures["seconds"] > 0, (phase, figures)
    for phase in ("raw", "chain"):
        assert result[phase]["cpu_us_per_record_hop"] > 0, result[phase]
        # then the latency events again, at half the rate the phase reached
        half = result[phase]["half_rate"]
        assert (half["completed"], half["timed_out"]) == (60, False), (phase, half)
        assert half["latency"]["count"] == 60, (phase, half)
        assert half["target_rate"] == max(1.0, round(result[phase]["records_per_s"] / 2, 1))
    assert result["chain"]["batch_max"] == 200
    # phase c starts only once every agent, the projection included, has caught up
    assert result["pipeline"]["caught_up_after_s"] >= 0, result["pipeline"]

    latency = result["latency"]
    assert latency["latency"]["count"] == 60, latency
    assert latency["target_rate"] == 20.0
    assert result["api"]["single"]["accepted"] == 100, result["api"]["single"]
    assert result["api"]["batch"]["accepted"] == 1000, result["api"]["batch"]

    # every checkpoint reached and timed, the held exceptions pending at each, on worker and API
    approvals = result["approvals"]
    points = approvals["checkpoints"]
    assert [(p["checkpoint"], p["stored_exceptions"]) for p in points] == [(500, 500), (2000, 2000)]
    assert [p["filled"] for p in points] == [95, 1500]
    for point in points:
        assert point["pending"] == 5, point
        for target in ("worker", "api"):
            figures = point[target]
            assert figures["statuses"] == {"200": 5}, (target, figures)
            assert figures["items_per_answer"] == {"5": 5}, (target, figures)
            assert figures["count"] == 5 and figures["p50_ms"] > 0, (target, figures)
    assert "fill_progress" not in approvals

    targets = {t["name"]: t for t in result["targets"]}
    # not up to 1M stored: never a pass, whatever the figures
    assert targets[APPROVALS_TARGET]["status"] in {"partial", "miss"}, targets[APPROVALS_TARGET]
    assert targets[APPROVALS_TARGET]["range_covered"] == [500, 2000]
    del targets[APPROVALS_TARGET]
    assert {t["status"] for t in targets.values()} <= {"pass", "miss", "not run"}
    throughput = targets["pipeline >= 50% of raw relay (stretch 70%)"]
    assert "bare Faust chain" in throughput["measured"], throughput
    assert targets["RSS flat within 10% from 100k to 1M exceptions"]["status"] == "not run"

    rows = ("a raw relay", "a2 Faust chain", "% of Faust chain", "at half rate", "c latency")
    for row in (*rows, "list p50 ms at 2,000 stored", "d api batch"):
        assert row in done.stdout, (row, done.stdout)
    assert f"results: {path}" in done.stdout
