"""Whole-daemon reload scenarios: rotated Kubernetes secrets, edited TOML, SIGHUP, bad files, fixed ones."""

from __future__ import annotations

import base64
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forwarder.client import Client
from forwarder.errors import ConfigError, MessageTooLarge
from forwarder.fakeapi import FakeTurretIO, Respond
from tests.conftest import API_KEY, API_SECRET
from tests.support.daemon import DaemonProcess
from tests.test_reload import publish_kubernetes_secret

WAIT = 20.0
LONG = "x" * 3000  # an attribute making a request line between 2 KiB and 8 KiB


def _reloads(daemon: DaemonProcess, result: str) -> float:
    with urllib.request.urlopen(f"{daemon.metrics_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "forwarder_config_reloads_total" and sample.labels == {"result": result}:
                return sample.value
    raise AssertionError(f"no forwarder_config_reloads_total{{result={result!r}}} in /metrics")


def _wait_for_reloads(daemon: DaemonProcess, result: str, count: int) -> None:
    """Wait until the daemon has counted ``count`` reloads with ``result`` (its own report of the event)."""
    deadline = time.monotonic() + WAIT
    while _reloads(daemon, result) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} {result} reloads within {WAIT}s:\n{daemon.log()[-3000:]}")
        time.sleep(0.05)
    assert _reloads(daemon, result) == count


def _records(daemon: DaemonProcess, msg: str) -> list[dict[str, object]]:
    return [record for record in daemon.log_records() if record["msg"].startswith(msg)]


def _send(daemon: DaemonProcess, email: str = "ada@example.com", note: str = "short") -> str:
    with Client(str(daemon.socket)) as client:
        return client.set(email, {"note": note})


def _start(make_daemon: Callable[..., DaemonProcess], *args: str, **kwargs: object) -> DaemonProcess:
    """Start a daemon and wait until its watcher has taken the files' baseline (logged as ready)."""
    daemon = make_daemon(*args, **kwargs).start()
    daemon.wait_for_log("Forwarder ready")
    return daemon


def _secret_files_env(secrets: Path) -> dict[str, str]:
    return {"TURRET_API_KEY_FILE": str(secrets / "key"), "TURRET_API_SECRET_FILE": str(secrets / "secret")}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_kubernetes_secret_swaps_rotate_the_credentials_of_the_next_request(
        tmp_path: Path, fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    secrets = tmp_path / "secrets"
    publish_kubernetes_secret(secrets, {"key": API_KEY, "secret": API_SECRET})
    daemon = _start(make_daemon, "--reload-interval", "1h", api=fake_api, credentials=False,
                    env=_secret_files_env(secrets))
    _send(daemon)
    assert fake_api.wait_for_count(1, timeout=WAIT)[0].headers["X-LS-Key"] == API_KEY
    for n in (1, 2, 3):
        key, secret = f"rotated-key-{n}", _b64(f"rotated-secret-{n}")
        fake_api.set_credentials(key, secret)
        publish_kubernetes_secret(secrets, {"key": key, "secret": secret})
        _wait_for_reloads(daemon, "applied", n)
        fake_api.clear()
        _send(daemon)
        (request,) = fake_api.wait_for_count(1, timeout=WAIT, delivered=False)
        assert (request.headers["X-LS-Key"], request.status) == (key, 200)
    assert [(r["reason"], r["settings"]) for r in _records(daemon, "Reloaded settings")] == [
        ("file", ["api_key", "api_secret"])] * 3


def test_an_in_place_edit_of_the_config_file_applies(
        tmp_path: Path, make_daemon: Callable[..., DaemonProcess]) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text('max_message_bytes = "8KiB"\n')
    daemon = _start(make_daemon, "--config", str(config), "--reload-interval", "1s")
    _send(daemon, note=LONG)
    config.write_text('max_message_bytes = "2KiB"\n')
    _wait_for_reloads(daemon, "applied", 1)
    with pytest.raises(MessageTooLarge):
        _send(daemon, note=LONG)
    _send(daemon)
    assert [(r["reason"], r["settings"]) for r in _records(daemon, "Reloaded settings")] == [
        ("file", ["max_message_bytes"])]


def test_sighup_applies_an_edit_the_watcher_cannot_see(
        tmp_path: Path, make_daemon: Callable[..., DaemonProcess]) -> None:
    # The config path is a symlink into a directory the watcher does not watch, and the periodic check
    # is an hour away: only SIGHUP can apply this edit.
    (tmp_path / "conf").mkdir()
    (tmp_path / "elsewhere").mkdir()
    target, config = tmp_path / "elsewhere" / "forwarder.toml", tmp_path / "conf" / "forwarder.toml"
    target.write_text('max_message_bytes = "8KiB"\n')
    config.symlink_to(target)
    daemon = _start(make_daemon, "--config", str(config), "--reload-interval", "1h")
    target.write_text('max_message_bytes = "2KiB"\n')
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    _wait_for_reloads(daemon, "applied", 1)
    with pytest.raises(MessageTooLarge):
        _send(daemon, note=LONG)
    assert [(r["reason"], r["settings"]) for r in _records(daemon, "Reloaded settings")] == [
        ("SIGHUP", ["max_message_bytes"])]


def test_invalid_content_keeps_the_last_good_settings_and_says_so_once(
        tmp_path: Path, fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text('max_message_bytes = "8KiB"\n')
    daemon = _start(make_daemon, "--config", str(config), api=fake_api)
    config.write_text('max_message_bytes = "2KiB"\n[half-writ')  # a half-written save
    _wait_for_reloads(daemon, "invalid", 1)
    config.write_text('max_message_bytes = "4KiB"\n[half-writ')  # other bytes, the same error
    _wait_for_reloads(daemon, "invalid", 2)
    _send(daemon, note=LONG)  # 8 KiB still applies
    (request,) = fake_api.wait_for_count(1, timeout=WAIT)
    assert request.signature_valid
    [failed] = _records(daemon, "Reload failed; keeping the last good settings")
    assert failed["error"] == str(ConfigError("config", f"config {config}", "not valid TOML: Expected ']' at "
                                              "the end of a table declaration (at end of document)"))
    config.write_text('max_message_bytes = "2KiB"\n')
    _wait_for_reloads(daemon, "applied", 1)
    with pytest.raises(MessageTooLarge):
        _send(daemon, note=LONG)


def test_a_fixed_setting_reports_it_needs_a_restart_and_keeps_its_value(
        tmp_path: Path, make_daemon: Callable[..., DaemonProcess]) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text('socket_mode = "0660"\nmax_message_bytes = "8KiB"\n')
    daemon = _start(make_daemon, "--config", str(config))
    config.write_text('socket_mode = "0600"\nmax_message_bytes = "2KiB"\n')
    _wait_for_reloads(daemon, "applied", 1)
    assert _reloads(daemon, "needs_restart") == 1
    [warning] = _records(daemon, "Some changed settings apply only after a restart")
    assert warning["settings"] == ["socket_mode"]
    assert daemon.socket.stat().st_mode & 0o777 == 0o660
    with pytest.raises(MessageTooLarge):  # the reloadable change in the same save did apply
        _send(daemon, note=LONG)


def test_a_reloaded_retry_after_cap_bounds_the_next_429(
        tmp_path: Path, fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text('retry_after_cap = "1h"\n')
    daemon = _start(make_daemon, "--config", str(config), api=fake_api)
    config.write_text('retry_after_cap = "1s"\n')
    _wait_for_reloads(daemon, "applied", 1)
    fake_api.script(Respond(429, b"slow down", {"Retry-After": "3600"}))
    sent = _send(daemon)
    # Under the old cap the retry would come an hour later: that it comes at all shows the new cap holds.
    first, retry = fake_api.wait_for_count(2, timeout=WAIT, delivered=False)
    assert (first.status, retry.status, retry.idempotency_key) == (429, 200, sent)


def test_new_credentials_lift_a_credentials_pause_at_once(
        tmp_path: Path, fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    secrets = tmp_path / "secrets"
    publish_kubernetes_secret(secrets, {"key": "revoked-key", "secret": _b64("revoked-secret")})
    daemon = _start(make_daemon, "--auth-probe-interval", "1h", "--reload-interval", "1h", api=fake_api,
                    credentials=False, env=_secret_files_env(secrets))
    sent = {_send(daemon, email=f"user{n}@example.com") for n in range(5)}
    daemon.wait_for_log("The API refused our credentials")
    publish_kubernetes_secret(secrets, {"key": API_KEY, "secret": API_SECRET})
    delivered = fake_api.wait_for_count(5, timeout=WAIT)
    assert {r.idempotency_key for r in delivered} == sent
    assert {r.headers["X-LS-Key"] for r in delivered} == {API_KEY}
    daemon.wait_for_status(lambda status: status["backlog"] == 0 and status["delivery_state"] == "running")
