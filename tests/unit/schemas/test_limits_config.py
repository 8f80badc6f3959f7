"""``[limits]`` of a tenant file: what the example sets, what unset means, and how a bad value is
refused, by the worker's loader (the whole file) and by the API's (``[limits]`` alone) alike, with
the file and the field named."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.config import ConfigError, LimitsConfig, load_tenant, load_tenant_limits

EXAMPLE = Path(__file__).resolve().parents[3] / "config" / "example"


def write_tenant(config_dir: Path, tenant: str, limits: str, extra: str = "") -> Path:
    path = config_dir / "tenants" / f"{tenant}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'tenant_id = "{tenant}"\n{extra}\n[limits]\n{limits}\n')
    return path


def test_the_example_limits_globex_and_leaves_acme_unlimited() -> None:
    limits = load_tenant_limits(EXAMPLE)  # no SLUICE_TOOLS_URL needed: only [limits] is read
    assert limits["globex"] == LimitsConfig(ingest_per_second=100, ingest_burst=200)
    assert limits["globex"].burst == 200
    assert not limits["acme"].limited


def test_unset_is_unlimited_and_a_rate_alone_bursts_one_second() -> None:
    assert not LimitsConfig().limited
    assert LimitsConfig(ingest_per_second=50).burst == 50
    assert LimitsConfig(ingest_per_second=2.5).burst == 3
    assert LimitsConfig(ingest_per_second=0.2).burst == 1


def test_both_loaders_accept_limits(tmp_path: Path) -> None:
    path = write_tenant(tmp_path, "globex", "ingest_per_second = 0.5\ningest_burst = 4")
    assert load_tenant(path).limits == LimitsConfig(ingest_per_second=0.5, ingest_burst=4)
    assert load_tenant_limits(tmp_path)["globex"].burst == 4


def _whole(path: Path) -> object:
    return load_tenant(path)


def _api(path: Path) -> object:
    return load_tenant_limits(path.parents[1])


@pytest.mark.parametrize("load", [_whole, _api], ids=["worker", "api"])
@pytest.mark.parametrize(
    ("limits", "says"),
    [
        ("ingest_per_second = 0", r"limits\.ingest_per_second: Input should be greater than 0"),
        ("ingest_per_second = -5", r"limits\.ingest_per_second: Input should be greater than 0"),
        (
            "ingest_per_second = 10\ningest_burst = 0",
            r"limits\.ingest_burst: Input should be greater than 0",
        ),
        (
            "ingest_per_second = 100\ningest_burst = 50",
            r"limits: .*ingest_burst \(50\) must be at least ingest_per_second \(100\)",
        ),
        ("ingest_burst = 20", r"limits: .*ingest_burst needs ingest_per_second"),
        ('ingest_per_second = "fast"', r"limits\.ingest_per_second: Input should be a valid"),
        ("ingest_per_second = inf", r"limits\.ingest_per_second: Input should be a finite"),
        ("ingest_per_sec = 10", r"limits\.ingest_per_sec: Extra inputs are not permitted"),
    ],
)
def test_invalid_limits_are_refused_naming_the_file_and_field(
    tmp_path: Path, load: Callable[[Path], object], limits: str, says: str
) -> None:
    path = write_tenant(tmp_path, "globex", limits)
    with pytest.raises(ConfigError, match=rf"globex\.toml: {says}"):
        load(path)


def test_the_api_loader_names_a_file_that_is_not_toml(tmp_path: Path) -> None:
    path = write_tenant(tmp_path, "globex", "ingest_per_second = ")
    with pytest.raises(ConfigError, match=r"globex\.toml is not valid TOML"):
        load_tenant_limits(tmp_path)
    path.write_text('tenant_id = "initech"\n')
    with pytest.raises(ConfigError, match=r"globex\.toml: tenant_id 'initech' must match"):
        load_tenant_limits(tmp_path)


def test_the_api_loader_ignores_the_workers_sections(tmp_path: Path) -> None:
    # An unset variable in [tools] is the worker's problem, not the API's.
    extra = '[tools.ticket]\nkind = "ticket"\nurl = "${SLUICE_UNSET_FOR_THIS_TEST}/t"\n'
    write_tenant(tmp_path, "acme", "ingest_per_second = 3", extra=extra)
    assert load_tenant_limits(tmp_path)["acme"].burst == 3
