"""Building the worker binds nothing to an event loop, so the loop the worker then runs on is the
one SLUICE_WORKER_EVENT_LOOP chooses (uvloop by default).

A table store opened while the worker was being built once made Faust take asyncio's own loop
before uvloop was installed: every stage then ran on the slower loop (about 10% more CPU per
exception in `sluice bench`), with nothing to show for it but the profile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

CODE = """
import asyncio
from app.settings import get_settings
from app.worker.wiring import build_worker

worker = build_worker(get_settings())
import uvloop
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
print(type(worker.app.loop).__module__)
"""


def test_building_the_worker_leaves_the_event_loop_to_be_chosen(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SLUICE_CONFIG_DIR": str(ROOT / "config" / "example"),
        "SLUICE_TOOLS_URL": "http://127.0.0.1:9",
        "SLUICE_STATE_DIR": str(tmp_path),
        "SLUICE_WORKER_DATA_DIR": str(tmp_path / "worker"),
    }
    done = subprocess.run(
        [sys.executable, "-c", CODE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "uvloop"
