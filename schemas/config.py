"""Per-tenant configuration: triage rules, policies, playbooks, tool endpoints, API keys.

Each tenant has one TOML file, ``<config_dir>/tenants/<tenant_id>.toml``; API keys live in
``<config_dir>/api_keys.toml`` as sha256 digests (never the keys themselves), each with its tenant, a
name and a :data:`Role`. The models are frozen and strict (unknown keys are errors) so a typo in a rule
fails loudly at load time, not silently at runtime; an api_keys.toml error names the entry by index and
name.
String values may reference environment variables as ``${NAME}``, expanded at load time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.events import Severity


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message names file and field."""


# ------------------------------------------------------------------------------------------ matching


class Match(Strict):
    """Conditions on an exception; every condition given must hold. Patterns are shell globs
    (``payments-*``), compared case-insensitively."""

    source: str | None = None
    error_type: str | None = None
    message_contains: tuple[str, ...] = Field(
        default=(), description="Substrings (case-insensitive); any one is enough."
    )
    attributes: dict[str, str] = Field(
        default_factory=dict, description="attribute name -> glob on its string value"
    )
    severity: tuple[Severity, ...] = ()
    category: tuple[str, ...] = Field(default=(), description="Globs; any one is enough.")

    def matches(
        self,
        *,
        source: str = "",
        error_type: str = "",
        message: str = "",
        attributes: dict[str, Any] | None = None,
        severity: Severity | None = None,
        category: str | None = None,
    ) -> bool:
        if self.source is not None and not _glob(source, self.source):
            return False
        if self.error_type is not None and not _glob(error_type, self.error_type):
            return False
        if self.message_contains:
            low = message.lower()
            if not any(s.lower() in low for s in self.message_contains):
                return False
        attrs = attributes or {}
        for name, pattern in self.attributes.items():
            if name not in attrs or not _glob(str(attrs[name]), pattern):
                return False
        if self.severity and severity not in self.severity:
            return False
        return not (
            self.category
            and (category is None or not any(_glob(category, c) for c in self.category))
        )


def _glob(value: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(value.lower(), pattern.lower())


# ----------------------------------------------------------------------------------------- intake


class IntakeConfig(Strict):
    repeat_window_seconds: int = Field(default=3600, ge=1, le=30 * 86400)


# ----------------------------------------------------------------------------------------- triage


class TriageOutcome(Strict):
    severity: Severity
    category: str = Field(min_length=1, max_length=100)


class TriageRule(Strict):
    id: str = Field(min_length=1, max_length=100)
    match: Match = Field(default_factory=Match)
    then: TriageOutcome


class LLMConfig(Strict):
    """An OpenAI-compatible chat completions endpoint used to classify, when enabled."""

    enabled: bool = False
    base_url: str = Field(default="", description="e.g. http://127.0.0.1:8080/v1")
    model: str = "gpt-4o-mini"
    api_key_env: str | None = Field(
        default=None, description="Name of the environment variable holding the API key."
    )
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    categories: tuple[str, ...] = Field(
        default=(), description="Categories the model may answer; others fall back to rules."
    )

    @model_validator(mode="after")
    def _url_when_enabled(self) -> LLMConfig:
        if self.enabled and not self.base_url:
            raise ValueError("triage.llm.base_url is required when triage.llm.enabled = true")
        return self


class TriageConfig(Strict):
    rules: tuple[TriageRule, ...] = ()
    default: TriageOutcome = TriageOutcome(severity=Severity.medium, category="uncategorized")
    llm: LLMConfig = LLMConfig()


# ----------------------------------------------------------------------------------------- policy

DEFAULT_APPROVAL_TIMEOUT_SECONDS = 24 * 3600
MAX_APPROVAL_TIMEOUT_SECONDS = 30 * 24 * 3600


class PolicyThen(Strict):
    allowed_actions: tuple[str, ...] = Field(
        default=("*",), description="Tool actions ('tool.action' globs) the playbook may run."
    )
    approval_required_for: tuple[str, ...] = Field(
        default=(), description="'tool.action' globs that need a human approval first."
    )
    suppress_repeats: bool = Field(
        default=False, description="Suppress an exception whose fingerprint repeats in window."
    )
    approval_timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        le=MAX_APPROVAL_TIMEOUT_SECONDS,
        description="How long an exception this rule holds waits for a decision before it ends "
        "as approval_expired; unset: the tenant's [policy] approval_timeout_seconds.",
    )


class PolicyRule(Strict):
    id: str = Field(min_length=1, max_length=100)
    match: Match = Field(default_factory=Match)
    then: PolicyThen


class MaintenanceWindow(Strict):
    id: str = Field(min_length=1, max_length=100)
    start: AwareDatetime
    end: AwareDatetime
    match: Match = Field(default_factory=Match)

    @model_validator(mode="after")
    def _ordered(self) -> MaintenanceWindow:
        if self.end <= self.start:
            raise ValueError(f"maintenance window {self.id!r}: end must be after start")
        return self

    def covers(self, when: datetime) -> bool:
        return self.start <= when < self.end


class PolicyConfig(Strict):
    rules: tuple[PolicyRule, ...] = ()
    default: PolicyThen = PolicyThen()
    maintenance_windows: tuple[MaintenanceWindow, ...] = ()
    approval_timeout_seconds: int = Field(
        default=DEFAULT_APPROVAL_TIMEOUT_SECONDS,
        ge=1,
        le=MAX_APPROVAL_TIMEOUT_SECONDS,
        description="How long a held exception waits for a decision, unless its rule says.",
    )


# --------------------------------------------------------------------------------------- playbook


class StepConfig(Strict):
    id: str = Field(min_length=1, max_length=100)
    tool: str = Field(min_length=1, max_length=50, description="A tool name from [tools].")
    action: str = Field(min_length=1, max_length=100)
    params: dict[str, Any] = Field(default_factory=dict)


class Playbook(Strict):
    id: str = Field(min_length=1, max_length=100)
    match: Match = Field(default_factory=Match)
    steps: tuple[StepConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_step_ids(self) -> Playbook:
        # Step ids are part of each tool call's idempotency key: two equal ids would share one.
        ids = [s.id for s in self.steps]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"playbook {self.id!r} repeats step ids {dupes}; make them unique")
        return self


# ------------------------------------------------------------------------------------------ tools


class ToolConfig(Strict):
    """How to reach one tool. ``kind`` picks the implementation; http kinds need ``url``."""

    kind: Literal["webhook", "ticket", "notify", "noop"]
    url: str | None = None
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _url_for_http(self) -> ToolConfig:
        if self.kind != "noop" and not self.url:
            raise ValueError(f"a {self.kind} tool needs a url")
        return self


# ----------------------------------------------------------------------------------------- limits


class LimitsConfig(Strict):
    """``[limits]``: how fast the tenant may report exceptions to one API process (a token bucket:
    each reported exception, each item of a batch, takes a token; ``ingest_per_second`` tokens come
    back every second, up to ``ingest_burst``). No ``ingest_per_second``: unlimited. The API reads
    this section at start; the worker ignores it."""

    ingest_per_second: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Sustained reports per second per API process; unset: unlimited.",
    )
    ingest_burst: int | None = Field(
        default=None,
        gt=0,
        description="Most reports at once (the bucket's size); unset: one second's worth.",
    )

    @model_validator(mode="after")
    def _burst_fits_the_rate(self) -> LimitsConfig:
        if self.ingest_per_second is None:
            if self.ingest_burst is not None:
                raise ValueError(
                    "ingest_burst needs ingest_per_second (the rate the burst refills at); "
                    "set both, or neither for no limit"
                )
            return self
        if self.ingest_burst is not None and self.ingest_burst < self.ingest_per_second:
            raise ValueError(
                f"ingest_burst ({self.ingest_burst}) must be at least ingest_per_second "
                f"({self.ingest_per_second:g}): a smaller bucket could never hold a second's "
                "worth of reports"
            )
        return self

    @property
    def limited(self) -> bool:
        return self.ingest_per_second is not None

    @property
    def burst(self) -> int:
        """The bucket's size: ``ingest_burst``, else one second's worth (at least 1)."""
        if self.ingest_burst is not None:
            return self.ingest_burst
        return max(1, math.ceil(self.ingest_per_second or 0))


# ----------------------------------------------------------------------------------------- tenant


class TenantConfig(Strict):
    tenant_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    intake: IntakeConfig = IntakeConfig()
    triage: TriageConfig = TriageConfig()
    policy: PolicyConfig = PolicyConfig()
    playbooks: tuple[Playbook, ...] = ()
    tools: dict[str, ToolConfig] = Field(default_factory=lambda: {"noop": ToolConfig(kind="noop")})
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _tool_names(self) -> TenantConfig:
        # Policies name actions as "tool.action" globs, so a tool name must not contain a dot.
        bad = [n for n in self.tools if not re.fullmatch(r"[a-z0-9_-]{1,50}", n)]
        if bad:
            raise ValueError(f"tool names {bad} must be 1-50 of a-z, 0-9, '_' or '-'")
        return self

    @model_validator(mode="after")
    def _steps_use_known_tools(self) -> TenantConfig:
        for pb in self.playbooks:
            for step in pb.steps:
                if step.tool not in self.tools:
                    raise ValueError(
                        f"playbook {pb.id!r} step {step.id!r} uses tool {step.tool!r}, which is "
                        f"not declared under [tools] (declared: {sorted(self.tools)})"
                    )
        return self


Role = Literal["producer", "viewer", "operator", "admin"]
"""What an API key may do. A producer only reports exceptions; viewer < operator < admin each may do
what the one before may, and more; an admin may also report."""

ROLES: tuple[Role, ...] = get_args(Role)
_RANKED: tuple[Role, ...] = ("viewer", "operator", "admin")


def role_allows(role: Role, needed: Role) -> bool:
    """Whether a key with ``role`` may use a route that needs ``needed``.

    ``producer`` stands apart from the ranked roles: only producer and admin keys may report, and a
    producer key may do nothing else. For the others, a role allows what the roles below it allow.
    """
    if needed == "producer":
        return role in ("producer", "admin")
    if role == "producer":
        return False
    return _RANKED.index(role) >= _RANKED.index(needed)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the tenant, the name of the key (the actor named in the event log) and
    the key's role."""

    tenant_id: str
    key_name: str
    role: Role

    def may(self, needed: Role) -> bool:
        return role_allows(self.role, needed)


class ApiKey(Strict):
    tenant_id: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str = Field(
        max_length=100,
        description="Names the key within its tenant; events an operator causes record it.",
    )
    role: Role

    @field_validator("name")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name must not be blank")
        return value.strip()


class ApiKeys(Strict):
    keys: tuple[ApiKey, ...] = ()
    _by_digest: dict[str, ApiKey] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _unambiguous(self) -> ApiKeys:
        # A digest listed twice could carry two roles; a name used twice would make the actor in
        # the event log ambiguous.
        digests: dict[str, int] = {}
        names: dict[tuple[str, str], int] = {}
        for i, entry in enumerate(self.keys):
            if entry.sha256 in digests:
                first = digests[entry.sha256]
                raise ValueError(
                    f"{_entry(i, entry.name)} has the same sha256 as {_entry(first, self.keys[first].name)}; "
                    "a key may be listed once only"
                )
            digests[entry.sha256] = i
            name = (entry.tenant_id, entry.name)
            if name in names:
                raise ValueError(
                    f"{_entry(i, entry.name)}: tenant {entry.tenant_id!r} already has a key with this "
                    f"name (keys[{names[name]}]); names identify keys within a tenant, make it unique"
                )
            names[name] = i
        return self

    def model_post_init(self, context: Any, /) -> None:
        self._by_digest = {entry.sha256: entry for entry in self.keys}

    def caller_for(self, key: str) -> Caller | None:
        """Who sends ``key``, or None when it is not a listed key."""
        entry = self._by_digest.get(hashlib.sha256(key.encode()).hexdigest())
        if entry is None:
            return None
        return Caller(tenant_id=entry.tenant_id, key_name=entry.name, role=entry.role)

    def tenant_for(self, key: str) -> str | None:
        caller = self.caller_for(key)
        return None if caller is None else caller.tenant_id


def _entry(index: int, name: object) -> str:
    """How a loading error names an entry of api_keys.toml: ``keys[2] ("ci producer")``."""
    if isinstance(name, str) and name.strip():
        return f"keys[{index}] ({json.dumps(name.strip())})"
    return f"keys[{index}] (no name)"


# ---------------------------------------------------------------------------------------- loading

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, where: Path) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name} is referenced but unset")
            return os.environ[name]

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} does not exist") from exc
    return _parse_toml(path, raw)


def _parse_toml(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        expanded: dict[str, Any] = _expand(tomllib.loads(raw.decode()), path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return expanded


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
        for err in exc.errors()
    )


def load_tenant(path: Path) -> TenantConfig:
    data = _read_toml(path)
    try:
        tenant = TenantConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from exc
    if tenant.tenant_id != path.stem:
        raise ConfigError(
            f"{path}: tenant_id {tenant.tenant_id!r} must match the file name ({path.stem!r})"
        )
    return tenant


def load_tenants(config_dir: Path) -> dict[str, TenantConfig]:
    folder = config_dir / "tenants"
    if not folder.is_dir():
        raise ConfigError(f"{folder} does not exist: Sluice needs one TOML file per tenant there")
    return {p.stem: load_tenant(p) for p in sorted(folder.glob("*.toml"))}


class _TenantLimits(BaseModel):
    """The part of a tenant file the API uses; the rest is the worker's (and may reference
    environment variables, such as tool secrets, that the API process need not have)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    tenant_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    limits: LimitsConfig = LimitsConfig()


def load_tenant_limits(config_dir: Path) -> dict[str, LimitsConfig]:
    """The ``[limits]`` of every tenant file in ``<config_dir>/tenants``, by tenant id.

    Only ``tenant_id`` and ``[limits]`` are read (and only ``[limits]`` has its ``${NAME}``
    references expanded), so the API checks what it uses without needing the tools' settings; the
    worker checks the whole file. An error names the file and the field.
    """
    folder = config_dir / "tenants"
    if not folder.is_dir():
        raise ConfigError(f"{folder} does not exist: Sluice needs one TOML file per tenant there")
    found = {}
    for path in sorted(folder.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_bytes().decode())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path} does not exist") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        section = {"tenant_id": data.get("tenant_id"), "limits": data.get("limits", {})}
        try:
            tenant = _TenantLimits.model_validate(_expand(section, path))
        except ValidationError as exc:
            raise ConfigError(f"{path}: {_describe(exc)}") from exc
        if tenant.tenant_id != path.stem:
            raise ConfigError(
                f"{path}: tenant_id {tenant.tenant_id!r} must match the file name ({path.stem!r})"
            )
        found[tenant.tenant_id] = tenant.limits
    return found


def api_keys_path(config_dir: Path) -> Path:
    return config_dir / "api_keys.toml"


def load_api_keys(config_dir: Path) -> ApiKeys:
    path = api_keys_path(config_dir)
    return _api_keys(path, _read_toml(path))


def parse_api_keys(path: Path, raw: bytes) -> ApiKeys:
    """The keys in ``raw``, the content of the api_keys.toml at ``path`` (named in errors)."""
    return _api_keys(path, _parse_toml(path, raw))


def _api_keys(path: Path, data: dict[str, Any]) -> ApiKeys:
    # Each entry is checked on its own first, so an error names the entry by index and name.
    entries = data.get("keys")
    problems: list[str] = []
    if isinstance(entries, list):
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                problems.append(f"keys[{index}] must be a table (write it as [[keys]])")
                continue
            try:
                ApiKey.model_validate(entry)
            except ValidationError as exc:
                label = _entry(index, entry.get("name"))
                problems += [f"{label}: {_key_problem(err, entry)}" for err in exc.errors()]
    if problems:
        raise ConfigError(f"{path}: {'; '.join(problems)}")
    try:
        return ApiKeys.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        if all(err["type"] == "value_error" and not err["loc"] for err in errors):
            # The whole-file checks (a digest or a name listed twice) say where, as sentences.
            text = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in errors)
            raise ConfigError(f"{path}: {text}") from exc
        raise ConfigError(f"{path}: {_describe(exc)}") from exc


_ROLE_LIST = ", ".join(ROLES)


def _key_problem(err: Any, entry: dict[str, Any]) -> str:
    field = ".".join(str(p) for p in err["loc"])
    missing = err["type"] == "missing"
    if field == "role":
        if missing:
            return f"role is required (one of {_ROLE_LIST})"
        return f"role {json.dumps(entry.get('role'))} is not one of {_ROLE_LIST}"
    if field == "name" and missing:
        return "name is required (it names the key in the event log; unique within its tenant)"
    if field == "sha256" and not missing:
        return "sha256 must be the key's sha256 digest as 64 lowercase hex digits, not the key"
    if missing:
        return f"{field} is required"
    if err["type"] == "extra_forbidden":
        return f"{field} is not a setting of a key (they are tenant_id, name, role and sha256)"
    if err["type"] == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    return f"{field}: {err['msg']}"
