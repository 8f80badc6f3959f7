"""Tenant configurations for tests, written to a temporary config dir (tools point at a mock server).

Two tenants with deliberately different rules, so a test can tell whose rules were applied.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from schemas.config import Role

KEYS = {"acme": "test-key-acme", "globex": "test-key-globex"}
"""Each tenant's admin key (it may use every route), named "test"."""
ROLE_KEYS: dict[Role, str] = {
    "producer": "test-key-acme-producer",
    "viewer": "test-key-acme-viewer",
    "operator": "test-key-acme-operator",
}
"""Keys of acme with the other roles, each named "test <role>"."""

ACME = """
tenant_id = "acme"

[intake]
repeat_window_seconds = 3600

[[triage.rules]]
id = "payment-declined"
match = {{ source = "payments", message_contains = ["declined"] }}
then = {{ severity = "high", category = "payments" }}

[[triage.rules]]
id = "shipment-stuck"
match = {{ source = "shipping*" }}
then = {{ severity = "medium", category = "logistics" }}

[[triage.rules]]
id = "refund-request"
match = {{ source = "refunds" }}
then = {{ severity = "high", category = "refunds" }}

[[triage.rules]]
id = "access-request"
match = {{ source = "access*" }}
then = {{ severity = "medium", category = "approvals" }}

[[triage.rules]]
id = "vendor-change"
match = {{ source = "vendors" }}
then = {{ severity = "medium", category = "vendors" }}

[triage.default]
severity = "low"
category = "general"

[policy.default]
allowed_actions = ["*"]

[[policy.rules]]
id = "needs-approval"
match = {{ category = ["approvals"] }}
then = {{ approval_required_for = ["ticket.escalate"] }}

[[policy.rules]]
id = "refunds-need-a-human"
match = {{ category = ["refunds"] }}
then = {{ approval_required_for = ["*"] }}

[[policy.rules]]
id = "vendor-changes-expire"
match = {{ category = ["vendors"] }}
then = {{ approval_required_for = ["*"], approval_timeout_seconds = 3 }}

[[playbooks]]
id = "payments"
match = {{ category = ["payments"] }}
steps = [
  {{ id = "open-ticket", tool = "ticket", action = "create", params = {{ queue = "payments", ref = "{{exception_id}}" }} }},
  {{ id = "page-oncall", tool = "notify", action = "page", params = {{ channel = "#payments" }} }},
  {{ id = "callback", tool = "webhook", action = "retry-payment", params = {{ order = "{{external_ref}}" }} }},
]

[[playbooks]]
id = "approvals"
match = {{ category = ["approvals"] }}
steps = [
  {{ id = "escalate", tool = "ticket", action = "escalate" }},
]

[[playbooks]]
id = "default"
steps = [
  {{ id = "log", tool = "webhook", action = "record" }},
]

[tools.ticket]
kind = "ticket"
url = "{url}"

[tools.notify]
kind = "notify"
url = "{url}"

[tools.webhook]
kind = "webhook"
url = "{url}/hooks/acme"
"""

GLOBEX = """
tenant_id = "globex"

[[triage.rules]]
id = "everything-is-critical"
then = {{ severity = "critical", category = "globex-ops" }}

[[playbooks]]
id = "globex"
steps = [
  {{ id = "notify", tool = "webhook", action = "notify" }},
]

[tools.webhook]
kind = "webhook"
url = "{url}/hooks/globex"
"""


def write_config(root: Path, tools_url: str) -> Path:
    """A config dir with tenants acme and globex whose tools call ``tools_url``."""
    (root / "tenants").mkdir(parents=True, exist_ok=True)
    (root / "tenants" / "acme.toml").write_text(ACME.format(url=tools_url))
    (root / "tenants" / "globex.toml").write_text(GLOBEX.format(url=tools_url))
    entries = [(tenant, "test", "admin", key) for tenant, key in KEYS.items()]
    entries += [("acme", f"test {role}", role, key) for role, key in ROLE_KEYS.items()]
    (root / "api_keys.toml").write_text(api_keys_toml(entries))
    return root


def api_keys_toml(entries: list[tuple[str, str, str, str]]) -> str:
    """api_keys.toml listing these (tenant, name, role, key) entries."""
    return "".join(
        f'[[keys]]\ntenant_id = "{tenant}"\nname = "{name}"\nrole = "{role}"\n'
        f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n\n'
        for tenant, name, role, key in entries
    )


def limit_tenant(root: Path, tenant: str, per_second: float, burst: int) -> None:
    """Give ``tenant`` (written by :func:`write_config`) an ingest limit: a ``[limits]`` table at
    the end of its file. The workers ignore it; an API started afterwards applies it."""
    path = root / "tenants" / f"{tenant}.toml"
    text = path.read_text()
    path.write_text(f"{text}\n[limits]\ningest_per_second = {per_second}\ningest_burst = {burst}\n")
