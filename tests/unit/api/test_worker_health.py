"""A worker that is down is logged when it goes down and when it is back, not at every read; every
failed read is counted (1,600 WARNING lines in one run before)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from app.telemetry import metrics
from tests.unit.api.conftest import api_client, auth
from tests.unit.api.test_reads import make_record, stand_in_worker


def failures_counted(url: str) -> float:
    value = metrics.registry.get_sample_value(
        "sluice_api_worker_unavailable_total", {"worker": url}
    )
    return value or 0.0


def reader_logs(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "sluice.api.reader"]


async def test_a_worker_down_is_logged_once_and_back_once(
    config_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sluice.api.reader")
    with stand_in_worker() as worker:
        worker.records["exc-1"] = make_record("acme", "exc-1")
        worker.status = 503
        async with api_client([worker.url], config_dir) as client:
            for _ in range(5):
                resp = await client.get("/v1/exceptions/exc-1", headers=auth())
                assert resp.status_code == 503
                assert resp.headers["Retry-After"] == "5"
            resp = await client.get("/v1/exceptions", headers=auth())
            assert resp.status_code == 503
            assert failures_counted(worker.url) == 6
            assert reader_logs(caplog) == [
                (logging.WARNING, f"worker {worker.url} unavailable: HTTP 503")
            ]

            worker.status = None
            for _ in range(3):
                resp = await client.get("/v1/exceptions/exc-1", headers=auth())
                assert resp.status_code == 200
            assert reader_logs(caplog)[1:] == [(logging.INFO, f"worker {worker.url} back")]

            worker.status = 500
            await client.get("/v1/exceptions/exc-1", headers=auth())
            await client.get("/v1/exceptions/exc-1", headers=auth())
    assert failures_counted(worker.url) == 8
    assert [level for level, _ in reader_logs(caplog)] == [
        logging.WARNING,
        logging.INFO,
        logging.WARNING,
    ]
