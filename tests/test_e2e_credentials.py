"""Whole-daemon scenario of missing credentials: nothing is lost or refused, the state is loud, a reload heals it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from forwarder.client import Client
from forwarder.fakeapi import FakeTurretIO
from forwarder.turretio import sign
from tests.conftest import API_KEY, API_SECRET
from tests.support.daemon import DaemonProcess
from tests.test_e2e_delivery import PRESIGNED, SECRET

WAIT = 30.0
WARNING = "No API credentials"


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, so that a reload never reads it half-written."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def test_without_credentials_signed_messages_wait_loudly_and_go_once_a_reload_gives_them(
        tmp_path: Path, fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    # The config refuses a credential file that is missing or empty, so the daemon starts without any and
    # the files are named later, in its TOML file, which a reload re-reads (no restart).
    config = tmp_path / "forwarder.toml"
    config.write_text("")
    daemon = make_daemon("--config", str(config), "--reload-interval", "1s", api=fake_api,
                         credentials=False).start()
    daemon.wait_for_log("Forwarder ready")
    with Client(str(daemon.socket)) as client:  # ingest keeps accepting: every message is acked
        waiting = {client.set(email, {"plan": "pro"}): email for email in ("bob@example.com", "carol@example.com")}
        presigned = client.send_presigned(json.dumps(PRESIGNED))

    # The sets were read before the pre-signed message, so by its delivery both sets had parked.
    (request,) = fake_api.wait_for_count(1, timeout=WAIT)
    assert (request.idempotency_key, request.path) == (presigned, PRESIGNED["url"])
    status = daemon.wait_for_status(lambda s: s["backlog"] == 2)
    assert (status["delivery_state"], status["credentials"]) == ("paused_no_credentials", "missing")
    daemon.wait_for_log(WARNING)
    assert len(_warnings(daemon)) == 1  # once for both users, not once per message

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "key").write_text(API_KEY + "\n")
    (secrets / "secret").write_text(API_SECRET + "\n")
    _write_atomically(config, f'api_key_file = "{secrets / "key"}"\napi_secret_file = "{secrets / "secret"}"\n')

    delivered = fake_api.wait_for_count(3, timeout=WAIT)
    signed = [r for r in delivered if r.idempotency_key in waiting]
    assert sorted(r.path for r in signed) == sorted(f"/latest/user/{email}" for email in waiting.values())
    for r in signed:
        assert r.signature_valid and r.json_text is not None
        assert r.headers["X-LS-Key"] == API_KEY
        assert r.headers["X-LS-Auth"] == sign(SECRET, r.path, r.json_text, r.headers["X-LS-Time"])
    status = daemon.wait_for_status(lambda s: s["backlog"] == 0)
    assert (status["delivery_state"], status["credentials"]) == ("running", "present")
    assert len(_warnings(daemon)) == 1
    assert API_SECRET not in daemon.log()  # the fixture's leak check sees only secrets given by environment
    assert daemon.stop() == 0  # the same process all along


def _warnings(daemon: DaemonProcess) -> list[dict[str, object]]:
    return [record for record in daemon.log_records() if str(record["msg"]).startswith(WARNING)]
