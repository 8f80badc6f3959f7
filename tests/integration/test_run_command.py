"""`sluice run` (what `make run` calls) brings up broker, worker, API and demo tools, pushes the
samples through, and takes everything down on Ctrl-C."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from app.kafka_local import free_port
from tests.support.procs import SluiceProcess


def test_run_pushes_samples_through_and_stops_cleanly(tmp_path: Path) -> None:
    env = {
        "SLUICE_STATE_DIR": str(tmp_path / "state"),
        "SLUICE_API_PORT": str(free_port()),
        "SLUICE_WORKER_WEB_PORT": str(free_port()),
        "SLUICE_PARTITIONS": "2",
    }
    environ = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    run = SluiceProcess(["run"], env, tmp_path / "run.log")
    run.env = {**environ, **env}  # run starts its own broker: no external bootstrap
    run.start()
    deadline = time.monotonic() + 240
    while "Ctrl-C stops everything." not in run.log_tail(200) and time.monotonic() < deadline:
        assert run.proc is not None and run.proc.poll() is None, run.log_tail()
        time.sleep(0.5)
    out = run.log_tail(200)
    assert "Ctrl-C stops everything." in out, out
    assert "Sent 6 sample exceptions" in out
    assert "still in flight" not in out, out
    assert out.count("resolved") >= 3, out
    pid_file = tmp_path / "state" / "kafka" / "kafka.pid"
    broker_pid = int(pid_file.read_text().split()[0])

    assert run.stop(signal.SIGINT, timeout=90) == 0, run.log_tail()
    assert "Sluice stopped." in run.log_tail()
    assert not pid_file.exists()
    try:
        os.kill(broker_pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"the broker (pid {broker_pid}) is still running")
