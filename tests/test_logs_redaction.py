"""No secret and no clear email address in the logs: ``logs.redact`` itself, then a whole daemon's log.

The daemon runs at debug level, so urllib3's request lines (which carry ``/latest/user/<email>``) are in
its log too, through the same formatter; traffic includes a 401, a 400 echoing the address, and an outage.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

import pytest

from forwarder.client import Client
from forwarder.fakeapi import FakeTurretIO, Respond
from forwarder.logs import email_ref, redact, register_secret
from tests.conftest import API_KEY, API_SECRET
from tests.support.daemon import DaemonProcess

EMAILS = ("alice@example.com", "Bob.Smith@Example.COM", "carol+vip@mail.example.co.uk",
          "d_e-f@sub.example.org")
ALICE = email_ref("alice@example.com")
FAST = ("--backoff-base", "50ms", "--backoff-cap", "200ms", "--auth-probe-interval", "100ms")
_ANYTHING_AT_ANYTHING = re.compile(r"[^\s\"'<>]+@[^\s\"'<>]+")


@pytest.mark.parametrize("email", EMAILS)
def test_redact_replaces_an_address_by_its_stable_reference(email: str) -> None:
    assert redact(f"Sent to {email}.") == f"Sent to {email_ref(email)}."
    assert redact(f"POST /latest/user/{email} HTTP/1.1") == f"POST /latest/user/{email_ref(email)} HTTP/1.1"
    assert redact(email.upper()) == redact(email.lower()) == email_ref(email)


def test_redact_decodes_a_percent_encoded_address_before_hashing_it() -> None:
    assert redact("/latest/user/alice%40example.com?x=1") == f"/latest/user/{ALICE}?x=1"


def test_redact_handles_addresses_inside_json_and_several_in_one_text() -> None:
    text = '{"error": "unknown user alice@example.com", "cc": ["carol+vip@mail.example.co.uk"]}'
    assert redact(text) == (f'{{"error": "unknown user {ALICE}", '
                            f'"cc": ["{email_ref("carol+vip@mail.example.co.uk")}"]}}')


def test_redact_masks_registered_secrets_whole_even_when_one_contains_another() -> None:
    register_secret("unit-secret")
    register_secret("unit-secret-but-longer")
    assert redact("a unit-secret-but-longer b unit-secret c") == "a *** b *** c"
    assert redact("X-LS-Key: unit-secret for alice@example.com") == f"X-LS-Key: *** for {ALICE}"


def test_redact_is_idempotent_and_leaves_plain_text_alone() -> None:
    text = "Upstream failing; 3 attempts to https://127.0.0.1:8443/latest/user/alice@example.com"
    assert redact(redact(text)) == redact(text)
    plain = "Listening on /run/forwarder.sock, mode 0o660"
    assert redact(plain) == plain


def test_a_full_run_with_401_400_and_an_outage_logs_no_secret_and_no_clear_email(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon("--log-level", "debug", *FAST, api=fake_api).start()
    fake_api.script(Respond(401, b"Unauthorized"),
                    Respond(400, f'{{"error": "bad attributes for {EMAILS[2]}"}}'.encode()))
    with Client(str(daemon.socket)) as client:
        for email in EMAILS:
            client.set(email, {"plan": "pro"})
    status = daemon.wait_for_status(lambda s: s["backlog"] == 0 and s["dead_letters"] == 1)
    assert status["delivery_state"] == "running"

    fake_api.set_mode("refuse")
    with Client(str(daemon.socket)) as client:
        for email in EMAILS:
            client.set(email, {"plan": "max"})
    daemon.wait_for_status(lambda s: s["delivery_state"] == "backing_off")
    fake_api.set_mode("up")
    daemon.wait_for_status(lambda s: s["backlog"] == 0)
    assert daemon.stop() == 0

    log = daemon.log()
    for secret in (API_SECRET, base64.b64decode(API_SECRET).decode(), API_KEY):
        assert secret not in log
    assert _ANYTHING_AT_ANYTHING.findall(log) == []
    for email in EMAILS:
        assert email_ref(email) in log  # the addresses were there to leak: debug logs every request line
    messages = [r["msg"] for r in daemon.log_records()]
    # One line per condition, however many attempts failed meanwhile.
    assert [m for m in messages if m.startswith(("The API refused", "Upstream failing"))] == [
        "The API refused our credentials; pausing signed deliveries (nothing is dropped)",
        "Upstream failing; backing off the endpoint (messages are kept)"]
