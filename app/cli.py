"""`sluice`: the one command-line entry point (broker, worker, API, the whole stack)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from app.kafka_local import DEFAULT_KAFKA_VERSION, KafkaError, LocalKafka, fetch_jars

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
kafka_cli = typer.Typer(
    no_args_is_help=True, help="The local single-node Kafka broker (no Docker)."
)
cli.add_typer(kafka_cli, name="kafka")

StateDir = Annotated[
    Path, typer.Option(envvar="SLUICE_STATE_DIR", help="Folder for broker data and logs.")
]


@kafka_cli.command("fetch")
def kafka_fetch(version: str = DEFAULT_KAFKA_VERSION) -> None:
    """Fetch the Apache Kafka jars from Maven Central into the cache (once)."""
    try:
        libs = fetch_jars(version)
    except KafkaError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"Kafka {version} jars ready in {libs}")


@kafka_cli.command("start")
def kafka_start(
    state_dir: StateDir = Path(".sluice/kafka"),
    port: Annotated[int, typer.Option(help="Broker port; 0 picks a free one.")] = 9092,
) -> None:
    """Start the local broker in the foreground until Ctrl-C."""
    broker = LocalKafka(state_dir, port=port)
    try:
        broker.start()
    except KafkaError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"Kafka is up at {broker.bootstrap_servers} (logs in {broker.log_dir}); Ctrl-C stops it"
    )
    try:
        _wait_for_signal()
    finally:
        broker.stop()
        typer.echo("Kafka stopped")


@kafka_cli.command("stop")
def kafka_stop(state_dir: StateDir = Path(".sluice/kafka")) -> None:
    """Stop a broker started from STATE_DIR by another process."""
    LocalKafka.from_state_dir(state_dir).stop()


@cli.command("worker")
def worker(
    loglevel: Annotated[str, typer.Option(envvar="SLUICE_LOG_LEVEL")] = "warning",
) -> None:
    """Run a Faust worker with every stage agent (one of N in the consumer group)."""
    from faust import Worker

    from app.admin import ensure_topics
    from app.faust_app import app, settings

    # Topics must exist before the consumer subscribes: a topic created later is only noticed at
    # the next metadata refresh (minutes), so events would sit unprocessed until then.
    asyncio.run(ensure_topics(settings))
    Worker(app, loglevel=loglevel.lower(), quiet=not sys.stdout.isatty()).execute_from_commandline()


@cli.command("api")
def api(
    host: Annotated[str, typer.Option(envvar="SLUICE_API_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="SLUICE_API_PORT")] = 8000,
) -> None:
    """Run the HTTP API (ingest and reads)."""
    import uvicorn

    uvicorn.run("api.main:app", host=host, port=port, log_level="warning")


@cli.command("run")
def run(
    state_dir: StateDir = Path(".sluice"),
    kafka_port: Annotated[int, typer.Option(help="Local broker port; 0 picks a free one.")] = 0,
) -> None:
    """Run the whole stack locally: a Kafka broker, a worker and the API, until Ctrl-C.

    With KAFKA_BOOTSTRAP_SERVERS set, that cluster is used and no local broker is started.
    """
    env = dict(os.environ)
    broker: LocalKafka | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if "KAFKA_BOOTSTRAP_SERVERS" not in env:
            broker = LocalKafka(state_dir / "kafka", port=kafka_port)
            typer.echo("Starting the local Kafka broker ...")
            broker.start()
            env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap_servers
        env.setdefault("SLUICE_STATE_DIR", str(state_dir))
        typer.echo(f"Kafka: {env['KAFKA_BOOTSTRAP_SERVERS']}")
        exe = [sys.executable, "-m", "app.cli"]
        procs.append(subprocess.Popen([*exe, "worker"], env=env))  # noqa: S603
        procs.append(subprocess.Popen([*exe, "api"], env=env))  # noqa: S603
        typer.echo(
            f"Worker web: http://{env.get('SLUICE_WORKER_WEB_HOST', '127.0.0.1')}:"
            f"{env.get('SLUICE_WORKER_WEB_PORT', '6066')}  "
            f"API: http://{env.get('SLUICE_API_HOST', '127.0.0.1')}:"
            f"{env.get('SLUICE_API_PORT', '8000')}/docs  (Ctrl-C stops everything)"
        )
        _wait_for_signal(procs)
    except KafkaError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    finally:
        _stop_all(procs)
        if broker is not None:
            broker.stop()
        typer.echo("Sluice stopped")


def _wait_for_signal(procs: list[subprocess.Popen[bytes]] | None = None) -> None:
    """Block until SIGINT/SIGTERM, or until one of ``procs`` exits (then raise Exit(1))."""
    stop = False

    def _handler(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    while not stop:
        for proc in procs or []:
            if proc.poll() is not None:
                typer.echo(f"{proc.args!r} exited with {proc.returncode}", err=True)
                raise typer.Exit(1)
        time.sleep(0.2)


def _stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
