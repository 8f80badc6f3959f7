"""Sluice's one Settings class: every knob, read from SLUICE_* environment variables (or a .env file).

The only variable without the SLUICE_ prefix is KAFKA_BOOTSTRAP_SERVERS, the name users of Kafka tools
already know. Paths are relative to the working directory unless given absolute.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SLUICE_", env_file=".env", extra="ignore", frozen=True
    )

    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "SLUICE_KAFKA_BOOTSTRAP_SERVERS"),
        description="Comma-separated host:port list of the Kafka cluster.",
    )
    app_id: str = Field(
        default="sluice",
        description="Faust application id: the consumer group and the prefix of changelog topics.",
    )
    topic_prefix: str = Field(default="sluice", description="Prefix of every Sluice topic name.")
    partitions: int = Field(default=8, ge=1, le=1024, description="Partitions per stage topic.")
    replication_factor: int = Field(default=1, ge=1, le=16)
    state_dir: Path = Field(
        default=Path(".sluice"),
        description="Local state: the dev broker's data and logs, worker table stores.",
    )
    worker_data_dir: Path | None = Field(
        default=None, description="Faust table store folder; defaults to <state_dir>/worker."
    )
    worker_web_host: str = "127.0.0.1"
    worker_web_port: int = Field(default=6066, ge=1, le=65535)
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    worker_urls: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:6066"],
        description="Worker web endpoints the API reads exception state through (any one will "
        "route a read to the worker that owns the partition).",
    )
    log_level: str = "WARNING"

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap_not_empty(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers or any(":" not in s for s in servers):
            raise ValueError(
                "KAFKA_BOOTSTRAP_SERVERS must be a comma-separated list of host:port, "
                f"got {value!r}"
            )
        return ",".join(servers)

    @property
    def worker_dir(self) -> Path:
        return self.worker_data_dir or self.state_dir / "worker"

    @property
    def faust_broker(self) -> str:
        return ";".join(f"kafka://{s}" for s in self.kafka_bootstrap_servers.split(","))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
