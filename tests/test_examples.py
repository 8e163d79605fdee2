"""The examples users copy: each one runs against a real daemon and its messages are stored.

Python (the client), the shell (``turret-forwarder send``) and raw sockets from Node.js and PHP. A missing
interpreter is a skip outside CI and a failure under CI (``.ci/run`` installs Debian's ``php-cli``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import unavailable
from tests.support.daemon import DaemonProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(daemon: DaemonProcess, *command: str) -> subprocess.CompletedProcess[str]:
    env = {**daemon.environment(), "FORWARDER_SOCKET": str(daemon.socket),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def _interpreter(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found: install Debian's {package} package to run this example")
    assert path is not None
    return path


def test_python_client_example_stores_a_set_and_a_post(daemon: DaemonProcess) -> None:
    result = _run(daemon, sys.executable, str(EXAMPLES / "python_client.py"))
    assert (result.returncode, result.stdout) == (0, "stored as message 1\n"), result.stderr
    assert daemon.status()["backlog"] == 2


def test_shell_example_sends_with_the_cli(daemon: DaemonProcess) -> None:
    result = _run(daemon, "sh", str(EXAMPLES / "send.sh"))
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert replies == [{"ok": True, "id": str(n)} for n in (1, 2, 3)]
    assert daemon.status()["backlog"] == 3


@pytest.mark.parametrize(("interpreter", "package", "script"),
                         [("node", "nodejs", "node/send.js"), ("php", "php-cli", "php/send.php")])
def test_raw_socket_example_gets_an_ack(daemon: DaemonProcess, interpreter: str, package: str,
                                        script: str) -> None:
    result = _run(daemon, _interpreter(interpreter, package), str(EXAMPLES / script))
    assert (result.returncode, json.loads(result.stdout)) == (0, {"ok": True, "id": "1"}), result.stderr
    assert daemon.status()["backlog"] == 1
