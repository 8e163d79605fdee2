"""Whole-daemon dead letters: what becomes one (rejected, expired), and the ``dead`` commands on them.

A real ``serve`` process against the local Turret.IO-compatible HTTPS server; the ``dead`` commands run as
the operator runs them, beside a running daemon (through its admin socket) and with none running.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from forwarder.client import Client
from forwarder.fakeapi import FakeTurretIO, Respond
from forwarder.logs import email_ref
from tests.conftest import API_SECRET
from tests.support.daemon import DaemonProcess

FAST_BACKOFF = ("--backoff-base", "100ms", "--backoff-cap", "1s")
REJECTION = b'{"error": "attribute plan is not allowed"}'


def _send(daemon: DaemonProcess, *emails: str) -> list[str]:
    with Client(str(daemon.socket)) as client:
        return [client.set(email, {"n": str(n)}) for n, email in enumerate(emails)]


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def _dead_list(daemon: DaemonProcess) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(_ok(daemon.cli("dead", "list", "--json")))
    return rows


def _dead_show(daemon: DaemonProcess, message_id: str, *flags: str) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(_ok(daemon.cli("dead", "show", message_id, *flags)))
    return row


# -- what becomes a dead letter ---------------------------------------------------------------------------

@pytest.mark.parametrize("status", [400, 413])
def test_a_rejected_message_is_dead_lettered_and_the_other_users_flow_on(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess], status: int) -> None:
    fake_api.script(Respond(status, REJECTION, {"Content-Type": "application/json"}))
    # One request at a time, in id order, so the scripted rejection is A's first message's answer.
    daemon = make_daemon(*FAST_BACKOFF, "--concurrency", "1", api=fake_api).start()
    a1, b, c, a2 = _send(daemon, "a@example.com", "b@example.com", "c@example.com", "a@example.com")
    received = fake_api.wait_for(lambda received: len(received) == 4, timeout=30)
    # Nothing retried and nothing backed off: B, C and A's next message go straight after the rejection.
    assert [(r.idempotency_key, r.status) for r in received] == [(a1, status), (b, 200), (c, 200), (a2, 200)]
    report = daemon.wait_for_status(lambda s: s["backlog"] == 0)
    assert report["dead_letters"] == 1
    assert not any(r["msg"].startswith("Upstream failing") for r in daemon.log_records())
    assert [(r["level"], r.get("id"), r.get("reason"), r.get("status")) for r in daemon.log_records()
            if r["msg"].startswith("Message moved to the dead letters")] == [
        ("warning", int(a1), f"http {status}", status)]

    shown = _dead_show(daemon, a1, "--show-emails")
    assert (shown["id"], shown["reason"], shown["status"], shown["attempts"]) == (int(a1), f"http {status}",
                                                                                 status, 1)
    assert shown["response"] == REJECTION.decode()
    assert shown["first_attempt"] == shown["last_attempt"] is not None
    assert shown["record"] == {"kind": "set", "email": "a@example.com", "attributes": {"n": "0"},
                               "properties": {}}
    assert _ok(daemon.cli("dead", "purge", "--all", "--yes")) == "dead purge: 1 message(s)\n"
    assert daemon.status()["dead_letters"] == 0


def test_a_user_whose_head_backs_off_holds_its_later_messages_while_the_others_flow(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.script(Respond(408, b"request timeout"))  # a retry of that one message, not of the endpoint
    daemon = make_daemon(*FAST_BACKOFF, "--concurrency", "1", api=fake_api).start()
    a1, b, c, a2 = _send(daemon, "a@example.com", "b@example.com", "c@example.com", "a@example.com")
    received = fake_api.wait_for(lambda received: len(received) == 5, timeout=30)
    assert [(r.idempotency_key, r.status) for r in received] == [
        (a1, 408), (b, 200), (c, 200), (a1, 200), (a2, 200)]
    assert daemon.wait_for_status(lambda s: s["backlog"] == 0)["dead_letters"] == 0


def test_max_attempts_dead_letters_a_message_after_that_many_failures(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.script(*[Respond(500, b"oops")] * 2)
    daemon = make_daemon(*FAST_BACKOFF, "--max-attempts", "2", api=fake_api).start()
    (doomed,) = _send(daemon, "doomed@example.com")
    report = daemon.wait_for_status(lambda s: s["dead_letters"] == 1)
    assert report["backlog"] == 0
    (row,) = _dead_list(daemon)
    assert (str(row["id"]), row["reason"], row["attempts"]) == (doomed, "max_attempts", 2)
    assert [r.status for r in fake_api.wait_for_count(2, timeout=30, delivered=False)] == [500, 500]
    (after,) = _send(daemon, "fine@example.com")  # the endpoint is fine again: the next one goes through
    assert fake_api.wait_for_count(1, timeout=30)[0].idempotency_key == after


def test_a_message_older_than_max_age_is_dead_lettered_as_expired_and_never_sent(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_mode("refuse")
    daemon = make_daemon(*FAST_BACKOFF, "--max-age", "2s", api=fake_api).start()
    (message_id,) = _send(daemon, "late@example.com")
    report = daemon.wait_for_status(lambda s: s["dead_letters"] == 1)
    assert report["backlog"] == 0
    (row,) = _dead_list(daemon)
    assert (row["id"], row["reason"], row["status"]) == (int(message_id), "expired", None)
    assert row["response"] == ""
    assert row["attempts"] >= 1  # the refused attempts before it expired; expiry itself is not one
    fake_api.set_mode("up")
    # Back in the outbox with a fresh enqueue time, it is delivered like any message: the first request
    # the API ever answered.
    assert _ok(daemon.cli("dead", "retry", message_id)) == "dead_retry: 1 message(s)\n"
    (request,) = fake_api.wait_for_count(1, timeout=30)
    assert request.idempotency_key == message_id
    assert [r.status for r in fake_api.received()] == [200]
    report = daemon.wait_for_status(lambda s: s["backlog"] == 0)
    assert report["dead_letters"] == 0


def test_a_message_that_expires_while_credentials_are_refused_is_dead_lettered_not_sent_as_a_probe(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_credentials("rotated-key", API_SECRET)  # our key is refused with 401 from now on
    # The next credentials probe comes 3 s after the refusal, when the message is over its 2 s max age.
    daemon = make_daemon(*FAST_BACKOFF, "--max-age", "2s", "--auth-probe-interval", "3s",
                         api=fake_api).start()
    (message_id,) = _send(daemon, "paused@example.com")
    report = daemon.wait_for_status(lambda s: s["dead_letters"] == 1)
    assert (report["backlog"], report["delivery_state"]) == (0, "paused_auth")
    (row,) = _dead_list(daemon)
    assert (row["id"], row["reason"], row["attempts"]) == (int(message_id), "expired", 0)
    assert [(r.idempotency_key, r.status) for r in fake_api.received()] == [(message_id, 401)]


# -- the dead commands ------------------------------------------------------------------------------------

def _three_dead_letters(fake_api: FakeTurretIO, daemon: DaemonProcess) -> list[str]:
    fake_api.script(*[Respond(422, REJECTION)] * 3)
    ids = _send(daemon, "x@example.com", "y@example.com", "z@example.com")
    daemon.wait_for_status(lambda s: s["dead_letters"] == 3)
    return ids


def test_dead_list_show_retry_and_purge_beside_a_running_daemon(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(*FAST_BACKOFF, api=fake_api).start()
    ids = _three_dead_letters(fake_api, daemon)
    rows = _dead_list(daemon)
    assert [row["id"] for row in rows] == sorted(int(i) for i in ids)
    assert {(row["reason"], row["status"], row["response"], row["attempts"]) for row in rows} == {
        ("http 422", 422, REJECTION.decode(), 1)}
    assert {row["user"] for row in rows} == {email_ref(e) for e in ("x@example.com", "y@example.com",
                                                                     "z@example.com")}
    table = _ok(daemon.cli("dead", "list"))
    assert table.splitlines()[0].split() == ["ID", "USER", "AGE", "REASON", "STATUS", "ATTEMPTS", "RESPONSE"]
    assert "@example.com" not in table
    first, second, third = sorted(ids, key=int)
    assert _dead_show(daemon, first)["record"]["email"] == email_ref("x@example.com")

    assert _ok(daemon.cli("dead", "retry", first)) == "dead_retry: 1 message(s)\n"
    (request,) = fake_api.wait_for_count(1, timeout=30)
    assert request.idempotency_key == first
    daemon.wait_for_status(lambda s: (s["backlog"], s["dead_letters"]) == (0, 2))

    refused = daemon.cli("dead", "purge", second)  # stdin is not a terminal: it must be confirmed with --yes
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert _ok(daemon.cli("dead", "purge", second, "--yes")) == "dead purge: 1 message(s)\n"
    assert [row["id"] for row in _dead_list(daemon)] == [int(third)]
    assert _ok(daemon.cli("dead", "purge", "--older-than", "1h", "--yes")) == "dead purge: 0 message(s)\n"
    assert _ok(daemon.cli("dead", "purge", "--older-than", "0s", "--yes")) == "dead purge: 1 message(s)\n"
    assert _dead_list(daemon) == []
    missing = daemon.cli("dead", "show", third)
    assert missing.returncode == 1 and f"no dead letter with id {third}" in missing.stderr
    assert daemon.status()["dead_letters"] == 0
    assert [r.idempotency_key for r in fake_api.delivered()] == [first]


def test_dead_retry_all_with_the_daemon_stopped_is_delivered_at_the_next_start(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(*FAST_BACKOFF, api=fake_api).start()
    ids = _three_dead_letters(fake_api, daemon)
    assert daemon.stop() == 0
    assert _ok(daemon.cli("dead", "retry", "--all")) == "dead_retry: 3 message(s)\n"
    report = daemon.status()
    assert (report["daemon"], report["backlog"], report["dead_letters"]) == ("stopped", 3, 0)

    daemon.start()
    delivered = fake_api.wait_for_count(3, timeout=30)
    assert sorted(r.idempotency_key or "" for r in delivered) == sorted(ids)
    daemon.wait_for_status(lambda s: (s["backlog"], s["dead_letters"]) == (0, 0))
