"""The operator's commands: dead letters, approvals, the audit trail and statistics, over the API.

They talk to the API like any client (``SLUICE_API_URL``, ``SLUICE_API_KEY``), so they need the
key's role like the routes do: a viewer's key can list, an operator's can decide.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

dlq_cli = typer.Typer(no_args_is_help=True, help="Dead letters: list, inspect, redrive, discard.")
ApiUrl = Annotated[str, typer.Option(envvar="SLUICE_API_URL", help="The Sluice API.")]
ApiKey = Annotated[
    str,
    typer.Option(
        envvar="SLUICE_API_KEY",
        help="An API key of your tenant: a viewer key lists and shows, an operator key also "
        "redrives, discards, approves and rejects.",
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


def approvals(api_url: ApiUrl = "http://127.0.0.1:8000", api_key: ApiKey = "") -> None:
    """List the exceptions waiting for a decision, oldest first."""
    items = _api("GET", f"{api_url}/v1/approvals", api_key, params={"limit": 200})["items"]
    if not items:
        typer.echo("Nothing is waiting for approval.")
    for a in items:
        steps = ", ".join(f"{s['tool']}.{s['action']}" for s in a["steps"]) or "no steps"
        typer.echo(
            f"{a['exception_id']}  held at {a['stage']} by policy {a['policy_id']!r} "
            f"until {a['expires_at']}: {steps}\n    {a['reason']}"
        )


Reason = Annotated[str, typer.Option(help="Why (1 to 1000 characters); kept in the history.")]


def _decide(action: str, exception_id: str, reason: str, api_url: str, api_key: str) -> None:
    url = f"{api_url}/v1/exceptions/{exception_id}/{action}"
    answer = _api("POST", url, api_key, json={"reason": reason})
    if answer["outcome"] == "pending":
        typer.echo(
            f"{exception_id}: your decision is recorded; the worker has not carried it out yet "
            f"(see {answer['status_url']})."
        )
    else:
        typer.echo(
            f"{exception_id}: {answer['outcome']} by {answer['decided_by']}; "
            f"status {answer['status']}."
        )


def approve(
    exception_id: str,
    reason: Reason,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    api_key: ApiKey = "",
) -> None:
    """Approve a held exception: what was held runs (its steps are not repeated if they ran)."""
    _decide("approve", exception_id, reason, api_url, api_key)


def reject(
    exception_id: str,
    reason: Reason,
    api_url: ApiUrl = "http://127.0.0.1:8000",
    api_key: ApiKey = "",
) -> None:
    """Reject a held exception: nothing more runs, it ends as rejected."""
    _decide("reject", exception_id, reason, api_url, api_key)


def audit(
    api_url: ApiUrl = "http://127.0.0.1:8000",
    api_key: ApiKey = "",
    actor: str | None = None,
    action: str | None = None,
    exception_id: str | None = None,
    since: Annotated[str | None, typer.Option(help="ISO time, e.g. 2026-12-06T00:00:00Z")] = None,
    limit: int = 50,
) -> None:
    """The operators' actions, newest first."""
    params: dict[str, Any] = {"limit": limit}
    for name, value in (
        ("actor", actor),
        ("action", action),
        ("exception_id", exception_id),
        ("since", since),
    ):
        if value:
            params[name] = value
    items = _api("GET", f"{api_url}/v1/audit", api_key, params=params)["items"]
    if not items:
        typer.echo("No operator actions.")
    for e in items:
        typer.echo(
            f"{e['at']}  {e['actor']} ({e['role'] or '-'}) {e['action']} {e['exception_id']} "
            f"at {e['stage']}: {e['outcome']}  -- {e['reason'] or ''}"
        )


def register(cli: typer.Typer) -> None:
    """Add these commands to the ``sluice`` command line."""
    cli.add_typer(dlq_cli, name="dlq")
    cli.command("stats")(stats)
    cli.command("approvals")(approvals)
    cli.command("approve")(approve)
    cli.command("reject")(reject)
    cli.command("audit")(audit)
