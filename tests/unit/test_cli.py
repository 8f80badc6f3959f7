"""The command line refuses a setting out of its bounds with its name and the reason, and adds the
sub-commands declared in the "sluice.commands" entry point group (`sluice bench`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer

_FINE = typer.Typer()  # a command another package declares, for the loader test


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


def test_sluice_bench_is_the_bench_app_found_through_the_entry_point() -> None:
    from importlib.metadata import entry_points

    from app.cli import COMMANDS_GROUP, cli
    from bench.cli import bench_cli

    (entry,) = [e for e in entry_points(group=COMMANDS_GROUP) if e.name == "bench"]
    assert entry.value == "bench.cli:bench_cli"
    groups = {info.name: info.typer_instance for info in cli.registered_groups}
    assert groups["bench"] is bench_cli


def test_a_command_that_fails_to_load_is_left_out_and_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.metadata

    import app.cli

    entries = importlib.metadata.EntryPoints(
        [
            importlib.metadata.EntryPoint("broken", "no_such_module:app", app.cli.COMMANDS_GROUP),
            importlib.metadata.EntryPoint("other", "os:sep", app.cli.COMMANDS_GROUP),
            importlib.metadata.EntryPoint(
                "fine", "tests.unit.test_cli:_FINE", app.cli.COMMANDS_GROUP
            ),
        ]
    )
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: entries.select(group=group)
    )
    monkeypatch.setattr(app.cli, "cli", typer.Typer())

    app.cli._add_commands_from_entry_points()

    assert [(g.name, g.typer_instance) for g in app.cli.cli.registered_groups] == [("fine", _FINE)]
    err = capsys.readouterr().err
    assert "sluice: 'broken' left out (no_such_module:app: ModuleNotFoundError(" in err
    assert "sluice: 'other' left out (os:sep is no Typer app)" in err
