"""The processes a bench run starts (broker, workers, API, relays, chain): started in their own
session with a log each, and every one stopped in reverse order on exit, Ctrl-C included."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent


def echo(message: str) -> None:
    """A progress line on stderr."""
    typer.echo(f"[bench {time.strftime('%H:%M:%S')}] {message}", err=True)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(timeout=10)
        return self.popen.returncode

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Processes:
    """Every child this run started, stopped in reverse order by :meth:`stop_all`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []

    def start(
        self, name: str, args: list[str], env: dict[str, str] | None = None, log: bool = True
    ) -> Proc:
        log_path = self.root / f"{name}.log" if log else None
        out = log_path.open("ab") if log_path else subprocess.DEVNULL
        try:
            popen = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                args,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
            )
        finally:
            if log_path is not None and not isinstance(out, int):
                out.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 30.0) -> int | None:
        code = proc.stop(timeout)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)
        return code

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout=20)


def wait_http(url: str, proc: Proc, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with {proc.popen.returncode} while starting:\n{proc.log_tail()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).is_success:
                return
        time.sleep(0.25)
    raise BenchError(f"{url} did not answer within {timeout:.0f}s:\n{proc.log_tail()}")


class BenchError(RuntimeError):
    """A phase could not run (a process died, a deadline passed)."""
