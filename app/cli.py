"""`sluice`: the one command-line entry point (broker, worker, API, the whole stack)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from app.kafka_local import DEFAULT_KAFKA_VERSION, KafkaError, LocalKafka, fetch_jars

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
kafka_cli = typer.Typer(
    no_args_is_help=True, help="The local single-node Kafka broker (no Docker)."
)
cli.add_typer(kafka_cli, name="kafka")


BENCH_PROG = "sluice bench"


@cli.command(
    "bench",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Throughput, latency and memory on a real broker (docs/performance.md); --help for options.

    The benchmark is a tool that uses the runtime, not a part of it: it lives in bench/ and this
    process becomes ``python -m bench`` with the same arguments, so no runtime process ever imports
    it (tests/unit/test_runtime_imports.py) and the exit code and Ctrl-C are the bench's own."""
    argv = [sys.executable, "-m", "bench", *ctx.args]
    os.execve(sys.executable, argv, {**os.environ, "SLUICE_BENCH_PROG": BENCH_PROG})  # noqa: S606


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

    from app.admin import ensure_changelogs, ensure_topics
    from app.settings import get_settings
    from app.telemetry import instrument_httpx, setup_tracing
    from app.worker.faust_app import run_worker
    from app.worker.wiring import build_worker
    from schemas.config import ConfigError

    settings = get_settings()
    try:
        built = build_worker(settings)
    except ConfigError as exc:
        typer.echo(f"Cannot start the worker: {exc}", err=True)
        raise typer.Exit(2) from exc
    app = built.app

    # Topics must exist before the consumer subscribes: a topic created later is only noticed at
    # the next metadata refresh (minutes). That holds for the tables' changelogs too: a missing
    # one made every write to its table fail until the refresh.
    asyncio.run(ensure_topics(settings))
    asyncio.run(ensure_changelogs(settings, app))
    setup_tracing("sluice-worker")
    instrument_httpx()  # tool and LLM calls become client spans inside the stage's process span

    class SluiceWorker(Worker):
        """Drains the events in flight before Faust's own stop (app.worker.wiring.Drain)."""

        async def _stop_on_signal(self, signal: Any) -> None:
            if not await built.drain.in_flight_done(settings.worker_drain_seconds):
                self.log.warning("events still in flight after the drain; they will be redone")
            await super()._stop_on_signal(signal)

    run_worker(app, settings, loglevel, SluiceWorker)


@cli.command("api")
def api(
    host: Annotated[str, typer.Option(envvar="SLUICE_API_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="SLUICE_API_PORT")] = 8000,
) -> None:
    """Run the HTTP API (ingest and reads)."""
    import uvicorn

    uvicorn.run("api.main:app", host=host, port=port, log_level="warning")


@cli.command("send")
def send(
    file: Annotated[
        Path | None,
        typer.Option(help="JSON list (or JSON lines) of exception reports to POST."),
    ] = None,
    sample: Annotated[bool, typer.Option(help="Send the example sample exceptions.")] = False,
    api_url: Annotated[str, typer.Option(envvar="SLUICE_API_URL")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="SLUICE_API_KEY")] = None,
) -> None:
    """POST exceptions to the ingest API and print where each one was accepted."""
    from app.ingest_client import post_exceptions

    if (file is None) == (not sample):
        typer.echo("Give exactly one of --file PATH or --sample.", err=True)
        raise typer.Exit(2)
    if file is None:
        batches = _samples_by_key(SAMPLES)
    elif api_key is None:
        typer.echo("--api-key (or SLUICE_API_KEY) is required with --file.", err=True)
        raise typer.Exit(2)
    else:
        batches = {api_key: _read_reports(file)}
    for key, reports in batches.items():
        for result in asyncio.run(post_exceptions(api_url, key, reports)):
            typer.echo(json.dumps(result))


SAMPLES = Path(__file__).resolve().parent.parent / "config" / "example" / "samples.json"
DEMO_KEYS = {"acme": "demo-acme-key", "globex": "demo-globex-key"}


def _samples_by_key(path: Path) -> dict[str, list[dict[str, object]]]:
    batches: dict[str, list[dict[str, object]]] = {}
    for item in json.loads(path.read_text()):
        batches.setdefault(DEMO_KEYS[item["tenant"]], []).append(item["report"])
    return batches


def _read_reports(path: Path) -> list[dict[str, object]]:
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list):
        data = [data]
    return data


@cli.command("run")
def run(
    state_dir: StateDir = Path(".sluice"),
    samples: Annotated[bool, typer.Option(help="Push the sample exceptions through.")] = True,
) -> None:
    """Run the whole stack locally until Ctrl-C: a Kafka broker, a worker, the API, a demo tool
    server, and a handful of sample exceptions pushed through the pipeline.

    With KAFKA_BOOTSTRAP_SERVERS set, that cluster is used and no local broker is started; with
    SLUICE_TOOLS_URL set, tools call that URL instead of the demo tool server.
    """
    from app.admin import ensure_topics
    from app.kafka_local import free_port
    from app.settings import Settings

    env = dict(os.environ)
    broker: LocalKafka | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if "KAFKA_BOOTSTRAP_SERVERS" not in env:
            broker = LocalKafka(state_dir / "kafka", port=_port_or_free(9092))
            typer.echo(f"Starting a local Kafka broker (state in {broker.state_dir}) ...")
            broker.start()
            env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap_servers
        if "SLUICE_TOOLS_URL" not in env:
            # A process of its own, started as a user would and stopped with the others: the
            # demo server is a stand-in, not part of the runtime, which never imports it.
            tools_port = str(free_port())
            tools_cmd = [sys.executable, "-m", "bench.demo_tools", "--port", tools_port]
            procs.append(subprocess.Popen(tools_cmd, env=env))  # noqa: S603
            env["SLUICE_TOOLS_URL"] = f"http://127.0.0.1:{tools_port}"
            _wait_http(f"{env['SLUICE_TOOLS_URL']}/healthz", procs)
        env.setdefault("SLUICE_STATE_DIR", str(state_dir))
        env.setdefault("SLUICE_API_PORT", str(_port_or_free(8000)))
        env.setdefault("SLUICE_WORKER_WEB_PORT", str(_port_or_free(6066)))
        worker_url = f"http://127.0.0.1:{env['SLUICE_WORKER_WEB_PORT']}"
        env.setdefault("SLUICE_WORKER_URLS", json.dumps([worker_url]))
        api_url = f"http://127.0.0.1:{env['SLUICE_API_PORT']}"
        settings = Settings.model_validate(_settings_from(env))
        asyncio.run(ensure_topics(settings))

        exe = [sys.executable, "-m", "app.cli"]
        procs.append(subprocess.Popen([*exe, "worker"], env=env))  # noqa: S603
        procs.append(subprocess.Popen([*exe, "api", "--port", env["SLUICE_API_PORT"]], env=env))  # noqa: S603
        typer.echo("Starting a worker and the API ...")
        _wait_http(f"{worker_url}/sluice/ready", procs)
        _wait_http(f"{api_url}/healthz", procs)
        typer.echo(
            f"Sluice is up.\n  Kafka:  {env['KAFKA_BOOTSTRAP_SERVERS']}\n"
            f"  API:    {api_url}/docs\n  Worker: {worker_url}/sluice/ready\n"
            f"  Tools:  {env['SLUICE_TOOLS_URL']}"
        )
        if samples:
            _push_samples(api_url)
        typer.echo("Ctrl-C stops everything.")
        _wait_for_signal(procs)
    except KafkaError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    finally:
        _stop_all(procs)
        if broker is not None:
            broker.stop()
        typer.echo("Sluice stopped.")


def _settings_from(env: dict[str, str]) -> dict[str, object]:
    """The Settings fields `run` passes on to its children, read from their environment."""
    fields: dict[str, object] = {"KAFKA_BOOTSTRAP_SERVERS": env["KAFKA_BOOTSTRAP_SERVERS"]}
    for name in ("topic_prefix", "partitions", "replication_factor"):
        value = env.get(f"SLUICE_{name.upper()}")
        if value is not None:
            fields[name] = value
    return fields


def _port_or_free(preferred: int) -> int:
    import socket

    from app.kafka_local import free_port

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def _wait_http(url: str, procs: list[subprocess.Popen[bytes]], within: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                typer.echo(f"{proc.args!r} exited with {proc.returncode}", err=True)
                raise typer.Exit(1)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).is_success:
                return
        time.sleep(0.5)
    typer.echo(f"{url} did not become ready in {within:.0f}s", err=True)
    raise typer.Exit(1)


TERMINAL = {"resolved", "failed", "no_action", "suppressed", "awaiting_approval"}


def _push_samples(api_url: str, within: float = 60.0) -> None:
    """Send the samples, then follow each until it ends, and print where it ended."""
    import httpx

    from app.ingest_client import post_exceptions

    sent: list[tuple[str, str, str]] = []
    for key, reports in _samples_by_key(SAMPLES).items():
        for report, result in zip(
            reports, asyncio.run(post_exceptions(api_url, key, reports)), strict=True
        ):
            if "exception_id" in result:
                sent.append((key, str(result["exception_id"]), str(report["message"])))
            else:
                typer.echo(f"sample rejected: {result}", err=True)
    typer.echo(f"Sent {len(sent)} sample exceptions; following them ...")
    deadline = time.monotonic() + within
    states: dict[str, dict[str, Any]] = {}
    while len(states) < len(sent) and time.monotonic() < deadline:
        for key, exception_id, _ in sent:
            if exception_id in states:
                continue
            resp = httpx.get(f"{api_url}/v1/exceptions/{exception_id}", headers={"X-API-Key": key})
            if resp.status_code == 200 and resp.json()["status"] in TERMINAL:
                states[exception_id] = resp.json()
        time.sleep(0.5)
    rows = [("exception", "tenant", "severity", "category", "status", "tools")]
    for _key, exception_id, message in sent:
        st = states.get(exception_id)
        if st is None:
            rows.append((exception_id, "?", "?", "?", "still in flight", message[:40]))
            continue
        tools = ", ".join(
            f"{r['tool']}.{r['action']}={r['status']}" for r in st.get("tool_results", [])
        )
        rows.append(
            (
                exception_id,
                str(st["tenant_id"]),
                str(st["severity"]),
                str(st["category"]),
                str(st["status"]),
                tools or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        typer.echo("  " + "  ".join([*cells, row[-1]]))


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


dlq_cli = typer.Typer(no_args_is_help=True, help="Dead letters: list, inspect, redrive, discard.")
cli.add_typer(dlq_cli, name="dlq")
ApiUrl = Annotated[str, typer.Option(envvar="SLUICE_API_URL", help="The Sluice API.")]
ApiKey = Annotated[
    str,
    typer.Option(
        envvar="SLUICE_API_KEY",
        help="An API key of your tenant: a viewer key lists and shows, an operator key also "
        "redrives and discards.",
    ),
]


def _api(method: str, url: str, key: str, **kwargs: Any) -> Any:
    import httpx

    try:
        resp = httpx.request(method, url, headers={"X-API-Key": key}, timeout=30, **kwargs)
    except httpx.HTTPError as exc:
        typer.echo(f"Could not reach the API at {url}: {exc}", err=True)
        raise typer.Exit(1) from exc
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        typer.echo(f"HTTP {resp.status_code}: {detail}", err=True)
        raise typer.Exit(1)
    return resp.json()


@dlq_cli.command("list")
def dlq_list(
    api_url: ApiUrl = "http://127.0.0.1:8000",
    api_key: ApiKey = "",
    stage: str | None = None,
    exception_id: str | None = None,
    error_class: str | None = None,
) -> None:
    """List quarantined exceptions (dead letters), oldest first."""
    params = {
        k: v
        for k, v in {
            "stage": stage,
            "exception_id": exception_id,
            "error_class": error_class,
        }.items()
        if v
    }
    items = _api("GET", f"{api_url}/v1/dlq", api_key, params=params)["items"]
    if not items:
        typer.echo("No dead letters.")
    for e in items:
        head = e["head"]
        typer.echo(
            f"{e['stage']:<10} {e['exception_id']}  {head['error_class']:<9} "
            f"attempts={head['attempts']} parked={e['parked_count']}  {head['message'][:80]}"
        )


@dlq_cli.command("show")
def dlq_show(
    stage: str, exception_id: str, api_url: ApiUrl = "http://127.0.0.1:8000", api_key: ApiKey = ""
) -> None:
    """Show one dead letter with its original bytes (base64) and the parked events."""
    typer.echo(
        json.dumps(_api("GET", f"{api_url}/v1/dlq/{stage}/{exception_id}", api_key), indent=2)
    )


@dlq_cli.command("redrive")
def dlq_redrive(
    exception_id: str,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    api_key: ApiKey = "",
    stage: str | None = None,
    reason: str | None = None,
) -> None:
    """Process the dead-lettered event again, then its parked events in order."""
    body = {"stage": stage, "reason": reason}
    typer.echo(
        json.dumps(
            _api("POST", f"{api_url}/v1/exceptions/{exception_id}/redrive", api_key, json=body)
        )
    )


@dlq_cli.command("discard")
def dlq_discard(
    exception_id: str,
    reason: Annotated[str, typer.Option(help="Why; kept in the exception's history.")],
    api_url: ApiUrl = "http://127.0.0.1:8000",
    api_key: ApiKey = "",
    stage: str | None = None,
) -> None:
    """Drop the dead-lettered event, then process its parked events in order."""
    body = {"stage": stage, "reason": reason}
    typer.echo(
        json.dumps(
            _api("POST", f"{api_url}/v1/exceptions/{exception_id}/discard", api_key, json=body)
        )
    )


@cli.command("stats")
def stats(api_url: ApiUrl = "http://127.0.0.1:8000", api_key: ApiKey = "") -> None:
    """Pipeline statistics: per stage counters, DLQ depth, consumer lag; worker liveness."""
    data = _api("GET", f"{api_url}/v1/pipeline/stats", api_key)
    cols = [
        "processed",
        "duplicates",
        "retried",
        "dead_lettered",
        "parked",
        "dlq_depth",
        "parked_now",
        "consumer_lag",
    ]
    typer.echo(f"{'stage':<11}" + "".join(f"{c:>14}" for c in cols))
    for name, st in data["stages"].items():
        typer.echo(f"{name:<11}" + "".join(f"{st[c]:>14}" for c in cols))
    for w in data["workers"]:
        seen = (
            "never"
            if w["last_event_at"] is None
            else f"{time.time() - w['last_event_at']:.0f}s ago"
        )
        typer.echo(
            f"worker {w['worker']}: {'ready' if w['ready'] else 'NOT READY'}, "
            f"{w['assigned_partitions']} partitions, last event {seen}"
        )


def main() -> None:
    from pydantic import ValidationError

    try:
        cli()
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        # A SLUICE_* variable out of its bounds: name it and the reason, not a traceback.
        for error in exc.errors():
            name = "SLUICE_" + "_".join(str(part) for part in error["loc"]).upper()
            typer.echo(f"Invalid setting {name}={error.get('input')!r}: {error['msg']}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
