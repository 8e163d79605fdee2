"""Tests of forwarder.protocol: the bad-input corpus, every request kind, the reply lines.

The corpus lives in ``tests/data/frames``: ``invalid/NNN.jsonl`` is one request line that must be refused,
``NNN.expect`` holds the expected error code on its first line and, on its second, a fragment the detail
must contain (the offending field, where there is one). ``valid/NNN.jsonl`` must be accepted. Every
refusal bug we fix adds a file. ``test_ingest`` sends the same corpus to a real daemon.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from forwarder.errors import REFUSALS, InvalidMessage, Refused, refusal_for_code
from forwarder.message import Kind, Message, message_from_record
from forwarder.protocol import (
    MAX_DEPTH,
    MAX_KEY_CHARS,
    Ping,
    StatusRequest,
    check_email,
    check_path,
    encode_ok,
    encode_refusal,
    parse_frame,
)

FRAMES = Path(__file__).parent / "data" / "frames"


@dataclass(frozen=True)
class Frame:
    """One corpus file: its request line (without the newline) and, if invalid, what the refusal says."""

    name: str
    line: bytes
    code: str = ""
    detail: str = ""


def invalid_frames() -> list[Frame]:
    frames = []
    for path in sorted((FRAMES / "invalid").glob("*.jsonl")):
        code, detail = path.with_suffix(".expect").read_text().splitlines()[:2]
        frames.append(Frame(path.stem, path.read_bytes().removesuffix(b"\n"), code, detail))
    return frames


def valid_frames() -> list[Frame]:
    return [Frame(path.stem, path.read_bytes().removesuffix(b"\n"))
            for path in sorted((FRAMES / "valid").glob("*.jsonl"))]


def expected_kind(frame: Frame) -> str:
    """``op`` of a valid frame, or ``presigned`` for the vendor's bare five-field payload."""
    op: str = json.loads(frame.line).get("op", "presigned")
    return op


def test_corpus_has_an_expectation_per_bad_input_one_line_per_file_and_no_duplicates() -> None:
    invalid = FRAMES / "invalid"
    assert {p.stem for p in invalid.glob("*.jsonl")} == {p.stem for p in invalid.glob("*.expect")} != set()
    frames = invalid_frames() + valid_frames()
    assert all(frame.code and frame.detail for frame in invalid_frames())
    assert all(b"\n" not in frame.line for frame in frames)
    assert len({frame.line for frame in frames}) == len(frames)


@pytest.mark.parametrize("frame", invalid_frames(), ids=lambda frame: frame.name)
def test_invalid_frame_is_refused_with_its_code_and_a_precise_detail(frame: Frame) -> None:
    with pytest.raises(Refused) as caught:
        parse_frame(frame.line)
    assert caught.value.code == frame.code
    assert frame.detail in str(caught.value)


@pytest.mark.parametrize("frame", valid_frames(), ids=lambda frame: frame.name)
def test_valid_frame_is_accepted_and_its_record_decodes_back(frame: Frame) -> None:
    request = parse_frame(frame.line)
    if expected_kind(frame) == "ping":
        assert request == Ping()
        return
    assert isinstance(request, Message)
    assert request.kind == Kind(expected_kind(frame))
    record = json.loads(json.dumps(request.to_record()))
    assert message_from_record(record) == Message(request.kind, request.body)


def _set(**fields: Any) -> bytes:
    return json.dumps({"op": "set", "email": "alice@example.com", **fields}).encode()


def test_set_fills_in_empty_attributes_and_properties() -> None:
    assert parse_frame(_set()) == Message(Kind.SET, {"email": "alice@example.com", "attributes": {},
                                                     "properties": {}})


def test_set_keeps_attributes_properties_and_key() -> None:
    message = parse_frame(_set(attributes={"plan": "pro"}, properties={"source": "signup"}, key="k-1"))
    assert message == Message(Kind.SET, {"email": "alice@example.com", "attributes": {"plan": "pro"},
                                         "properties": {"source": "signup"}}, "k-1")
    assert isinstance(message, Message)
    assert message.to_record() == {"kind": "set", "email": "alice@example.com", "attributes": {"plan": "pro"},
                                   "properties": {"source": "signup"}}


@pytest.mark.parametrize("properties", [None, [], "", 0, False])
def test_properties_that_are_not_an_object_are_refused(properties: Any) -> None:
    with pytest.raises(InvalidMessage, match=r"^properties must be a JSON object of strings$"):
        parse_frame(_set(properties=properties))


def test_null_key_means_no_key() -> None:
    message = parse_frame(_set(key=None))
    assert isinstance(message, Message)
    assert message.key is None


def test_key_of_the_maximum_length_is_accepted() -> None:
    message = parse_frame(_set(key="k" * MAX_KEY_CHARS))
    assert isinstance(message, Message)
    assert message.key == "k" * MAX_KEY_CHARS


def test_post_without_body_posts_an_empty_object() -> None:
    assert parse_frame(b'{"op":"post","path":"/latest/target/vip"}') == Message(
        Kind.POST, {"path": "/latest/target/vip", "body": {}})


def _nested(levels: int) -> Any:
    """A value whose deepest path holds ``levels`` values (``levels - 1`` objects around a string)."""
    value: Any = "leaf"
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_post_body_as_deep_as_the_limit_is_accepted() -> None:
    line = json.dumps({"op": "post", "path": "/latest/target/vip", "body": _nested(MAX_DEPTH)}).encode()
    message = parse_frame(line)
    assert isinstance(message, Message)
    assert message.body["body"] == _nested(MAX_DEPTH)


def test_post_body_one_level_deeper_than_the_limit_is_refused() -> None:
    line = json.dumps({"op": "post", "path": "/latest/target/vip", "body": _nested(MAX_DEPTH + 1)}).encode()
    with pytest.raises(InvalidMessage, match=f"^body is nested deeper than {MAX_DEPTH} levels$"):
        parse_frame(line)


def test_deep_lists_count_as_levels_too() -> None:
    body = {"a": [[[["leaf"]]]] * 2}
    line = json.dumps({"op": "post", "path": "/latest/target/vip", "body": body}).encode()
    assert parse_frame(line) == Message(Kind.POST, {"path": "/latest/target/vip", "body": body})


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_numbers_are_refused(constant: str) -> None:
    line = b'{"op":"post","path":"/latest/target/vip","body":{"x":%s}}' % constant.encode()
    with pytest.raises(InvalidMessage, match=f"^not valid JSON: {constant} is not a JSON number$"):
        parse_frame(line)


def test_presigned_payload_is_kept_field_for_field_with_its_key() -> None:
    fields = {"url": "/latest/user/alice@example.com", "api_key": "demo-key", "time": "1400000000",
              "signature": "c2ln", "payload": "eyJwbGFuIjogInBybyJ9"}
    message = parse_frame(json.dumps({**fields, "key": "k-2"}).encode())
    assert message == Message(Kind.PRESIGNED, fields, "k-2")


def test_status_request() -> None:
    assert parse_frame(b'{"op":"status"}') == StatusRequest()


@pytest.mark.parametrize("email", ["alice+news@example.com", "a@b", "o'brien@example.com",
                                   "x" * 64 + "@e.io"])
def test_email_that_goes_raw_in_a_path_is_accepted(email: str) -> None:
    assert check_email(email) == email


@pytest.mark.parametrize("email", ["", "x" * 65 + "@e.io", "alice@", "@example.com", "alice@-example.com",
                                   "alice@example.com/x", "alice@exam_ple.com"])
def test_email_that_is_malformed_is_refused(email: str) -> None:
    with pytest.raises(InvalidMessage, match=r"^email is"):
        check_email(email)


@pytest.mark.parametrize("path", ["/latest/target/vip", "/latest/user/alice+x@example.com",
                                  "/latest/target/vip/email/7/sendEmail"])
def test_path_the_http_client_sends_unchanged_is_accepted(path: str) -> None:
    assert check_path(path) == path


@pytest.mark.parametrize("path", ["/latest/", "/latest//target", "/latest/target/./x", "/latest/target/x/",
                                  "/latest/target/caf\u00e9", "/latest/target/{x}", "latest/target/x"])
def test_path_the_http_client_would_change_is_refused(path: str) -> None:
    with pytest.raises(InvalidMessage, match=r"^path "):
        check_path(path)


def test_ok_reply_lines() -> None:
    assert encode_ok() == b'{"ok": true}\n'
    assert encode_ok(42) == b'{"ok": true, "id": "42"}\n'
    assert encode_ok(backlog=3) == b'{"ok": true, "backlog": 3}\n'


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda cls: cls.code)
def test_refusal_reply_line_carries_the_code_the_client_maps_back(refusal: type[Refused]) -> None:
    line = encode_refusal(refusal("why it was refused"))
    expected = {"ok": False, "error": refusal.code, "detail": "why it was refused"}
    assert line == json.dumps(expected).encode() + b"\n"
    assert refusal_for_code(json.loads(line)["error"]) is refusal
