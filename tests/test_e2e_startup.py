"""Whole-daemon start-up: settings found bad only when used, what a failed start leaves, the demo's environment.

A port already taken, a data dir that is a file, a socket whose directory cannot be made: each is a bad
setting like any other, so ``serve`` prints one line naming it and exits 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.config import load_config
from forwarder.daemon import Daemon
from forwarder.errors import ConfigError
from forwarder.store import Outbox
from tests.support.daemon import free_port


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another socket listens on for the whole test."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forwarder", "serve", *args], capture_output=True, text=True,
                          env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)


def _assert_one_line_naming(result: subprocess.CompletedProcess[str], setting: str, flag: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"turret-forwarder: bad setting: {setting} ({flag}): "), lines[0]
    return lines[0]


def test_a_metrics_port_already_taken_exits_2_naming_metrics_addr(tmp_path: Path, short_dir: Path,
                                                                   taken_port: int) -> None:
    sock = short_dir / "s"
    result = _serve(tmp_path, "--data-dir", str(tmp_path / "data"), "--socket", str(sock),
                    "--metrics-addr", f"127.0.0.1:{taken_port}")
    line = _assert_one_line_naming(result, "metrics_addr", "--metrics-addr")
    assert f"127.0.0.1:{taken_port}" in line and "in use" in line
    assert not sock.exists()  # the port is tried before the socket is made


@pytest.mark.parametrize(("data_dir", "reason"), [
    ("taken", "exists and is not a directory"),  # a regular file
    ("taken/data", "a parent is not a directory"),  # under a regular file: cannot be created
    ("taken/deeper/data", "a parent is not a directory"),
])
def test_a_data_dir_that_cannot_be_a_directory_exits_2_naming_data_dir(
        tmp_path: Path, short_dir: Path, data_dir: str, reason: str) -> None:
    (tmp_path / "taken").write_text("a regular file\n")
    result = _serve(tmp_path, "--data-dir", str(tmp_path / data_dir), "--socket", str(short_dir / "s"),
                    "--metrics-addr", "off")
    line = _assert_one_line_naming(result, "data_dir", "--data-dir")
    assert str(tmp_path / data_dir) in line and reason in line
    assert (tmp_path / "taken").read_text() == "a regular file\n"
    assert not (short_dir / "s").exists()


@pytest.mark.parametrize("socket_name", ["taken/s", "taken/deeper/s"])
def test_a_socket_whose_directory_cannot_be_made_exits_2_naming_socket(tmp_path: Path, short_dir: Path,
                                                                        socket_name: str) -> None:
    (short_dir / "taken").write_text("a regular file\n")
    data_dir = tmp_path / "data"
    result = _serve(tmp_path, "--data-dir", str(data_dir), "--socket", str(short_dir / socket_name),
                    "--metrics-addr", "off")
    line = _assert_one_line_naming(result, "socket", "--socket")
    assert str(short_dir / socket_name) in line and "a parent is not a directory" in line
    Outbox(data_dir).close()  # the data dir is intact and free for the next start


def test_a_setting_from_the_environment_is_named_with_its_source(tmp_path: Path, short_dir: Path,
                                                                 taken_port: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "serve", "--data-dir", str(tmp_path / "data"),
         "--socket", str(short_dir / "s")], capture_output=True, text=True, timeout=60,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "FORWARDER_METRICS_ADDR": f"127.0.0.1:{taken_port}"})
    _assert_one_line_naming(result, "metrics_addr", "env FORWARDER_METRICS_ADDR")


def _start(flags: dict[str, str]) -> None:
    config = load_config(flags, {})
    asyncio.run(Daemon(config, flags, {}).run())


def test_a_start_failing_at_the_metrics_port_releases_the_lock_and_makes_no_socket(
        tmp_path: Path, short_dir: Path, taken_port: int) -> None:
    flags = {"data_dir": str(tmp_path / "data"), "socket": str(short_dir / "s"),
             "metrics_addr": f"127.0.0.1:{taken_port}"}
    with pytest.raises(ConfigError) as raised:
        _start(flags)
    assert (raised.value.setting, raised.value.source) == ("metrics_addr", "--metrics-addr")
    assert not (short_dir / "s").exists()
    Outbox(tmp_path / "data").close()  # in this same process: the lock was released, not just dropped at exit


def test_a_start_failing_at_the_socket_closes_the_metrics_port_and_releases_the_lock(
        tmp_path: Path, short_dir: Path) -> None:
    (short_dir / "taken").write_text("")
    port = free_port()
    flags = {"data_dir": str(tmp_path / "data"), "socket": str(short_dir / "taken" / "s"),
             "metrics_addr": f"127.0.0.1:{port}"}
    with pytest.raises(ConfigError) as raised:
        _start(flags)
    assert raised.value.setting == "socket"
    Outbox(tmp_path / "data").close()
    with socket.socket() as again:  # the metrics listener was closed
        again.bind(("127.0.0.1", port))


def test_demo_ignores_the_users_own_forwarder_and_turret_variables(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_text("not a secret, not TOML [\n")
    env = {**os.environ, "TURRET_API_KEY": "someone-elses-key", "TURRET_API_SECRET_FILE": str(junk),
           "FORWARDER_CONFIG": str(junk), "FORWARDER_METRICS_ADDR": "not an address"}
    result = subprocess.run([sys.executable, "-m", "forwarder", "demo"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Demo passed" in result.stdout
