"""A real single-node Apache Kafka broker for development, tests and `sluice run`, without Docker.

The Apache Kafka distribution's scripts only put ``libs/*.jar`` on a classpath and call a main class,
so this module assembles the same classpath from Maven Central (the runtime dependency closure of
``org.apache.kafka:kafka_2.13``, fetched once with Maven into a cache folder) and runs
``kafka.tools.StorageTool`` and ``kafka.Kafka`` on the machine's Java 17. The broker runs in KRaft mode
as a combined broker+controller on loopback, with settings that fit one node.

One class owns the broker's life: :class:`LocalKafka` formats the storage once, writes the config,
starts the JVM, waits until the broker answers metadata requests, and stops it cleanly. Everything it
writes (data, config, logs, pid file) lives under one state folder that git ignores.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DEFAULT_KAFKA_VERSION = "4.1.1"
# log4j-slf4j-impl routes the broker's slf4j 1.x logging into log4j2, so logs go to our file, not stderr.
LOG4J_VERSION = "2.24.3"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.sluice</groupId>
  <artifactId>local-kafka</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{kafka_version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j_version}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = error
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {log_dir}/server.log
appender.file.filePattern = {log_dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class KafkaError(RuntimeError):
    """The local broker could not be fetched, formatted, started or stopped."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("SLUICE_CACHE_DIR", str(Path(base) / "sluice")))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch_jars(version: str = DEFAULT_KAFKA_VERSION, cache_dir: Path | None = None) -> Path:
    """Return the folder holding the broker's jars, fetching them with Maven the first time.

    The folder is filled under a temporary name and renamed when complete, so an interrupted
    fetch never leaves a half-filled classpath behind.
    """
    root = (cache_dir or default_cache_dir()) / f"kafka-{version}"
    libs = root / "libs"
    if (libs / ".complete").exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaError(
            "Maven (mvn) is needed once to fetch the Kafka jars from Maven Central, and it is not on "
            "PATH. Install it (Debian: apt-get install maven) or set KAFKA_BOOTSTRAP_SERVERS to use "
            "an existing broker."
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / "pom.xml").write_text(_POM.format(kafka_version=version, log4j_version=LOG4J_VERSION))
    staging = root / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(root / "pom.xml"),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={staging}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        raise KafkaError(
            f"Fetching Apache Kafka {version} jars with Maven failed (exit {result.returncode}).\n"
            f"Command: {' '.join(cmd)}\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
        )
    if not any(staging.glob(f"kafka_2.13-{version}.jar")):
        raise KafkaError(f"Maven finished but kafka_2.13-{version}.jar is not in {staging}.")
    (staging / ".complete").write_text(version)
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    return libs


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise KafkaError(
            "Java 17 or newer is needed to run the local Kafka broker and `java` is not on PATH. "
            "Install it (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME."
        )
    return java


async def wait_for_metadata(bootstrap: str, within: float = 60.0) -> None:
    """Return once the broker at ``bootstrap`` answers a metadata request, or raise KafkaError."""
    from app.admin import metadata_error

    # aiokafka logs every refused connection at ERROR; while we poll a starting broker that is noise.
    quiet = _Quiet("aiokafka")
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        last = await metadata_error(bootstrap, 5.0)  # any failure means "not yet"
        if last is None:
            quiet.restore()
            return
        await asyncio.sleep(0.3)
    quiet.restore()
    raise KafkaError(
        f"Kafka at {bootstrap} did not answer metadata requests in {within:.0f}s: {last}"
    )


def new_cluster_id(random_uuid: Callable[[], uuid.UUID] = uuid.uuid4) -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64, never starting with '-'.

    One id in 64 would otherwise start with '-', which kafka-storage's argument parser reads
    as an option ("argument --cluster-id/-t: expected one argument"). Kafka's own
    Uuid.randomUuid() draws again in that case; so does this.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(random_uuid().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class LocalKafka:
    """A single-node KRaft broker whose data, config and logs live in ``state_dir``."""

    state_dir: Path
    port: int = 0
    controller_port: int = 0
    version: str = DEFAULT_KAFKA_VERSION
    cache_dir: Path | None = None
    heap: str = "512m"
    _proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        if not self.port:
            self.port = free_port()
        if not self.controller_port:
            self.controller_port = free_port()

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "kafka.pid"

    def _write_config(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "log.retention.hours": "24",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        path = self.state_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.state_dir / "log4j2.properties").write_text(_LOG4J2.format(log_dir=self.log_dir))
        return path

    def _java_cmd(self, libs: Path, main: str, *args: str) -> list[str]:
        return [
            _java(),
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.state_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.log_dir}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def format_storage(self, libs: Path, config: Path) -> None:
        """Format the KRaft storage once; a formatted folder is kept across restarts."""
        if (self.data_dir / "meta.properties").exists():
            return
        cmd = self._java_cmd(
            libs,
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            new_cluster_id(),
            "--config",
            str(config),
        )
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            raise KafkaError(f"kafka-storage format failed: {result.stdout}{result.stderr}")

    def running_pid(self) -> int | None:
        """The pid of a broker started from this state folder that is still alive, if any."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def start(self, within: float = 90.0) -> None:
        """Start the broker and return once it answers metadata requests (or raise KafkaError)."""
        if self.running_pid() is not None:
            raise KafkaError(
                f"A broker started from {self.state_dir} is already running (pid file "
                f"{self.pid_file}). Stop it with `sluice kafka stop` first."
            )
        libs = fetch_jars(self.version, self.cache_dir)
        config = self._write_config()
        self.format_storage(libs, config)
        with (self.log_dir / "stdout.log").open("ab") as out:
            self._proc = subprocess.Popen(  # noqa: S603
                self._java_cmd(libs, "kafka.Kafka", str(config)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{self._proc.pid} {self.port} {self.controller_port}\n")
        # The wait runs on its own loop in a helper thread, so start() works from sync code and
        # from inside a running event loop alike.
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiter = pool.submit(asyncio.run, wait_for_metadata(self.bootstrap_servers, within))
            while not waiter.done():
                if self._proc.poll() is not None:
                    code = self._proc.returncode
                    self.stop()
                    raise KafkaError(
                        f"The Kafka broker exited with code {code} while starting. "
                        f"Last lines of its logs in {self.log_dir}:\n{self.log_tail()}"
                    )
                time.sleep(0.2)
            try:
                waiter.result()
            except KafkaError:
                self.stop()
                raise

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for name in ("server.log", "stdout.log"):
            path = self.log_dir / name
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker: SIGTERM for a clean shutdown, SIGKILL if it is still up after timeout."""
        pid = self._proc.pid if self._proc is not None else self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid, self._proc):
            time.sleep(0.1)
        if _alive(pid, self._proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait(timeout=10)
            self._proc = None
        self.pid_file.unlink(missing_ok=True)

    @classmethod
    def from_state_dir(cls, state_dir: Path, **kwargs: object) -> LocalKafka:
        """Re-attach to a broker started earlier from ``state_dir`` (for `sluice kafka stop`)."""
        pid_file = Path(state_dir) / "kafka.pid"
        try:
            _, port, controller_port = pid_file.read_text().split()[:3]
            return cls(state_dir, int(port), int(controller_port), **kwargs)  # type: ignore[arg-type]
        except (OSError, ValueError):
            return cls(state_dir, **kwargs)  # type: ignore[arg-type]


class _Quiet:
    """Raise a logger's level for a while, then put it back."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL)

    def restore(self) -> None:
        self._logger.setLevel(self._level)


def _alive(pid: int, proc: subprocess.Popen[bytes] | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
