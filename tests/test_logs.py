"""Tests of forwarder.logs: line formats, email and secret redaction, the repeat limiter."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from forwarder.logs import RateLimitedLog, email_ref, register_secret, setup_logging

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
ALICE_REF = "<email:" + hashlib.sha256(b"alice@example.com").hexdigest()[:8] + ">"
logger = logging.getLogger("forwarder.test")


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[None]:
    """Give each test the root logger as it found it, since setup_logging configures the root."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    for line in lines:
        assert TS.fullmatch(line.pop("ts"))
    return lines


def _setup(fmt: str = "json", level: str = "info", log_emails: bool = False) -> io.StringIO:
    stream = io.StringIO()
    setup_logging(fmt, level, log_emails, stream)
    return stream


def test_json_line_has_message_and_fields() -> None:
    stream = _setup()
    logger.info("Delivery paused for %s", "auth", extra={"fields": {"reason": "auth", "attempts": 3}})
    assert _json_lines(stream) == [
        {"level": "info", "logger": "forwarder.test", "msg": "Delivery paused for auth", "reason": "auth",
         "attempts": 3},
    ]


def test_text_line_is_one_line_with_quoted_values() -> None:
    stream = _setup("text")
    fields = {"reason": "auth", "attempts": 3, "note": "two words", "empty": "", "held": True}
    logger.warning("Delivery paused", extra={"fields": fields})
    [line] = stream.getvalue().splitlines()
    ts, rest = line.split(" ", 1)
    assert TS.fullmatch(ts)
    assert rest == ('warning forwarder.test Delivery paused'
                    ' reason=auth attempts=3 note="two words" empty="" held=true')


def test_text_message_stays_on_one_line() -> None:
    stream = _setup("text")
    logger.info("First\nsecond")
    [line] = stream.getvalue().splitlines()
    assert line.endswith(" info forwarder.test First\\nsecond")


def test_field_named_like_the_line_keys_is_renamed() -> None:
    stream = _setup()
    logger.info("Renamed", extra={"fields": {"msg": "mine", "level": 1}})
    assert _json_lines(stream) == [
        {"level": "info", "logger": "forwarder.test", "msg": "Renamed", "field.msg": "mine",
         "field.level": 1},
    ]


def test_level_filters_and_setup_replaces_its_handler() -> None:
    first = _setup(level="warning")
    logger.info("Not shown")
    second = _setup(level="debug")
    logger.debug("Shown once")
    assert first.getvalue() == ""
    assert [line["msg"] for line in _json_lines(second)] == ["Shown once"]


def test_unknown_format_or_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml' or level 'info'"):
        setup_logging("xml", "info", False, io.StringIO())


def test_email_ref_is_short_stable_and_case_blind() -> None:
    assert email_ref("Alice@Example.com") == email_ref("alice@example.com") == ALICE_REF


def test_emails_are_redacted_in_message_fields_and_paths() -> None:
    stream = _setup()
    fields = {"email": "alice@example.com", "path": "/latest/user/alice%40example.com",
              "to": ["ALICE@example.com"]}
    logger.info("Sent to Alice@Example.com", extra={"fields": fields})
    assert _json_lines(stream) == [
        {"level": "info", "logger": "forwarder.test", "msg": f"Sent to {ALICE_REF}", "email": ALICE_REF,
         "path": f"/latest/user/{ALICE_REF}", "to": [ALICE_REF]},
    ]


def test_log_emails_shows_addresses_in_clear() -> None:
    stream = _setup(log_emails=True)
    logger.info("Sent to alice@example.com", extra={"fields": {"email": "alice@example.com"}})
    [line] = _json_lines(stream)
    assert (line["msg"], line["email"]) == ("Sent to alice@example.com", "alice@example.com")


def test_registered_secret_is_masked_everywhere() -> None:
    register_secret("s3cr3t-test-value")
    register_secret("")
    stream = _setup(log_emails=True)
    logger.info("Key s3cr3t-test-value used", extra={"fields": {"header": "X-LS-Key: s3cr3t-test-value"}})
    [line] = _json_lines(stream)
    assert (line["msg"], line["header"]) == ("Key *** used", "X-LS-Key: ***")


def test_exception_text_is_redacted() -> None:
    register_secret("exc-secret-value")
    stream = _setup()
    try:
        raise ValueError("bad alice@example.com with exc-secret-value")
    except ValueError:
        logger.exception("Send failed")
    [line] = _json_lines(stream)
    assert line["msg"] == "Send failed"
    assert line["exc"].startswith("Traceback (most recent call last):\n")
    assert line["exc"].endswith(f"ValueError: bad {ALICE_REF} with ***")
    assert "alice@example.com" not in stream.getvalue() and "exc-secret-value" not in stream.getvalue()


def test_text_format_keeps_the_exception_on_one_line() -> None:
    stream = _setup("text")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("Thread died")
    [line] = stream.getvalue().splitlines()
    assert line.endswith('RuntimeError: boom"')
    assert ' exc="Traceback (most recent call last):\\n' in line


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_log_counts_repeats() -> None:
    stream = _setup()
    clock = FakeClock()
    limited = RateLimitedLog(logger, interval=60.0, clock=clock)
    for now in (0.0, 1.0, 2.0, 59.0, 60.0, 61.0):
        clock.now = now
        limited.warn("unreachable", "Upstream unreachable", {"url": "https://api.example.test"})
    clock.now = 62.0
    limited.warn("auth", "Credentials refused")
    limited.clear("unreachable")
    limited.warn("unreachable", "Upstream unreachable")
    assert [(line["msg"], line.get("repeated")) for line in _json_lines(stream)] == [
        ("Upstream unreachable", None),
        ("Upstream unreachable (repeated 4 times)", 4),
        ("Credentials refused", None),
        ("Upstream unreachable (repeated 1 times)", 1),
        ("Upstream unreachable", None),
    ]
    assert {line["level"] for line in _json_lines(stream)} == {"warning"}


def test_rate_limited_log_after_a_quiet_interval_logs_plainly() -> None:
    stream = _setup()
    clock = FakeClock()
    limited = RateLimitedLog(logger, interval=10.0, clock=clock)
    limited.warn("k", "Disk low")
    clock.now = 100.0
    limited.warn("k", "Disk low")
    limited.clear("never-seen")
    assert [line["msg"] for line in _json_lines(stream)] == ["Disk low", "Disk low"]
