"""Tests of the ``turret-forwarder`` command as users run it: a child process, its exit status and output.

``serve`` itself is exercised by every daemon test; here: bad settings, ``send``, ``status``, ``health``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from forwarder import __version__
from forwarder.admin import _cell
from tests.support.daemon import DaemonProcess
from tests.test_ingest import stored_records

STATUS_KEYS = {"backlog", "bytes", "credentials", "daemon", "dead_letters", "delivery_state",
               "oldest_age_seconds"}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forwarder", *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("args", "environ", "setting"), [
    (["--max-message-bytes", "abc"], {}, "max_message_bytes"),
    ([], {"FORWARDER_SOCKET_MODE": "999"}, "socket_mode"),
    (["--idle-timeout", "soon"], {}, "idle_timeout"),
    (["--socket-group", "no-such-group-here"], {}, "socket_group"),
    (["--metrics-addr", "localhost"], {}, "metrics_addr"),
])
def test_bad_setting_exits_2_with_one_line_naming_it(tmp_path: Path, short_dir: Path, args: list[str],
                                                      environ: dict[str, str], setting: str) -> None:
    result = _run("serve", "--data-dir", str(tmp_path / "data"), "--socket", str(short_dir / "s"), *args,
                  env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", **environ})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"turret-forwarder: bad setting: {setting} (")
    assert not (tmp_path / "data").exists()  # refused before touching anything


def test_version() -> None:
    result = _run("--version")
    assert (result.returncode, result.stdout) == (0, f"turret-forwarder {__version__}\n")


def test_send_prints_the_id_of_the_stored_message(daemon: DaemonProcess) -> None:
    result = daemon.cli("send", "--email", "alice+cli@example.com", "--attr", "plan=pro",
                        "--attr", "seats=a=b", "--prop", "source=cli")
    assert (result.returncode, result.stdout, result.stderr) == (0, '{"ok": true, "id": "1"}\n', "")
    assert stored_records(daemon.data_dir) == [(1, {"email": "alice+cli@example.com",
                                                    "attributes": {"plan": "pro", "seats": "a=b"},
                                                    "properties": {"source": "cli"}})]


def test_send_with_a_key_twice_stores_once(daemon: DaemonProcess) -> None:
    outputs = [daemon.cli("send", "--email", "alice@example.com", "--attr", "plan=pro", "--key", "k").stdout
               for _ in range(2)]
    assert outputs == ['{"ok": true, "id": "1"}\n'] * 2
    assert daemon.status()["backlog"] == 1


def test_send_refused_message_exits_1_with_the_reason(daemon: DaemonProcess) -> None:
    result = daemon.cli("send", "--email", "not an email", "--attr", "plan=pro")
    assert result.returncode == 1
    assert result.stderr.startswith("turret-forwarder: email is malformed")
    assert len(result.stderr.splitlines()) == 1


def test_send_attribute_without_a_value_exits_2(daemon: DaemonProcess) -> None:
    result = daemon.cli("send", "--email", "alice@example.com", "--attr", "plan")
    assert result.returncode == 2
    assert result.stderr == (
        "turret-forwarder: bad setting: --attr (command line): expected KEY=VALUE, got 'plan'\n")


def test_send_reads_json_lines_from_stdin_and_prints_a_reply_each(daemon: DaemonProcess) -> None:
    lines = ['{"op":"set","email":"alice@example.com","attributes":{"plan":"pro"}}',
             "",
             '{"op":"post","path":"/latest/target/vip","body":{}}',
             '{"op":"ping"}']
    result = daemon.cli("send", input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"ok": True, "id": "1"}, {"ok": True, "id": "2"}, {"ok": True}]
    assert daemon.status()["backlog"] == 2


def test_send_from_stdin_reports_each_bad_line_and_exits_1(daemon: DaemonProcess) -> None:
    lines = ['{"op":"set","email":"alice@example.com"}', "{not json", '{"op":"set","email":"bad"}',
             '{"op":"set","email":"bob@example.com"}']
    result = daemon.cli("send", input="\n".join(lines) + "\n")
    assert result.returncode == 1
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(reply["ok"], reply.get("id"), reply.get("error")) for reply in replies] == [
        (True, "1", None), (False, None, "invalid"), (False, None, "invalid"), (True, "2", None)]
    assert replies[1]["detail"].startswith("line 2: ")
    assert replies[2]["detail"].startswith("line 3: email is malformed")


def test_send_without_a_daemon_exits_1_with_one_line(daemon: DaemonProcess) -> None:
    assert daemon.stop() == 0
    result = daemon.cli("send", "--email", "alice@example.com", "--attr", "plan=pro")
    assert result.returncode == 1
    assert result.stderr == f"turret-forwarder: cannot connect to the forwarder at {daemon.socket}: " \
                            f"[Errno 2] No such file or directory\n"


def test_status_of_a_running_daemon(daemon: DaemonProcess) -> None:
    assert daemon.cli("send", "--email", "alice@example.com", "--attr", "plan=pro").returncode == 0
    status = daemon.status()
    assert set(status) == STATUS_KEYS
    assert (status["backlog"], status["dead_letters"], status["daemon"]) == (1, 0, "running")
    assert status["bytes"] > 0
    assert status["oldest_age_seconds"] >= 0


def test_status_with_only_the_data_dir_finds_a_daemon_whose_socket_is_elsewhere(daemon: DaemonProcess) -> None:
    result = _run("status", "--json", "--data-dir", str(daemon.data_dir), env=daemon.environment())
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert (status["daemon"], status["delivery_state"], status["credentials"]) == ("running", "running", "present")


def test_status_of_a_stopped_daemon_reads_the_outbox(daemon: DaemonProcess) -> None:
    assert daemon.cli("send", "--email", "alice@example.com", "--attr", "plan=pro").returncode == 0
    running = daemon.status()
    assert daemon.stop() == 0
    stopped = daemon.status()
    assert (stopped["backlog"], stopped["bytes"], stopped["dead_letters"]) == (
        running["backlog"], running["bytes"], 0)
    assert (stopped["daemon"], stopped["delivery_state"], stopped["credentials"]) == ("stopped", None, None)


def test_status_text_shows_one_figure_a_line(daemon: DaemonProcess) -> None:
    result = daemon.cli("status")
    assert result.returncode == 0
    pairs = (line.split(": ", 1) for line in result.stdout.splitlines())
    figures = {name.strip(): value for name, value in pairs}
    assert set(figures) == STATUS_KEYS
    assert (figures["backlog"], figures["daemon"]) == ("0", "running")


def test_status_without_an_outbox_exits_1_with_one_line(tmp_path: Path, short_dir: Path) -> None:
    result = _run("status", "--data-dir", str(tmp_path / "never"), "--socket", str(short_dir / "s"))
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "has serve ever run with --data-dir" in result.stderr


def test_health_is_ok_while_the_daemon_answers(daemon: DaemonProcess) -> None:
    result = daemon.cli("health")
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


def test_health_fails_with_the_reason_when_the_daemon_is_down(daemon: DaemonProcess) -> None:
    assert daemon.stop() == 0
    result = daemon.cli("health")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"unhealthy: cannot connect to the forwarder at {daemon.socket}")


def test_fake_api_takes_its_own_options_and_help(tmp_path: Path) -> None:
    result = _run("fake-api", "--help")
    assert result.returncode == 0 and "--port" in result.stdout and "--control" in result.stdout
    with subprocess.Popen([sys.executable, "-m", "forwarder", "fake-api", "--port", "0", "--control",
                           "127.0.0.1:0", "--cert-dir", str(tmp_path)], stdout=subprocess.PIPE, text=True) as api:
        assert api.stdout is not None
        first = api.stdout.readline()
        api.terminate()
    assert first.startswith("Fake Turret.IO API on https://127.0.0.1:") and str(tmp_path / "ca.pem") in first


def test_an_unknown_option_is_refused_naming_it() -> None:
    result = _run("status", "--bogus")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "turret-forwarder: error: unrecognized arguments: --bogus"


@pytest.mark.parametrize(("row", "shown"), [
    ({"next_attempt": None, "held": False}, "-"),  # never tried
    ({"next_attempt": 990.0, "held": False}, "due"),  # its own wait is over: not "now", the endpoint may wait
    ({"next_attempt": 1090.0, "held": False}, "in 1.5m"),
    ({"next_attempt": 990.0, "held": True}, "-"),  # held: not tried until released
])
def test_queue_lists_next_try_says_when_a_message_may_go(row: dict[str, object], shown: str) -> None:
    assert _cell(row, "next_try", now=1000.0) == shown
