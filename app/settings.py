"""Sluice's one Settings class: every knob, read from SLUICE_* environment variables (or a .env file).

The only variable without the SLUICE_ prefix is KAFKA_BOOTSTRAP_SERVERS, the name users of Kafka tools
already know. Paths are relative to the working directory unless given absolute.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
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
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="SLUICE_LOG_FORMAT: text lines, or JSON lines with trace and exception ids.",
    )

    config_dir: Path = Field(
        default=Path("config/example"),
        description="Folder with api_keys.toml and tenants/<tenant_id>.toml.",
    )
    # Ingest API
    idempotency_key_ttl_seconds: int = Field(default=86_400, ge=60)
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="Larger bodies get 413.")
    max_batch_items: int = Field(default=500, ge=1, le=10_000)
    produce_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Longer without a broker ack and the API answers 503."
    )
    worker_read_timeout_seconds: float = Field(default=10.0, gt=0)
    auth_failures_per_minute: int = Field(
        default=20,
        ge=0,
        le=100_000,
        description="Failed authentications (401) a client address may have at once, refilled at "
        "this many a minute; past them the address gets 429 on every request that needs a key "
        "until the budget refills. Per API process; 0 turns this off.",
    )
    # Worker
    processed_ttl_seconds: int = Field(
        default=7 * 86_400,
        ge=60,
        description="How long a stage remembers processed event ids (duplicate detection).",
    )
    exception_retention_seconds: int = Field(
        default=30 * 86_400,
        ge=0,
        description="How long a closed exception (resolved, failed, no_action, suppressed, "
        "discarded) is kept after its last event before its record is deleted; 0 keeps every "
        "exception forever.",
    )
    exception_sweep_seconds: float = Field(
        default=2.5,
        gt=0,
        le=3600,
        description="How often the projection looks at the next 250 records of each of its "
        "partitions for closed exceptions past retention.",
    )
    approval_sweep_seconds: float = Field(
        default=10.0,
        gt=0,
        le=50,
        description="How often a worker looks for held exceptions past their approval deadline "
        "(they end as approval_expired at most this much, plus the time to process, late).",
    )
    worker_session_timeout_seconds: float = Field(
        default=10.0,
        ge=6,
        le=300,
        description="A worker that stops heartbeating is dropped from the group after this, and its "
        "partitions move on: the bound on how long a crashed worker's partitions stall.",
    )
    worker_drain_seconds: float = Field(
        default=30.0,
        ge=0,
        le=600,
        description="On SIGTERM/SIGINT, how long a worker waits for the events in flight to finish.",
    )
    worker_batch_max: int = Field(
        default=200,
        ge=1,
        le=10_000,
        description="Most records a stage takes at once: the records already fetched are processed "
        "together, their outputs sent together and their acks awaited once.",
    )
    worker_decoded_cache: int = Field(
        default=1024,
        ge=0,
        le=1_000_000,
        description="Recently written values that the projection and the group stage keep decoded "
        "(per table), so a record is not parsed again for each of its events; 0 turns it off.",
    )
    producer_linger_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="How long the worker's producer waits to fill a request (Kafka's linger.ms).",
    )
    worker_event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop", description="The worker's event loop: uvloop, or Python's own asyncio."
    )
    table_write_buffer_kib: int = Field(
        default=1024,
        ge=64,
        le=1_048_576,
        description="RocksDB memtable size of each table partition (two at most).",
    )
    table_cache_mib: int = Field(
        default=64,
        ge=8,
        le=1_048_576,
        description="RocksDB block cache shared by every table partition of a worker: data, index"
        " and filter blocks, and the memtables' reservations (SLUICE_TABLE_WRITE_BUFFERS_MIB).",
    )
    table_write_buffers_mib: int = Field(
        default=32,
        ge=1,
        le=1_048_576,
        description="Memtable budget of all table partitions of a worker together, charged to the"
        " shared cache; past it RocksDB flushes sooner.",
    )
    table_max_open_files: int = Field(
        default=32, ge=16, le=100_000, description="Open SST files kept per table partition."
    )
    tool_max_attempts: int = Field(default=3, ge=1, le=20)
    tool_backoff_base_seconds: float = Field(default=0.2, ge=0)
    tool_backoff_max_seconds: float = Field(default=10.0, ge=0)

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

    @model_validator(mode="after")
    def _write_buffers_fit_the_cache(self) -> Settings:
        if self.table_write_buffers_mib >= self.table_cache_mib:
            raise ValueError(
                "SLUICE_TABLE_WRITE_BUFFERS_MIB must be less than SLUICE_TABLE_CACHE_MIB (the"
                " memtables are charged to the cache), got "
                f"{self.table_write_buffers_mib} and {self.table_cache_mib}"
            )
        return self

    @property
    def worker_dir(self) -> Path:
        return self.worker_data_dir or self.state_dir / "worker"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
