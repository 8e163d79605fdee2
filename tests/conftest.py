"""Fixtures, aiosmtpd-style: a data dir, a real daemon process, a client, a local HTTPS Turret.IO."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from forwarder.client import Client
from forwarder.fakeapi import FakeTurretIO
from tests.support.daemon import DaemonProcess

API_KEY = "demo-key"
API_SECRET = "ZGVtby1zZWNyZXQtYnl0ZXM="  # base64 of b"demo-secret-bytes", the shared doc's vector


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for sockets (sun_path is 108 bytes; pytest's tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="tf-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def socket_path(short_dir: Path) -> Path:
    return short_dir / "fwd.sock"


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[FakeTurretIO]:
    (tmp_path / "certs").mkdir()
    api = FakeTurretIO(api_key=API_KEY, api_secret_b64=API_SECRET, cert_dir=str(tmp_path / "certs"))
    api.start()
    yield api
    api.stop()


@pytest.fixture
def make_daemon(data_dir: Path, socket_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Build (not start) daemons on the test's data dir; every one is killed at the end."""
    made: list[DaemonProcess] = []

    def make(*args: str, env: dict[str, str] | None = None, api: FakeTurretIO | None = None,
             credentials: bool = True) -> DaemonProcess:
        env = dict(env or {})
        extra = list(args)
        if api is not None:
            extra += ["--api-url", api.url, "--ca-file", str(api.ca_file)]
        if credentials:
            env.setdefault("TURRET_API_KEY", API_KEY)
            env.setdefault("TURRET_API_SECRET", API_SECRET)
        daemon = DaemonProcess(data_dir, socket_path, extra, env)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.__exit__()
    # Every daemon of the suite, not one chosen scenario: no log may show a secret or a clear email.
    leaks = {str(daemon.log_path): found for daemon in made if (found := daemon.leaks())}
    assert not leaks, f"logs show what they must not: {leaks}"


@pytest.fixture
def daemon(make_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A running daemon with no reachable API (messages stay queued)."""
    return make_daemon("--api-url", "https://127.0.0.1:9").start()


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(str(daemon.socket)) as c:
        yield c


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()
