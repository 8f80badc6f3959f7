"""What every phase of a run is given: the options of the command and the run's context (broker,
app id, topic prefix, processes, workers and their ports and folders, the event maker)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import Proc, Processes
from bench.profile import Profiler
from bench.system import CpuMeter
from bench.workload import EventMaker


@dataclass
class Options:
    events: int
    latency_events: int
    rate: float | None
    partitions: int
    skip_api: bool
    skip_raw: bool
    memory: bool
    checkpoints: list[int]
    tools: str
    raw_mode: str
    warmup: int
    timeout: float
    output_dir: Path
    py_spy: str | None
    profile_throughput: bool
    api_single: int
    api_batched: int
    api_batch_size: int
    api_concurrency: int
    api_batch_concurrency: int
    keep: bool
    worker_log_level: str = "warning"
    worker_command: str | None = None
    workers: int = 1
    skip_chain: bool = False
    approvals: bool = False
    approvals_held: int = 200
    approvals_checkpoints: list[int] = field(default_factory=lambda: [1_000, 1_000_000])
    approvals_requests: int = 50
    stamp: str = ""

    @property
    def tools_label(self) -> str:
        return "noop" if self.tools == "noop" else "webhook -> loopback HTTP sink"

    def as_config(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "latency_events": self.latency_events,
            "rate": self.rate,
            "partitions": self.partitions,
            "tools": self.tools_label,
            "raw_mode": self.raw_mode,
            "chain": not self.skip_chain,
            "warmup": self.warmup,
            "timeout_s": self.timeout,
            "memory_checkpoints": self.checkpoints if self.memory else None,
            "approvals": (
                {
                    "held": self.approvals_held,
                    "checkpoints": self.approvals_checkpoints,
                    "requests": self.approvals_requests,
                }
                if self.approvals
                else None
            ),
            "py_spy": self.py_spy,
            "api_single": self.api_single,
            "api_batched": self.api_batched,
            "api_batch_size": self.api_batch_size,
            "api_concurrency": self.api_concurrency,
            "api_batch_concurrency": self.api_batch_concurrency,
            "worker_log_level": self.worker_log_level,
            "worker_command": self.worker_command or "python -m app.cli worker",
            "workers": self.workers,
        }


@dataclass
class BenchContext:
    bootstrap: str
    partitions: int
    root: Path
    procs: Processes
    maker: EventMaker
    broker: Any = None
    app_id: str = ""
    prefix: str = ""
    tools_url: str | None = None
    workers: list[Proc] = field(default_factory=list)
    worker_ports: list[int] = field(default_factory=list)
    worker_count: int = 1
    log_level: str = "warning"
    worker_command: list[str] | None = None

    def broker_pid(self) -> dict[str, int]:
        proc = getattr(self.broker, "_proc", None)
        return {"broker": proc.pid} if proc is not None else {}

    def worker_dir(self, index: int = 1) -> Path:
        """Worker ``index``'s table folder: ``worker-data`` (worker 1), then ``worker-data-<n>``."""
        return self.root / ("worker-data" if index == 1 else f"worker-data-{index}")

    @property
    def worker_dirs(self) -> list[Path]:
        return [self.worker_dir(i) for i in range(1, self.worker_count + 1)]

    def worker_env(self, index: int, port: int) -> dict[str, str]:
        """Worker ``index``'s environment: the shared app id and topics, its own port and folder."""
        return self.env(
            SLUICE_WORKER_WEB_PORT=str(port), SLUICE_WORKER_DATA_DIR=str(self.worker_dir(index))
        )

    def worker_meter(self, broker: bool = True) -> CpuMeter:
        """A CPU meter of every worker (and the broker), their sum reported as ``workers``."""
        pids = {proc.name: proc.pid for proc in self.workers}
        extra = self.broker_pid() if broker else {}
        return CpuMeter(pids | extra, sums={"workers": tuple(pids)})

    def profiler(self, py_spy: str, out: Path) -> Profiler:
        """py-spy on worker 1 only (sampling every worker would take the CPU it measures)."""
        first = self.workers[0]
        return Profiler(py_spy, first.pid, out, name=first.name)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "SLUICE_APP_ID": self.app_id,
            "SLUICE_TOPIC_PREFIX": self.prefix,
            "SLUICE_PARTITIONS": str(self.partitions),
            "SLUICE_CONFIG_DIR": str(self.root / "config"),
            "SLUICE_STATE_DIR": str(self.root / "state"),
            "SLUICE_LOG_LEVEL": self.log_level,
            **extra,
        }
