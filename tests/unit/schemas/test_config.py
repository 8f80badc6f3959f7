"""Tenant configuration: the example files load and do what their comments say, and a broken file
fails with a message that names the file and the problem."""

from __future__ import annotations

import fnmatch
import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agents.playbook import plan
from agents.policy import decide
from agents.triage import triage
from schemas.config import (
    ROLES,
    Caller,
    ConfigError,
    Role,
    TenantConfig,
    load_api_keys,
    load_tenant,
    load_tenants,
    role_allows,
)
from schemas.events import Decision, ExceptionPlanned, ExceptionReport, Severity
from tests import factories
from tests.factories import NOW

EXAMPLE = Path(__file__).resolve().parents[3] / "config" / "example"
TOOLS_URL = "http://tools.test:9000"


@pytest.fixture
def tools_url(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SLUICE_TOOLS_URL", TOOLS_URL)
    return TOOLS_URL


@pytest.fixture
def tenants(tools_url: str) -> dict[str, TenantConfig]:
    return load_tenants(EXAMPLE)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -------------------------------------------------------------------------------- the example files


def test_both_example_tenants_load(tenants: dict[str, TenantConfig]) -> None:
    assert sorted(tenants) == ["acme", "globex"]
    assert all(name == config.tenant_id for name, config in tenants.items())
    assert tenants["acme"].intake.repeat_window_seconds == 3600
    assert tenants["globex"].intake.repeat_window_seconds == 900


def test_example_tool_urls_come_from_the_environment(tenants: dict[str, TenantConfig]) -> None:
    for config in tenants.values():
        http_tools = {name: t for name, t in config.tools.items() if t.kind != "noop"}
        assert http_tools, config.tenant_id
        for name, tool in http_tools.items():
            assert tool.url is not None
            assert tool.url.startswith(f"{TOOLS_URL}/{config.tenant_id}/"), name
    assert {t.kind for t in tenants["acme"].tools.values()} == {
        "ticket",
        "notify",
        "webhook",
        "noop",
    }


def test_example_llm_is_off(tenants: dict[str, TenantConfig]) -> None:
    assert not any(config.triage.llm.enabled for config in tenants.values())


def test_example_maintenance_windows_are_over(tenants: dict[str, TenantConfig]) -> None:
    windows = [w for config in tenants.values() for w in config.policy.maintenance_windows]
    assert windows
    now = datetime.now(UTC)
    assert all(w.end < now and not w.covers(now) for w in windows)


def test_example_tenants_have_different_rules(tenants: dict[str, TenantConfig]) -> None:
    acme, globex = tenants["acme"], tenants["globex"]
    assert {r.id for r in acme.triage.rules}.isdisjoint(r.id for r in globex.triage.rules)
    auth = factories.accepted(factories.make_report(source="sso", error_type="AuthTokenExpired"))
    assert triage(auth, acme.triage, NOW).payload.severity == Severity.high
    assert triage(auth, globex.triage, NOW).payload.severity == Severity.critical


def test_example_playbook_steps_are_allowed_by_some_policy(
    tenants: dict[str, TenantConfig],
) -> None:
    """A step no policy ever allows would always be skipped: almost certainly a typo."""
    for config in tenants.values():
        globs = [g for r in config.policy.rules for g in r.then.allowed_actions]
        globs += list(config.policy.default.allowed_actions)
        for playbook in config.playbooks:
            for step in playbook.steps:
                action = f"{step.tool}.{step.action}".lower()
                assert any(fnmatch.fnmatchcase(action, g.lower()) for g in globs), (
                    config.tenant_id,
                    playbook.id,
                    step.id,
                )


def _run(
    config: TenantConfig, report: ExceptionReport, occurrences: int = 1
) -> tuple[str, Decision, ExceptionPlanned | None]:
    """Triage, decide and plan one report with ``config``: (triage rule, decision, plan or None)."""
    accepted = factories.accepted(
        report, occurrences_in_window=occurrences, tenant_id=config.tenant_id
    )
    triaged = triage(accepted, config.triage, NOW)
    decided = decide(triaged, config.policy, NOW)
    return triaged.payload.rule_id, decided.payload.decision, plan(decided, config.playbooks, NOW)


def test_acme_provider_outage_pages_at_once_and_holds_the_escalation(
    tenants: dict[str, TenantConfig],
) -> None:
    report = factories.make_report(
        source="payments",
        error_type="ProviderTimeout",
        message="Payment provider timed out after 30000 ms",
    )
    rule, decision, planned = _run(tenants["acme"], report)
    assert (rule, decision) == ("payment-provider-timeout", Decision.proceed)
    assert isinstance(planned, ExceptionPlanned)
    assert planned.payload.playbook_id == "payment-provider-outage"
    assert {s.step_id: s.requires_approval for s in planned.payload.steps} == {
        "page-payments-oncall": False,
        "open-incident": False,
        "escalate-to-provider": True,
    }
    assert planned.payload.awaiting_approval is True


def test_acme_low_severity_repeats_are_suppressed(tenants: dict[str, TenantConfig]) -> None:
    decline = factories.make_report()
    assert _run(tenants["acme"], decline)[:2] == ("payment-declined", Decision.proceed)
    assert _run(tenants["acme"], decline, occurrences=2)[:2] == (
        "payment-declined",
        Decision.suppressed,
    )


def test_acme_key_account_decline_is_rated_higher(tenants: dict[str, TenantConfig]) -> None:
    report = factories.make_report(attributes={"customer_tier": "enterprise-gold"})
    accepted = factories.accepted(report)
    out = triage(accepted, tenants["acme"].triage, NOW)
    assert (out.payload.rule_id, out.payload.severity) == (
        "payment-declined-key-account",
        Severity.medium,
    )


def test_acme_auth_failures_wait_for_approval(tenants: dict[str, TenantConfig]) -> None:
    report = factories.make_report(
        source="storefront", error_type="AuthenticationFailed", message="Bad login"
    )
    rule, decision, planned = _run(tenants["acme"], report)
    assert (rule, decision, planned) == ("auth-failure", Decision.awaiting_approval, None)


def test_acme_stuck_shipment_requeries_the_carrier(tenants: dict[str, TenantConfig]) -> None:
    report = factories.make_report(
        source="shipping",
        error_type="ShipmentStuck",
        message="Shipment 7781 has not moved from hub BER-2 for 72 hours",
        external_ref="shp-7781",
    )
    rule, decision, planned = _run(tenants["acme"], report)
    assert (rule, decision) == ("shipment-stuck", Decision.proceed)
    assert isinstance(planned, ExceptionPlanned)
    first = planned.payload.steps[0]
    assert (first.tool, first.action, first.params["shipment"]) == (
        "carrier",
        "requery_tracking",
        "shp-7781",
    )
    assert planned.payload.skipped == ()


def test_acme_unrecognised_exception_gets_a_catch_all_ticket(
    tenants: dict[str, TenantConfig],
) -> None:
    report = factories.make_report(
        source="search", error_type="IndexStale", message="Index is stale"
    )
    rule, decision, planned = _run(tenants["acme"], report)
    assert (rule, decision) == ("default", Decision.proceed)
    assert isinstance(planned, ExceptionPlanned)
    assert planned.payload.playbook_id == "catch-all"
    assert planned.payload.steps[0].params["summary"] == "[uncategorized] IndexStale from search"


def test_globex_invoice_resync_runs_and_unmatched_plans_none(
    tenants: dict[str, TenantConfig],
) -> None:
    invoice = factories.make_report(
        source="billing",
        error_type="InvoiceSyncFailed",
        message="Invoice 55 could not be synced to the ledger",
        external_ref="inv-55",
    )
    rule, decision, planned = _run(tenants["globex"], invoice)
    assert (rule, decision) == ("invoice-sync-failed", Decision.proceed)
    assert isinstance(planned, ExceptionPlanned)
    assert planned.payload.steps[0].params["invoice"] == "inv-55"
    assert planned.payload.awaiting_approval is False

    other = factories.make_report(source="crm", error_type="Timeout", message="CRM slow")
    rule, decision, planned = _run(tenants["globex"], other)
    assert (rule, decision) == ("default", Decision.proceed)
    assert isinstance(planned, ExceptionPlanned)
    assert planned.payload.playbook_id == "none"


# ---------------------------------------------------------------------------------------- api keys


def test_demo_api_keys_map_to_their_tenants(tenants: dict[str, TenantConfig]) -> None:
    keys = load_api_keys(EXAMPLE)
    assert keys.tenant_for("demo-acme-key") == "acme"
    assert keys.tenant_for("demo-globex-key") == "globex"
    assert keys.tenant_for("demo-acme-key ") is None
    assert keys.tenant_for("") is None
    assert {k.tenant_id for k in keys.keys} <= set(tenants)


def test_api_keys_file_holds_digests_not_keys() -> None:
    text = (EXAMPLE / "api_keys.toml").read_text()
    assert 'sha256 = "a2fb8545' in text
    assert "# demo-acme-key" in text  # named in the comments only
    assert all("demo-" not in line.split("#")[0] for line in text.splitlines())


def test_the_example_keys_have_the_roles_the_readme_gives_them() -> None:
    keys = load_api_keys(EXAMPLE)
    expected = {
        "demo-acme-key": ("acme", "admin"),
        "demo-globex-key": ("globex", "admin"),
        "demo-acme-producer-key": ("acme", "producer"),
        "demo-acme-viewer-key": ("acme", "viewer"),
        "demo-acme-operator-key": ("acme", "operator"),
    }
    for key, (tenant, role) in expected.items():
        caller = keys.caller_for(key)
        assert caller is not None, key
        assert (caller.tenant_id, caller.role) == (tenant, role)
        assert "local use only" in caller.key_name
    assert len(keys.keys) == len(expected)


def test_api_key_with_a_bad_digest_is_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        "api_keys.toml",
        '[[keys]]\ntenant_id = "acme"\nname = "ci"\nrole = "producer"\nsha256 = "demo-acme-key"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_api_keys(tmp_path)
    assert str(info.value) == (
        f'{tmp_path / "api_keys.toml"}: keys[0] ("ci"): sha256 must be the key\'s sha256 digest '
        "as 64 lowercase hex digits, not the key"
    )


DIGEST = "0" * 64


def key_entry(name: str | None = "ci", role: str | None = "producer", digest: str = DIGEST) -> str:
    lines = ["[[keys]]", 'tenant_id = "acme"', f'sha256 = "{digest}"']
    lines += [f'name = "{name}"'] if name is not None else []
    lines += [f'role = "{role}"'] if role is not None else []
    return "\n".join(lines) + "\n\n"


def test_a_key_without_a_role_names_the_file_and_the_entry(tmp_path: Path) -> None:
    text = key_entry("admin", "admin", "1" * 64) * 1 + key_entry("viewer", "viewer", "2" * 64)
    write(tmp_path, "api_keys.toml", text + key_entry("ci producer", None))
    with pytest.raises(ConfigError) as info:
        load_api_keys(tmp_path)
    assert str(info.value) == (
        f'{tmp_path / "api_keys.toml"}: keys[2] ("ci producer"): role is required '
        "(one of producer, viewer, operator, admin)"
    )


def test_an_unknown_role_is_named_with_the_roles_there_are(tmp_path: Path) -> None:
    write(tmp_path, "api_keys.toml", key_entry(role="root"))
    with pytest.raises(
        ConfigError, match=r'keys\[0\] \("ci"\): role "root" is not one of producer, '
    ):
        load_api_keys(tmp_path)


@pytest.mark.parametrize("name", [None, "", "   "])
def test_a_key_needs_a_name(tmp_path: Path, name: str | None) -> None:
    write(tmp_path, "api_keys.toml", key_entry(name=name))
    with pytest.raises(ConfigError, match=r"keys\[0\] \(no name\): name (is required|must not be)"):
        load_api_keys(tmp_path)


def test_a_name_is_unique_within_its_tenant_and_a_digest_within_the_file(tmp_path: Path) -> None:
    write(tmp_path, "api_keys.toml", key_entry("ci", digest="1" * 64) + key_entry("ci"))
    with pytest.raises(ConfigError, match=r"keys\[1\] \(\"ci\"\): tenant 'acme' already has a key"):
        load_api_keys(tmp_path)
    write(tmp_path, "api_keys.toml", key_entry("ci") + key_entry("other"))
    with pytest.raises(
        ConfigError, match=r'keys\[1\] \("other"\) has the same sha256 as keys\[0\]'
    ):
        load_api_keys(tmp_path)


def test_the_same_name_may_be_used_by_two_tenants(tmp_path: Path) -> None:
    other = key_entry("ci", digest="1" * 64).replace('"acme"', '"globex"')
    write(tmp_path, "api_keys.toml", key_entry("ci") + other)
    assert [k.tenant_id for k in load_api_keys(tmp_path).keys] == ["acme", "globex"]


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        ("producer", {"producer"}),
        ("viewer", {"viewer"}),
        ("operator", {"viewer", "operator"}),
        ("admin", {"producer", "viewer", "operator", "admin"}),
    ],
)
def test_what_each_role_allows(role: Role, allowed: set[str]) -> None:
    assert {needed for needed in ROLES if role_allows(role, needed)} == allowed


def test_a_caller_is_the_tenant_the_name_and_the_role_of_a_key(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"secret").hexdigest()
    write(tmp_path, "api_keys.toml", key_entry("ops alice", "operator", digest))
    keys = load_api_keys(tmp_path)
    assert keys.caller_for("secret") == Caller(
        tenant_id="acme", key_name="ops alice", role="operator"
    )
    assert keys.caller_for("secret ") is None
    assert keys.caller_for(DIGEST) is None  # the digest itself is not a key


# ------------------------------------------------------------------------------------------ errors


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "acme.toml", 'tenant_id = "acme"\n[intake]\nrepeat_window_secs = 60\n')
    with pytest.raises(ConfigError) as info:
        load_tenant(path)
    message = str(info.value)
    assert str(path) in message
    assert "intake.repeat_window_secs: Extra inputs are not permitted" in message


def test_typo_in_a_rule_is_named(tmp_path: Path) -> None:
    text = """
tenant_id = "acme"
[[triage.rules]]
id = "r"
match = { sorce = "payments" }
then = { severity = "high", category = "c" }
"""
    with pytest.raises(
        ConfigError, match=r"triage\.rules\.0\.match\.sorce: Extra inputs are not permitted"
    ):
        load_tenant(write(tmp_path, "acme.toml", text))


def test_tenant_id_must_match_the_file_name(tmp_path: Path) -> None:
    path = write(tmp_path, "acme.toml", 'tenant_id = "globex"\n')
    with pytest.raises(
        ConfigError, match=r"tenant_id 'globex' must match the file name \('acme'\)"
    ):
        load_tenant(path)


def test_step_with_an_undeclared_tool_is_refused(tmp_path: Path) -> None:
    text = """
tenant_id = "acme"
[[playbooks]]
id = "p"
steps = [{ id = "s", tool = "pager", action = "page" }]
[tools.ticket]
kind = "noop"
"""
    with pytest.raises(ConfigError) as info:
        load_tenant(write(tmp_path, "acme.toml", text))
    assert "playbook 'p' step 's' uses tool 'pager', which is not declared under [tools]" in str(
        info.value
    )
    assert "['ticket']" in str(info.value)


def test_unset_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_TOOLS_URL", raising=False)
    with pytest.raises(
        ConfigError, match="environment variable SLUICE_TOOLS_URL is referenced but unset"
    ):
        load_tenants(EXAMPLE)


def test_invalid_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "acme.toml", 'tenant_id = "acme"\n[intake\n')
    with pytest.raises(ConfigError, match=r"acme\.toml is not valid TOML"):
        load_tenant(path)


def test_missing_tenants_folder_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Sluice needs one TOML file per tenant there"):
        load_tenants(tmp_path)


def test_missing_api_keys_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"api_keys\.toml does not exist"):
        load_api_keys(tmp_path)


def test_http_tool_without_url_is_refused(tmp_path: Path) -> None:
    text = 'tenant_id = "acme"\n[tools.ticket]\nkind = "ticket"\n'
    with pytest.raises(ConfigError, match=r"tools\.ticket: Value error, a ticket tool needs a url"):
        load_tenant(write(tmp_path, "acme.toml", text))


def test_maintenance_window_must_end_after_it_starts(tmp_path: Path) -> None:
    text = """
tenant_id = "acme"
[[policy.maintenance_windows]]
id = "backwards"
start = 2024-03-10T04:00:00Z
end = 2024-03-09T22:00:00Z
"""
    with pytest.raises(
        ConfigError, match="maintenance window 'backwards': end must be after start"
    ):
        load_tenant(write(tmp_path, "acme.toml", text))
