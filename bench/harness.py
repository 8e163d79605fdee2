"""The bench harness: start and stop the real daemon, the local API and RabbitMQ, and summarise figures.

Every bench script runs the product as users do (``python -m forwarder serve`` in its own process, the
fake API in its own process), so no figure shares a GIL with the load generator. Figures are reduced the
same way everywhere: a per-round statistic, then the median over rounds with the min-max spread.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forwarder.client import Client, ForwarderUnavailable
from forwarder.fakeapi import DEMO_API_KEY, DEMO_API_SECRET

PYTHON = sys.executable
CREDENTIALS = {"TURRET_API_KEY": DEMO_API_KEY, "TURRET_API_SECRET": DEMO_API_SECRET}
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_START_TIMEOUT = 60.0


class BenchError(RuntimeError):
    """A bench step could not run (a process did not start, a broker is missing); the text says why."""


# -- figures ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method, on unsorted input."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True, slots=True)
class Spread:
    """The median of one figure over repeated rounds, with the smallest and largest round."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, rounds: Sequence[float]) -> Spread:
        return cls(statistics.median(rounds), min(rounds), max(rounds))

    def show(self, scale: float = 1.0, digits: int = 2) -> str:
        m, lo, hi = (round(v * scale, digits) for v in (self.median, self.low, self.high))
        return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def ms(spread: Spread, digits: int = 3) -> str:
    return spread.show(1000.0, digits)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, so a run's output pastes straight into ``bench/README.md``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """A few lines naming what the figures were measured on, and which forwarder code ran."""
    import forwarder
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    code = Path(forwarder.__file__).parent
    commit = code.parent / "COMMIT"
    return (f"Machine: {os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, SQLite {_sqlite_version()}\n"
            f"Code: {code}{f' (commit {commit.read_text().strip()})' if commit.exists() else ''}\n"
            f"Load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _sqlite_version() -> str:
    import sqlite3
    return sqlite3.sqlite_version


def filesystem_of(path: Path) -> str:
    """Device and filesystem type holding ``path`` (the longest matching mount point)."""
    real, best = str(path.resolve()), ("?", "?", "", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, fstype, options = line.split()[:4]
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[2]):
            best = (device, fstype, mount, options)
    return f"{best[0]} ({best[1]}, mounted on {best[2]}, {best[3]})"


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, all threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a process (``VmHWM`` for its peak so far)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    if match is None:
        raise BenchError(f"no {field} for pid {pid}")
    return int(match.group(1)) * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def workdir(prefix: str, parent: str | None) -> Iterator[Path]:
    """A scratch directory on the data disk, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"turret-bench-{prefix}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench script's parser: its docstring as help, and the scratch-directory flag every script has."""
    new = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    new.add_argument("--work-dir", help="parent of the scratch directories (default: the system temp dir)")
    return new


def add_rabbitmq_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-rabbitmq", action="store_true", help="measure ours alone")
    parser.add_argument("--install-rabbitmq", action="store_true",
                        help="apt-get install rabbitmq-server if it is missing")


def rabbitmq_skipped(args: argparse.Namespace) -> str | None:
    """Why RabbitMQ is left out of this run, or None when it is measured."""
    return "skipped (--no-rabbitmq)" if args.no_rabbitmq else rabbitmq_missing(args.install_rabbitmq)


# -- the daemon ------------------------------------------------------------------------------------------


class Daemon:
    """``python -m forwarder serve`` as a child process; ``start`` returns once it answers ping.

    By default it has credentials and an API that refuses connections: an outage, the moment a buffer is
    for. It delivers nothing and backs off, so the ingest benches measure ingest alone.
    """

    def __init__(self, work: Path, *, api_url: str = "https://127.0.0.1:9", ca_file: str | None = None,
                 credentials: bool = True, extra: Sequence[str] = ()) -> None:
        self.data_dir = work / "data"
        self.socket = work / "forwarder.sock"
        self.log = work / "forwarder.log"
        self.command = [PYTHON, "-m", "forwarder", "serve", "--data-dir", str(self.data_dir),
                        "--socket", str(self.socket), "--metrics-addr", "off", "--api-url", api_url,
                        "--log-format", "text", *(["--ca-file", ca_file] if ca_file else []), *extra]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TURRET_", "FORWARDER_"))}
        if credentials:
            self.env.update(CREDENTIALS)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("the daemon is not running")
        return self.proc.pid

    def start(self) -> Daemon:
        """Spawn the daemon and wait until it answers ping; ``start_seconds`` is that wait."""
        started = time.monotonic()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=log,
                                         cwd=self.data_dir.parent)
        deadline = started + _START_TIMEOUT
        while True:
            try:
                with Client(str(self.socket), timeout=5.0, connect_timeout=0.2) as client:
                    client.ping()
                break
            except ForwarderUnavailable:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"the daemon did not start:\n{self.log.read_text()[-3000:]}") from None
                time.sleep(0.002)
        self.start_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """SIGTERM (a clean stop that checkpoints the WAL), SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self) -> dict[str, Any]:
        with Client(str(self.socket), timeout=10.0) as client:
            return client.request({"op": "status"})


def draining_daemon(work: Path, template: Path, api: FakeApi, concurrency: int) -> Daemon:
    """A daemon (not yet started) on a fresh copy of the ``template`` backlog, draining to ``api``."""
    run_dir = work / f"run-{concurrency}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(template, run_dir / "data")
    api.clear()
    return Daemon(run_dir, api_url=api.url, ca_file=api.ca_file, extra=["--concurrency", str(concurrency)])


def set_line(n: int, padding: int = 0) -> bytes:
    """One ``set`` request line for user ``n``; ``padding`` adds an attribute to reach a target size."""
    attrs = f'"plan":"pro","n":"{n}"' + (f',"note":"{"x" * padding}"' if padding else "")
    return f'{{"op":"set","email":"user{n}@example.com","attributes":{{{attrs}}}}}\n'.encode()


def fill(socket_path: Path, count: int, padding: int = 0, window: int = 512, first: int = 0) -> float:
    """Store ``count`` messages through one pipelined connection; returns the seconds it took.

    Keeps at most ``window`` requests unanswered, so the daemon's per-connection backpressure never
    engages, and checks every reply is an ok.
    """
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        sent = answered = 0
        pending = b""
        while answered < count:
            burst = min(count - sent, window - (sent - answered))
            if burst > 0:
                sock.sendall(b"".join(set_line(first + n, padding) for n in range(sent, sent + burst)))
                sent += burst
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise BenchError("the daemon closed the connection while filling")
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line.startswith(b'{"ok": true'):
                    raise BenchError(f"fill refused: {line[:200]!r}")
            answered += len(lines)
    return time.monotonic() - started


# -- the local Turret.IO-compatible API ------------------------------------------------------------------


class FakeApi:
    """``forwarder fake-api`` in its own process, steered through its control server."""

    def __init__(self, work: Path) -> None:
        self.cert_dir = work / "certs"
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        self.log = work / "fake-api.log"
        self.proc: subprocess.Popen[str] | None = None
        self.url = self.control = self.ca_file = ""

    def __enter__(self) -> FakeApi:
        command = [PYTHON, "-m", "forwarder", "fake-api", "--port", "0", "--control", "127.0.0.1:0",
                   "--cert-dir", str(self.cert_dir)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TURRET_")}
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, cwd=self.cert_dir,
                                     stderr=open(self.log, "w"), text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"on (https://\S+), control on (http://\S+); pass --ca-file (\S+)", line)
        if match is None:
            self.__exit__()
            raise BenchError(f"fake-api did not start: {line!r} {self.log.read_text()[-2000:]}")
        self.url, self.control, self.ca_file = match.groups()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _post(self, path: str, body: bytes) -> None:
        request = urllib.request.Request(self.control + path, data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def set_delay(self, seconds: float) -> None:
        self._post("/delay", f'{{"seconds": {seconds}}}'.encode())

    def clear(self) -> None:
        self._post("/clear", b"")

    def received(self) -> list[dict[str, Any]]:
        import json
        with urllib.request.urlopen(self.control + "/received", timeout=60) as response:
            items: list[dict[str, Any]] = json.load(response)
        return items


# -- RabbitMQ --------------------------------------------------------------------------------------------

_RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
_RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")


def rabbitmq_missing(install: bool) -> str | None:
    """Why RabbitMQ cannot be run here (None if it can); with ``install``, apt-get it first."""
    try:
        import pika  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "pika is not installed (pip install pika)"
    if not _RABBITMQ_SERVER.exists() and install and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "rabbitmq-server"], check=False,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not _RABBITMQ_SERVER.exists():
        return "rabbitmq-server is not installed (apt-get install rabbitmq-server, or --install-rabbitmq)"
    return None


class RabbitMQ:
    """A throwaway RabbitMQ node bound to loopback only (AMQP, epmd and Erlang distribution alike).

    epmd runs in the foreground as our child so that stopping the bench leaves no daemon behind; the node
    keeps its data in ``work`` (same disk as the forwarder's outbox) and loads no plugins.
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._epmd_port, self._dist_port = free_port(), free_port()
        (work / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (work / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ, "HOME": str(work), "RABBITMQ_NODENAME": f"turret-bench-{os.getpid()}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
            "ERL_EPMD_ADDRESS": "127.0.0.1", "ERL_EPMD_PORT": str(self._epmd_port),
            "RABBITMQ_DIST_PORT": str(self._dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CONFIG_FILE": str(work / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(work / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(work / "mnesia"), "RABBITMQ_LOG_BASE": str(work / "log"),
            "RABBITMQ_PID_FILE": str(work / "rabbitmq.pid"),
        }
        self._epmd: subprocess.Popen[bytes] | None = None
        self._node: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RabbitMQ:
        epmd = shutil.which("epmd") or "epmd"
        self._epmd = subprocess.Popen([epmd, "-port", str(self._epmd_port), "-address", "127.0.0.1"],
                                      env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(self.work / "rabbitmq.out", "wb") as out:
            self._node = subprocess.Popen([str(_RABBITMQ_SERVER)], env=self.env, cwd=self.work, stdout=out,
                                          stderr=out)
        deadline = time.monotonic() + 120
        while not self._answers():
            if self._node.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                output = (self.work / "rabbitmq.out").read_text()
                raise BenchError(f"RabbitMQ did not start: {output[-2000:]}")
            time.sleep(0.2)
        return self

    def _answers(self) -> bool:
        import pika
        try:
            pika.BlockingConnection(self.parameters()).close()
        except pika.exceptions.AMQPConnectionError:
            return False
        return True

    def parameters(self) -> Any:
        import pika
        return pika.ConnectionParameters(host="127.0.0.1", port=self.port)

    def __exit__(self, *exc: object) -> None:
        if self._node is not None and self._node.poll() is None:
            subprocess.run([str(_RABBITMQCTL), "stop"], env=self.env, capture_output=True, timeout=60,
                           check=False)
            try:
                self._node.wait(60)
            except subprocess.TimeoutExpired:
                self._node.kill()
                self._node.wait()
        if self._epmd is not None and self._epmd.poll() is None:
            self._epmd.terminate()
            self._epmd.wait(10)

    @property
    def pid(self) -> int:
        """The Erlang VM (beam.smp), for CPU accounting: the start script execs into it."""
        pid_file = self.work / "rabbitmq.pid"
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        return int(text) if text.isdigit() else (self._node.pid if self._node else 0)
