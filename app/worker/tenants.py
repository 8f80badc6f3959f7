"""Tenant configuration for the stages: read from ``SLUICE_CONFIG_DIR/tenants`` when a worker starts."""

from __future__ import annotations

from pathlib import Path

from schemas.config import TenantConfig, load_tenants


class FileTenants:
    """Every tenant's configuration, loaded once from ``<config_dir>/tenants/*.toml``."""

    def __init__(self, config_dir: Path) -> None:
        self.folder = config_dir / "tenants"
        self.configs = load_tenants(config_dir)

    @property
    def where(self) -> str:
        return str(self.folder)

    def get(self, tenant_id: str) -> TenantConfig | None:
        return self.configs.get(tenant_id)


class StaticTenants:
    """Configurations given as they are (unit tests, replays)."""

    def __init__(self, *configs: TenantConfig) -> None:
        self.configs = {c.tenant_id: c for c in configs}

    @property
    def where(self) -> str:
        return "the configurations given to this worker"

    def get(self, tenant_id: str) -> TenantConfig | None:
        return self.configs.get(tenant_id)
