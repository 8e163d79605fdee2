"""``DaemonProcess``: the real ``turret-forwarder serve`` as a child process, ready when it answers ping."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

READY_TIMEOUT = 20.0
_ANYTHING_AT_ANYTHING = re.compile(r"[^\s\"'<>]+@[^\s\"'<>]+")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ping(socket_path: Path, timeout: float = 1.0) -> bool:
    """True if a daemon answers ``{"op":"ping"}`` on ``socket_path`` right now."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(socket_path))
            s.sendall(b'{"op":"ping"}\n')
            return s.makefile("rb").readline().startswith(b'{"ok": true')
    except OSError:
        return False


class DaemonProcess:
    """One ``serve`` process with its own data dir, socket, metrics port and log file."""

    def __init__(self, data_dir: Path, socket_path: Path, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, metrics: bool = True) -> None:
        self.data_dir = data_dir
        self.socket = socket_path
        self.args = list(args)
        self.env = dict(env or {})
        self.metrics_port = free_port() if metrics else None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def command(self) -> list[str]:
        metrics = f"127.0.0.1:{self.metrics_port}" if self.metrics_port else "off"
        return [sys.executable, "-m", "forwarder", "serve", "--data-dir", str(self.data_dir),
                "--socket", str(self.socket), "--metrics-addr", metrics, *self.args]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FORWARDER_", "TURRET_"))}
        env.update(self.env)
        return env

    def start(self, wait: bool = True) -> DaemonProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its life
        self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=log, stderr=log)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ping(self.socket):
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon not ready after {READY_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.02)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def leaks(self) -> list[str]:
        """What the log shows that it never may: the API key or secret (raw or decoded), a clear email.

        Emails are exempt only for a daemon started with ``--log-emails``, the operator's explicit choice.
        """
        log = self.log()
        found = [f"secret {name}" for name, value in self._secrets() if value in log]
        if "--log-emails" not in self.args:
            found += _ANYTHING_AT_ANYTHING.findall(log)
        return found

    def _secrets(self) -> list[tuple[str, str]]:
        secrets = [(name, self.env[name]) for name in ("TURRET_API_KEY", "TURRET_API_SECRET") if self.env.get(name)]
        if secret := self.env.get("TURRET_API_SECRET"):
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):  # not base64: only the raw form
                secrets.append(("TURRET_API_SECRET (decoded)", base64.b64decode(secret, validate=True).decode()))
        return [(name, value) for name, value in secrets if len(value) >= 4]

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        """Wait until the log contains ``text`` (the daemon's own report of an event)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run another ``turret-forwarder`` command against this daemon's data dir and socket."""
        cmd = [sys.executable, "-m", "forwarder", *args, "--data-dir", str(self.data_dir), "--socket", str(self.socket)]
        return subprocess.run(cmd, env=self.environment(), input=input, capture_output=True, text=True, timeout=60)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def wait_for_status(self, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Poll ``status --json`` until ``predicate(status)`` holds (the daemon's own commit is the event)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"status never matched; last {status}\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
