"""What the bench sends and to whom: its one tenant (a config with a noop tool or a loopback HTTP
sink, and an API key) and its events, real encoded ``ExceptionIngested`` bytes made fast."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

TENANT = "bench"
API_KEY = "bench-key"  # only ever valid for the throwaway config this run writes
SOURCE = "payments-eu"  # what every phase reports, except the held exceptions of --approvals
HELD_SOURCE = "held"  # the one source the tenant holds for a person's approval (--approvals)
# Long enough that no held exception expires during a run (the schema allows up to 30 days).
HELD_TIMEOUT_SECONDS = 7 * 86_400


# Only the source "held" is held for approval (the --approvals phase's exceptions); every other
# phase reports source "payments-eu", which falls to the default category and runs to completion.
BENCH_TENANT = """
tenant_id = "{tenant}"

[[triage.rules]]
id = "held"
match = {{ source = "{held_source}" }}
then = {{ severity = "medium", category = "held" }}

[triage.default]
severity = "medium"
category = "bench"

[policy.default]
allowed_actions = ["*"]

[[policy.rules]]
id = "held-for-approval"
match = {{ category = ["held"] }}
then = {{ approval_required_for = ["*"], approval_timeout_seconds = {held_timeout} }}

[[playbooks]]
id = "bench"
steps = [{{ id = "record", tool = "sink", action = "record" }}]

[tools.sink]
{tool}
"""


def write_config(root: Path, tools_url: str | None) -> Path:
    """A config dir with one tenant whose single playbook step calls a noop tool (or a loopback
    HTTP sink at ``tools_url``) and which holds source ``held`` for approval, and one API key: an
    admin key, since the bench both reports and reads (the approvals list)."""
    import hashlib

    (root / "tenants").mkdir(parents=True, exist_ok=True)
    tool = 'kind = "noop"' if tools_url is None else f'kind = "webhook"\nurl = "{tools_url}/hook"'
    tenant = BENCH_TENANT.format(
        tenant=TENANT, tool=tool, held_source=HELD_SOURCE, held_timeout=HELD_TIMEOUT_SECONDS
    )
    (root / "tenants" / f"{TENANT}.toml").write_text(tenant)
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    (root / "api_keys.toml").write_text(
        f'[[keys]]\ntenant_id = "{TENANT}"\nname = "bench"\nrole = "admin"\nsha256 = "{digest}"\n'
    )
    return root


@dataclass
class EventMaker:
    """Real encoded ``ExceptionIngested`` events, fast: one event is built and validated through
    the schema, then each one copies its JSON with new ids, error type and message."""

    run_tag: str
    fingerprints: int = 256
    _template: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from api.ingest import build_event, request_hash
        from schemas.api import ExceptionCreate

        # built the way the API builds what it produces, so the bench sends what producers send
        body = ExceptionCreate(
            source=SOURCE,
            error_type="BenchError000",
            message="Card declined for order 12345678 (customer 4242, amount 99.90 EUR)",
            external_ref="ord-12345678",
            attributes={"region": "eu-west", "customer_tier": "standard", "n": 0},
        )
        event = build_event(
            TENANT,
            "template",
            body,
            body_hash=request_hash(body),
            idempotency_key=None,
            now=datetime.now(UTC),
        )
        self._template = event.model_dump(mode="json")

    def key(self, phase: str, i: int) -> bytes:
        return f"{self.run_tag}-{phase}-{i:09d}".encode()

    def make(self, phase: str, i: int, source: str = SOURCE) -> tuple[bytes, bytes]:
        key = self.key(phase, i)
        event_id = str(uuid.uuid4())
        t = self._template
        report = {
            **t["payload"]["report"],
            "source": source,
            "error_type": f"BenchError{i % self.fingerprints:03d}",
            "message": f"Card declined for order {i:08d} (customer {i % 9973}, amount 99.90 EUR)",
            "external_ref": f"ord-{i:08d}",
            "attributes": {"region": "eu-west", "customer_tier": "standard", "n": i},
        }
        event = {
            **t,
            "event_id": event_id,
            "correlation_id": event_id,
            "exception_id": key.decode(),
            "occurred_at": datetime.now(UTC).isoformat(),
            "payload": {**t["payload"], "report": report},
        }
        return key, orjson.dumps(event)

    def batch(
        self, phase: str, start: int, count: int, source: str = SOURCE
    ) -> Iterator[tuple[bytes, bytes]]:
        for i in range(start, start + count):
            yield self.make(phase, i, source)


def phase_of(key: bytes) -> bytes:
    """``<run>-<phase>-<n>`` -> ``<run>-<phase>``: the watcher counts completions per phase."""
    return key.rpartition(b"-")[0]
