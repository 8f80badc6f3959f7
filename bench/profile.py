"""py-spy on a worker, and what its samples say: CPU split by stage (the agent whose task ran), by
thread and by activity (decode, tables, sends, Faust, aiokafka, ...), plus the top functions."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.worker.registry import STAGES

# The agent coroutine each stage runs in (named by the stage registry, defined in
# app/worker/wiring.py); their frames sit on every stack sampled while that agent's task runs.
AGENT_FRAMES = {stage.agent: stage.name for stage in STAGES}

# What a sample was doing, judged from its innermost matching frame outward: (label, needles); a
# needle matches a frame whose text contains it. Earlier entries win over later ones.
IDLE = "idle: waiting in epoll"
ACTIVITIES: list[tuple[str, tuple[str, ...]]] = [
    ("logging", ("logging/__init__.py", "mode/utils/logging.py")),
    ("decode (orjson+pydantic)", ("decode (schemas/codec.py", "upcast (schemas/codec.py")),
    ("encode (pydantic dump+orjson)", ("encode (schemas/codec.py",)),
    ("tables: rocksdict get/set", ("faust/stores/rocksdb.py", "rocksdict")),
    ("tables: changelog + bookkeeping", ("faust/tables/",)),
    ("stage logic (agents/*)", ("agents/", "schemas/state.py")),
    ("send + wait for ack", ("FaustProducer.send (app/worker/wiring.py", "faust/topics.py")),
    ("faust stream/ack machinery", ("faust/streams.py", "faust/channels.py", "faust/agents/")),
    ("faust consumer/commit/conductor", ("faust/transport/",)),
    ("aiokafka fetch/parse", ("aiokafka/consumer/", "aiokafka/record/")),
    ("aiokafka produce", ("aiokafka/producer/",)),
    ("aiokafka client/conn", ("aiokafka/",)),
    ("web (aiohttp)", ("aiohttp/",)),
    ("event loop", ("asyncio/",)),
]
# uvloop runs in C: a sample inside it ends at the Python frame that entered the loop.
NATIVE_LOOP = ("execute_from_commandline (mode/worker.py", "_start_thread (mode/threads.py")


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy ``--format raw`` (collapsed stacks: ``frame;frame;... count``) -> (frames, count)."""
    stacks: list[tuple[list[str], int]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        stacks.append((stack.split(";"), n))
    return stacks


def frame_function(frame: str) -> str:
    """``process (app/worker/runner.py:178)`` -> ``process``."""
    return frame.split(" (", 1)[0].strip()


def frame_file(frame: str) -> str:
    """``process (app/worker/runner.py:178)`` -> ``app/worker/runner.py``."""
    inside = frame.partition(" (")[2].rstrip(")")
    return inside.rsplit(":", 1)[0] if ":" in inside else inside


def stage_of(frames: Sequence[str]) -> str:
    """The stage whose agent frame is on the stack. The agents are closures of the wiring, which
    py-spy names by their qualified name (``_register_agents.<locals>.take_in_exceptions``)."""
    for frame in frames:
        stage = AGENT_FRAMES.get(frame_function(frame).rpartition(".")[2])
        if stage is not None:
            return stage
    return "(outside the agents)"


def is_idle(frames: Sequence[str]) -> bool:
    """The event loop waiting for I/O: py-spy counts a thread in epoll_wait as active at times."""
    return bool(frames) and frame_function(frames[-1]) in ("EpollSelector.select", "select")


def thread_of(frames: Sequence[str]) -> str:
    """Faust runs the aiokafka consumer in its own thread (mode's ServiceThread) and event loop."""
    if any("mode/threads.py" in f for f in frames[:6]):
        return "consumer thread"
    return "main thread"


def activity_of(frames: Sequence[str]) -> str:
    if is_idle(frames):
        return IDLE
    if frames and any(n in frames[-1] for n in NATIVE_LOOP):
        return "event loop"
    for label, needles in ACTIVITIES:
        for frame in reversed(frames):
            if any(n in frame for n in needles):
                return label
    return "other"


def _short(frame: str) -> str:
    """Drop the site-packages prefix of a frame's file for readability."""
    for marker in ("site-packages/", "lib/python3."):
        if marker in frame:
            head, _, tail = frame.partition(" (")
            path = tail.split(marker, 1)[1]
            if marker.startswith("lib/"):
                path = path.split("/", 1)[1] if "/" in path else path
            return f"{head} ({path}"
    return frame


def attribute_profile(text: str, top: int = 25) -> dict[str, Any]:
    """Split py-spy samples by stage (the agent whose task was running), by thread and by activity,
    and list the functions with the most samples (self and inclusive). Samples of an idle event loop
    (in epoll) are counted apart and left out of every share."""
    stacks = [([_short(f) for f in frames], n) for frames, n in parse_collapsed(text)]
    idle = sum(n for frames, n in stacks if is_idle(frames))
    stacks = [(frames, n) for frames, n in stacks if not is_idle(frames)]
    total = sum(n for _, n in stacks)
    by_thread: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    by_activity: Counter[str] = Counter()
    by_stage_activity: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        python_frames = [f for f in frames if " (" in f]
        stage = stage_of(python_frames)
        activity = activity_of(python_frames)
        by_thread[thread_of(frames)] += n
        by_stage[stage] += n
        by_activity[activity] += n
        by_stage_activity[f"{stage} / {activity}"] += n
        if python_frames:
            self_time[python_frames[-1]] += n
        for f in set(python_frames):
            inclusive[f] += n

    def share(counter: Counter[str], limit: int | None = None) -> list[dict[str, Any]]:
        return [
            {"name": k, "samples": v, "pct": round(100 * v / total, 1) if total else 0.0}
            for k, v in counter.most_common(limit)
        ]

    return {
        "samples": total,
        "idle_samples": idle,
        "by_thread": share(by_thread),
        "by_stage": share(by_stage),
        "by_activity": share(by_activity),
        "by_stage_activity": share(by_stage_activity, top),
        "top_self": share(self_time, top),
        "top_inclusive": share(inclusive, top),
    }


@dataclass
class Profiler:
    """py-spy sampling the worker in a subprocess; :meth:`finish` stops it and attributes."""

    py_spy: str
    pid: int
    out: Path
    rate_hz: int = 100
    proc: subprocess.Popen[bytes] | None = None
    name: str = "worker"

    def start(self, max_seconds: float) -> Profiler:
        log = self.out.with_suffix(".log").open("ab")
        self.proc = subprocess.Popen(  # noqa: S603 - the py-spy binary the user pointed at
            [
                self.py_spy,
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                str(self.rate_hz),
                "--duration",
                str(int(max_seconds) + 1),
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(self.out),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return self

    def finish(self, cpu: dict[str, float]) -> dict[str, Any]:
        """The attributed profile; ``cpu`` is a :class:`CpuMeter` report holding the sampled
        process's CPU seconds (``<name>_cpu_s``)."""
        cpu_s = cpu.get(f"{self.name}_cpu_s")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.out.exists():
            log = self.out.with_suffix(".log")
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            return {"error": f"py-spy wrote no profile: {tail}"}
        data = attribute_profile(self.out.read_text(errors="replace"))
        data["raw_file"] = str(self.out)
        data["rate_hz"] = self.rate_hz
        data["sampled"] = {"process": self.name, "pid": self.pid}
        if cpu_s is not None:
            data["cpu_s"] = round(cpu_s, 2)
            data["cpu_by_stage"] = [
                {**item, "cpu_s": round(cpu_s * item["pct"] / 100, 2)} for item in data["by_stage"]
            ]
        return data
