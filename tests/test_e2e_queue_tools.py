"""Queue tools against a real data dir: while the daemon runs (admin socket) and while it is stopped.

``list`` and ``show`` read the database read-only; ``hold``, ``release``, ``purge`` and ``compact`` go
through the running daemon's writer, or take the data dir's lock when none runs.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forwarder.client import Client
from forwarder.fakeapi import FakeTurretIO
from forwarder.logs import email_ref
from forwarder.store import schema
from tests.support.daemon import DaemonProcess

LIST_FIELDS = {"id", "kind", "user", "enqueued_at", "attempts", "last_attempt", "last_error", "next_attempt",
               "held", "bytes"}
NO_RETRY_SOON = ("--backoff-base", "10m", "--backoff-cap", "1h")  # after one failure, only flush retries
EMAILS = ("ann@example.com", "bob@example.com", "cid@example.com", "dee@example.com")


def _ok(daemon: DaemonProcess, *args: str) -> str:
    result = daemon.cli(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _rows(daemon: DaemonProcess, *flags: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(_ok(daemon, "queue", "list", "--json", *flags))
    return rows


def _held(daemon: DaemonProcess) -> dict[str, bool]:
    return {str(row["id"]): row["held"] for row in _rows(daemon)}


def _send_all(daemon: DaemonProcess) -> list[str]:
    with Client(str(daemon.socket)) as client:
        return [client.set(email, {"plan": "pro"}) for email in EMAILS]


def test_listing_masks_emails_unless_asked_and_has_stable_fields(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_mode("refuse")
    daemon = make_daemon(*NO_RETRY_SOON, api=fake_api).start()
    ids = _send_all(daemon)
    daemon.wait_for_status(lambda s: s["delivery_state"] == "backing_off")

    rows = _rows(daemon)
    assert [set(row) for row in rows] == [LIST_FIELDS] * 4
    assert [(str(r["id"]), r["kind"], r["user"], r["held"]) for r in rows] == [
        (i, "set", email_ref(email), False) for i, email in zip(ids, EMAILS, strict=True)]
    assert [r["user"] for r in _rows(daemon, "--show-emails")] == list(EMAILS)
    assert [str(r["id"]) for r in _rows(daemon, "--limit", "2")] == ids[:2]

    text = _ok(daemon, "queue", "list")
    assert text.splitlines()[0].split() == ["ID", "USER", "AGE", "ATTEMPTS", "NEXT_TRY", "HELD", "LAST_ERROR"]
    assert len(text.splitlines()) == 5
    assert "@" not in text

    shown = json.loads(_ok(daemon, "queue", "show", ids[1]))
    assert (shown["user"], shown["record"]["email"]) == (email_ref(EMAILS[1]), email_ref(EMAILS[1]))
    assert json.loads(_ok(daemon, "queue", "show", ids[1], "--show-emails"))["record"] == {
        "kind": "set", "email": EMAILS[1], "attributes": {"plan": "pro"}, "properties": {}}
    missing = daemon.cli("queue", "show", "999")
    assert (missing.returncode, missing.stderr) == (1, "turret-forwarder: no queued message with id 999\n")


def test_hold_purge_flush_release_check_and_compact_while_the_daemon_runs(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_mode("refuse")
    daemon = make_daemon(*NO_RETRY_SOON, api=fake_api).start()
    ids = _send_all(daemon)
    daemon.wait_for_status(lambda s: s["delivery_state"] == "backing_off")

    assert _ok(daemon, "queue", "hold", ids[1]) == "hold: 1 message(s)\n"
    assert _held(daemon) == {ids[0]: False, ids[1]: True, ids[2]: False, ids[3]: False}
    unconfirmed = daemon.cli("queue", "purge", ids[2], input="")
    assert unconfirmed.returncode == 1
    assert "pass --yes to confirm" in unconfirmed.stderr
    assert _ok(daemon, "queue", "purge", ids[2], "--yes") == "purge: 1 message(s)\n"
    assert list(_held(daemon)) == [ids[0], ids[1], ids[3]]

    fake_api.set_mode("up")
    assert _ok(daemon, "flush") == "flush: the daemon retries everything now\n"
    fake_api.wait_for_count(2, timeout=30)
    daemon.wait_for_status(lambda s: s["backlog"] == 1)
    assert {r.idempotency_key for r in fake_api.delivered()} == {ids[0], ids[3]}

    assert _ok(daemon, "check") == "ok: integrity check passed\n"
    assert _ok(daemon, "compact") == "compact: done\n"
    assert _held(daemon) == {ids[1]: True}

    assert _ok(daemon, "queue", "release", "--all") == "release: 1 message(s)\n"
    daemon.wait_for_status(lambda s: s["backlog"] == 0)
    assert sorted(r.idempotency_key or "" for r in fake_api.delivered()) == sorted([ids[0], ids[1], ids[3]])
    assert daemon.stop() == 0


def test_queue_tools_work_on_the_data_dir_of_a_stopped_daemon(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_mode("refuse")
    daemon = make_daemon(*NO_RETRY_SOON, api=fake_api).start()
    ids = _send_all(daemon)
    assert daemon.stop() == 0

    assert [r["user"] for r in _rows(daemon)] == [email_ref(email) for email in EMAILS]
    assert _ok(daemon, "queue", "hold", "--all") == "hold: 4 message(s)\n"
    assert _ok(daemon, "queue", "release", ids[0]) == "release: 1 message(s)\n"
    assert _ok(daemon, "queue", "purge", ids[3], "--yes") == "purge: 1 message(s)\n"
    assert _held(daemon) == {ids[0]: False, ids[1]: True, ids[2]: True}
    flush = daemon.cli("flush")
    assert (flush.returncode, flush.stderr) == (
        1, "turret-forwarder: no daemon is running; the next start delivers everything at once\n")
    assert _ok(daemon, "compact") == "compact: done\n"
    assert _ok(daemon, "check") == "ok: integrity check passed\n"

    fake_api.set_mode("up")
    daemon.start()
    (delivered,) = fake_api.wait_for_count(1, timeout=30)
    assert delivered.idempotency_key == ids[0]
    daemon.wait_for_status(lambda s: s["backlog"] == 2)
    assert _held(daemon) == {ids[1]: True, ids[2]: True}
    assert daemon.stop() == 0


def _corrupt_the_key_index(db: Path) -> None:
    """Change one key inside the idempotency-key index's page only: the table and its index disagree."""
    conn = sqlite3.connect(db)
    try:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                               ("sqlite_autoindex_idempotency_keys_1",)).fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    data = bytearray(db.read_bytes())
    at = data.index(b"key-2", (root - 1) * page_size, root * page_size)
    data[at:at + 5] = b"kez-2"
    db.write_bytes(bytes(data))


def test_check_reports_the_problems_of_a_damaged_file_and_exits_1(daemon: DaemonProcess) -> None:
    with Client(str(daemon.socket)) as client:
        for n in range(5):
            client.set(EMAILS[n % len(EMAILS)], {"n": str(n)}, key=f"key-{n}")
    assert _ok(daemon, "check") == "ok: integrity check passed\n"
    assert daemon.stop() == 0
    _corrupt_the_key_index(daemon.data_dir / schema.DB_FILE)

    result = daemon.cli("check")
    assert result.returncode == 1, result.stderr
    problems = result.stdout.splitlines()
    assert "row 3 missing from index sqlite_autoindex_idempotency_keys_1" in problems  # the changed key's row
    assert all(line.endswith("missing from index sqlite_autoindex_idempotency_keys_1") for line in problems)


@pytest.mark.parametrize("choice", [["7"], ["--all"]])
def test_dead_purge_takes_one_of_an_id_all_or_older_than(daemon: DaemonProcess, choice: list[str]) -> None:
    both = daemon.cli("dead", "purge", *choice, "--older-than", "1d", "--yes")
    assert both.returncode == 2
    assert "argument --older-than: not allowed with argument" in both.stderr
    neither = daemon.cli("dead", "purge", "--yes")
    assert neither.returncode == 2
    assert "one of the arguments id --all --older-than is required" in neither.stderr
