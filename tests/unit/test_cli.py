"""The command line refuses a setting out of its bounds with its name and the reason, and runs the
benchmark (bench/, outside the runtime) as `sluice bench`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", ["worker", "api"])
def test_a_setting_out_of_bounds_is_named_with_the_reason(command: str) -> None:
    env = {**os.environ, "SLUICE_WORKER_BATCH_MAX": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "Invalid setting SLUICE_WORKER_BATCH_MAX='0': Input should be greater than or equal to 1"
    )


def test_sluice_bench_runs_the_bench_with_its_arguments_without_importing_it() -> None:
    """``sluice bench`` hands its arguments to ``python -m bench``: the same options and help."""
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: sluice bench [OPTIONS]" in done.stdout
    for option in ("--events", "--latency-events", "--skip-chain", "--workers", "--memory"):
        assert option in done.stdout

    refused = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2  # the bench's own exit code, passed through
    assert "--workers" in refused.stderr


def test_the_cli_module_does_not_load_the_bench() -> None:
    code = (
        "import sys, app.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'bench'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"
