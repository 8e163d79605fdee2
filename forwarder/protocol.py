"""Wire protocol v1: newline-delimited JSON requests in, one JSON reply line out per request.

Owns framing-independent parsing and validation (bytes of one line -> ``Message`` or ``Ping``) and
reply encoding. Everything that could not be delivered later is refused here, now, with a precise
detail, so it never becomes a dead letter. Knows nothing of sockets (``ingest``) or storage.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from forwarder.errors import InvalidMessage, Refused
from forwarder.message import Kind, Message

MAX_KEY_CHARS = 200
MAX_DEPTH = 32  # of a post body; the store and the flusher re-encode it on deeper stacks than ours
_PRESIGNED_FIELDS = frozenset({"url", "api_key", "time", "signature", "payload"})
# Characters requests/urllib3 send unchanged in a path. Anything else (space, %, ?, #, non-ASCII,
# {, |, ...) would be re-encoded or cut by the HTTP client after signing, and the signature would break.
_EMAIL = re.compile(r"[A-Za-z0-9.!$&'*+=_~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_SEGMENT = re.compile(r"[A-Za-z0-9.!$&'()*+,;=:@_~-]+")
_HEADER_VALUE = re.compile(r"[\x21-\x7e]+")
_OK = b'{"ok": true}\n'


@dataclass(frozen=True, slots=True)
class Ping:
    """A liveness request; answered without touching the store."""


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Asks for the backlog figures and the delivery state (read-only, from memory)."""


Request = Message | Ping | StatusRequest


def parse_frame(line: bytes) -> Request:
    """Parse one request line (without its newline) into a ``Message`` or ``Ping``."""
    try:
        # What json.loads(line, parse_constant=...) does, minus building a new decoder for every line.
        text = line.decode(json.detect_encoding(line), "surrogatepass")
        obj = _DECODER.decode(text)
    except InvalidMessage:
        raise  # NaN, Infinity or a float overflow, refused by the decoder's hooks
    except ValueError as e:  # bad UTF-8, bad JSON, or an integer past Python's digit limit
        raise InvalidMessage(f"not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidMessage(f"not valid JSON: nested too deeply (at most {MAX_DEPTH} levels)") from None
    if not text.isascii() or "\\u" in text:
        _check_encodable(obj)
    if not isinstance(obj, dict):
        raise InvalidMessage(f"a request must be a JSON object, got {type(obj).__name__}")
    if "op" not in obj and _PRESIGNED_FIELDS & obj.keys():
        return _parse_presigned(obj)
    op = obj.get("op")
    if op == "ping":
        _check_fields(obj, {"op"}, "ping")
        return Ping()
    if op == "status":
        _check_fields(obj, {"op"}, "status")
        return StatusRequest()
    if op == "set":
        return _parse_set(obj)
    if op == "post":
        return _parse_post(obj)
    raise InvalidMessage(f"unknown op {op!r}: expected set, post, ping, status or a queue_set payload")


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are Python's extension, not JSON: the API could not parse the body we would send."""
    raise InvalidMessage(f"not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    """A number too large for a float (1e400) would be sent as Infinity, which is not JSON either."""
    value = float(text)
    if math.isinf(value):
        raise InvalidMessage(f"not valid JSON: {text[:40]} is too large for a number (it would be sent as Infinity)")
    return value


def _check_encodable(obj: Any) -> None:
    """Refuse a lone UTF-16 surrogate (an escape like \\ud800, or raw bytes let through by surrogatepass).

    It has no UTF-8 form: SQLite could not store it as an idempotency key and the API could not read it.
    Only lines with non-ASCII text or \\u escapes pay for this check.
    """
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage("not valid JSON: a string holds a lone UTF-16 surrogate (no UTF-8 form)") from None


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _check_fields(obj: dict[str, Any], allowed: set[str] | frozenset[str], what: str) -> None:
    extra = sorted(obj.keys() - allowed)
    if extra:
        raise InvalidMessage(f"{what}: unknown field(s) {', '.join(map(repr, extra))}")


def _parse_key(obj: dict[str, Any]) -> str | None:
    key = obj.get("key")
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
        raise InvalidMessage(f"key must be a non-empty string of at most {MAX_KEY_CHARS} characters")
    return key


def _string_map(value: Any, what: str) -> dict[str, str]:
    """A flat string->string object, as the API segments on (no nesting, no numbers)."""
    if not isinstance(value, dict):
        raise InvalidMessage(f"{what} must be a JSON object of strings")
    for k, v in value.items():
        if not isinstance(v, str):
            raise InvalidMessage(f"{what}.{k} must be a string, got {_json_type(v)}")
    return value


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", dict: "object", list: "array"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def check_email(email: Any) -> str:
    """Refuse an address that is malformed or would not survive the HTTP client unchanged in a path."""
    if not isinstance(email, str) or not email:
        raise InvalidMessage("email is required and must be a string")
    if not _EMAIL.fullmatch(email):
        raise InvalidMessage(
            "email is malformed or has characters that cannot go raw in a URL path "
            "(allowed: letters, digits and .!$&'*+=_~- before a single @, a domain after)"
        )
    return email


def check_path(path: Any, what: str = "path") -> str:
    """Refuse a path that is not /latest/... or that the HTTP client would re-encode or normalise."""
    if not isinstance(path, str) or not path.startswith("/latest/"):
        raise InvalidMessage(f"{what} must be a string starting with /latest/")
    for segment in path[1:].split("/"):
        if segment in ("", ".", ".."):
            raise InvalidMessage(f"{what} has an empty, '.' or '..' segment")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidMessage(
                f"{what} has characters the HTTP client would re-encode after signing "
                "(spaces, %, ?, #, non-ASCII, ...)"
            )
    if path.startswith("/latest/user/"):
        check_email(path.removeprefix("/latest/user/"))
    return path


def _parse_set(obj: dict[str, Any]) -> Message:
    _check_fields(obj, {"op", "email", "attributes", "properties", "key"}, "set")
    email = check_email(obj.get("email"))
    attributes = _string_map(obj.get("attributes", {}), "attributes")
    if "properties" in attributes:
        raise InvalidMessage("attributes.properties is reserved: send it as the properties field")
    properties = _string_map(obj.get("properties", {}), "properties")
    body = {"email": email, "attributes": attributes, "properties": properties}
    return Message(Kind.SET, body, _parse_key(obj))


def _parse_post(obj: dict[str, Any]) -> Message:
    _check_fields(obj, {"op", "path", "body", "key"}, "post")
    path = check_path(obj.get("path"))
    body = obj.get("body", {})
    if not isinstance(body, dict):
        raise InvalidMessage("body must be a JSON object")
    _check_depth(body)
    return Message(Kind.POST, {"path": path, "body": body}, _parse_key(obj))


def _check_depth(body: dict[str, Any]) -> None:
    """Refuse a body nested deeper than ``MAX_DEPTH``, level by level (no recursion of our own)."""
    level: list[Any] = [body]
    for _ in range(MAX_DEPTH):
        level = [child for value in level if isinstance(value, (dict, list))
                 for child in (value.values() if isinstance(value, dict) else value)]
        if not level:
            return
    raise InvalidMessage(f"body is nested deeper than {MAX_DEPTH} levels")


def _parse_presigned(obj: dict[str, Any]) -> Message:
    missing = sorted(_PRESIGNED_FIELDS - obj.keys())
    if missing:
        raise InvalidMessage(f"queue_set payload: missing field(s) {', '.join(missing)}")
    _check_fields(obj, _PRESIGNED_FIELDS | {"key"}, "queue_set payload")
    for name in sorted(_PRESIGNED_FIELDS):
        if not isinstance(obj[name], str) or not obj[name]:
            raise InvalidMessage(f"queue_set payload: {name} must be a non-empty string")
    check_path(obj["url"], "queue_set payload: url")
    if not obj["time"].isascii() or not obj["time"].isdigit():
        raise InvalidMessage("queue_set payload: time must be decimal Unix seconds")
    if not _HEADER_VALUE.fullmatch(obj["api_key"]):
        raise InvalidMessage("queue_set payload: api_key must be printable ASCII without spaces")
    for name in ("signature", "payload"):
        try:
            base64.b64decode(obj[name], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidMessage(f"queue_set payload: {name} is not valid base64") from None
    body = {name: obj[name] for name in sorted(_PRESIGNED_FIELDS)}
    return Message(Kind.PRESIGNED, body, _parse_key(obj))


def encode_ok(message_id: int | None = None, **fields: Any) -> bytes:
    """The reply line for an accepted request (``id`` only for stored messages)."""
    if not fields:  # every ack and ping: formatted directly, the same bytes json.dumps gives, at a tenth of the cost
        return _OK if message_id is None else b'{"ok": true, "id": "%d"}\n' % message_id
    reply: dict[str, Any] = {"ok": True, **fields}
    if message_id is not None:
        reply["id"] = str(message_id)
    return json.dumps(reply).encode() + b"\n"


def encode_refusal(error: Refused) -> bytes:
    """The one place a refusal becomes ``{"ok":false,"error":code,"detail":text}``."""
    return json.dumps({"ok": False, "error": error.code, "detail": str(error)}).encode() + b"\n"
