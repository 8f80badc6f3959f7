"""The command line refuses a setting out of its bounds with its name and the reason."""

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
