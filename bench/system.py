"""What the machine and the bench's processes use and are: CPU seconds and memory from /proc, a CPU
meter over a phase (that also tells what other processes took on a shared machine), the host and
the commit measured."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_proc_stat(text: str, clk_tck: int = CLK_TCK) -> tuple[float, float]:
    """(utime, stime) in seconds from the text of ``/proc/<pid>/stat``.

    The second field (the command) is in parentheses and may itself hold spaces and parentheses, so
    the fields are counted from the last ')': after it come state (field 3), ..., utime (14), stime (15).
    """
    rest = text[text.rindex(")") + 1 :].split()
    return int(rest[11]) / clk_tck, int(rest[12]) / clk_tck


def parse_proc_status(text: str, key: str = "VmRSS") -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmRSS, VmHWM, ...) in bytes, None if absent."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            parts = value.split()
            factor = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            return int(parts[0]) * factor
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, None if it is gone."""
    try:
        utime, stime = parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None
    return utime + stime


def parse_proc_stat_total(text: str, clk_tck: int = CLK_TCK) -> float:
    """Busy CPU seconds of the whole machine (all cores) from the ``cpu`` line of ``/proc/stat``:
    user + nice + system + irq + softirq + steal (idle and iowait left out)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            f = [int(x) for x in line.split()[1:]]
            user, nice, system, _idle, _iowait, irq, softirq = f[:7]
            steal = f[7] if len(f) > 7 else 0
            return (user + nice + system + irq + softirq + steal) / clk_tck
    raise ValueError("no aggregate cpu line in /proc/stat")


def machine_cpu_seconds() -> float | None:
    try:
        return parse_proc_stat_total(Path("/proc/stat").read_text())
    except (OSError, ValueError):
        return None


def memory_of(pid: int) -> dict[str, int | None]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {"rss_bytes": None, "hwm_bytes": None}
    return {"rss_bytes": parse_proc_status(text, "VmRSS"), "hwm_bytes": parse_proc_status(text)}


def sum_memory(per_process: Sequence[dict[str, Any]]) -> dict[str, int | None]:
    """RSS and peak RSS (VmHWM) added up over processes; None where one process's figure is missing.
    The HWM sum adds each process's own peak: an upper bound of the peak of the sum."""
    return {
        key: _sum_known([m.get(key) for m in per_process]) for key in ("rss_bytes", "hwm_bytes")
    }


def _sum_known(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known and len(known) == len(values) else None


def code_version(cwd: Path | None = None) -> dict[str, Any]:
    """The commit the bench ran and whether the tree had uncommitted changes (None outside git)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(  # noqa: S603 - fixed git arguments
                ["git", *args],  # noqa: S607 - git from PATH
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def host_info(
    cpuinfo: str | None = None, meminfo: str | None = None, nproc: int | None = None
) -> dict[str, Any]:
    """nproc, the CPU model name and total memory, from /proc (or the texts given, for tests)."""
    if cpuinfo is None:
        cpuinfo = _read("/proc/cpuinfo")
    if meminfo is None:
        meminfo = _read("/proc/meminfo")
    model = next(
        (
            line.partition(":")[2].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    if nproc is None:
        nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "nproc": nproc,
        "cpu_model": model,
        "mem_total_bytes": parse_proc_status(meminfo, "MemTotal"),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


@dataclass
class CpuMeter:
    """CPU seconds of a set of pids (and of this process) between start() and stop(); ``sums``
    names groups of them (``{"workers": ("worker", "worker-2")}``) also reported as one figure."""

    pids: dict[str, int]
    sums: dict[str, tuple[str, ...]] = field(default_factory=dict)
    wall: float = 0.0
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    def _sample(self) -> dict[str, float]:
        out = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        out["client"] = cpu_seconds(os.getpid())
        out["machine"] = machine_cpu_seconds()
        return {k: v for k, v in out.items() if v is not None}

    def start(self) -> CpuMeter:
        self.before = self._sample()
        self.wall = time.perf_counter()
        return self

    def stop(self) -> dict[str, float]:
        self.after = self._sample()
        self.wall = time.perf_counter() - self.wall
        return self.report()

    def report(self) -> dict[str, float]:
        """CPU seconds and % of one core per process; ``machine`` is every core's busy time and
        ``others`` what processes this run did not start used meanwhile (a shared machine)."""
        out: dict[str, float] = {"wall_s": round(self.wall, 3)}
        used: dict[str, float] = {}
        for name, end in self.after.items():
            if name in self.before:
                used[name] = end - self.before[name]
        if "machine" in used:
            used["others"] = max(
                0.0, used["machine"] - sum(v for k, v in used.items() if k != "machine")
            )
        for group, members in self.sums.items():  # after ``others``: a group counts no CPU twice
            if any(m in used for m in members):
                used[group] = sum(used[m] for m in members if m in used)
        for name, secs in used.items():
            out[f"{name}_cpu_s"] = round(secs, 2)
            out[f"{name}_cpu_pct"] = round(100 * secs / self.wall, 1) if self.wall else 0.0
        return out
