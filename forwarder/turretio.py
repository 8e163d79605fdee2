"""Speak Turret.IO: turn a queued message into a signed request, and a response into an outcome.

Owns everything specific to the upstream API: paths, the ``X-LS-*`` headers and their HMAC signature,
the base64 body, and what each HTTP status means. The flusher sees only the ``Upstream`` interface, so a
second upstream (say a generic JSON webhook) is one more class here, not a change to delivery or the
outbox. It must not send anything: ``delivery`` is the only module that imports ``requests``; it sends
the ``HttpRequest`` values built here and hands the response back to ``classify``. The wire format
follows ``turretio-api.md`` byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from forwarder.backoff import parse_retry_after
from forwarder.message import Kind, Message, QueuedMessage

DEAD_BODY_BYTES = 4096
"""How much of a rejecting response a dead letter keeps: enough for an error text, never a whole page."""

_USER_PATH = re.compile(r"/latest/user/(?P<email>[^/?#]+)")


class Result(enum.StrEnum):
    """What one delivery attempt came to; a closed set because it is the ``result`` metric label."""

    SUCCESS = "success"
    RETRYABLE_HTTP = "retryable_http"
    PERMANENT_HTTP = "permanent_http"
    AUTH = "auth"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    CONNECT = "connect"
    TLS = "tls"


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request, ready to send: ``path`` is exactly what was signed and goes after the base URL as is."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    """The API key and the decoded HMAC secret; the secret never appears in a repr, hence in no log."""

    api_key: str
    secret: bytes = field(repr=False)

    @classmethod
    def from_base64(cls, api_key: str, secret_b64: str) -> Credentials:
        """Credentials from the secret as Turret.IO distributes it (base64); ``ValueError`` if it is not."""
        try:
            secret = base64.b64decode(secret_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the API secret is not valid base64") from None
        if not secret:
            raise ValueError("the API secret is empty")
        return cls(api_key, secret)


@dataclass(frozen=True, slots=True)
class Delivered:
    """The upstream accepted the message (any 2xx)."""

    status: int
    result: ClassVar[Result] = Result.SUCCESS


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again later.

    ``after`` is the delay the server asked for (Retry-After, already capped), or None to use our own
    backoff. ``endpoint`` says the failure concerns the whole API (5xx, 429, connection-level), so the
    flusher backs off the endpoint rather than this one message. ``reason`` is short and carries no
    email or secret: it is logged.
    """

    result: Result
    reason: str
    after: float | None = None
    endpoint: bool = False


@dataclass(frozen=True, slots=True)
class Dead:
    """The upstream will never accept this message as written: it becomes a dead letter.

    ``body`` is the start of the response (``DEAD_BODY_BYTES`` at most), kept for ``dead show``.
    """

    reason: str
    status: int
    body: bytes
    result: ClassVar[Result] = Result.PERMANENT_HTTP


@dataclass(frozen=True, slots=True)
class PauseAuth:
    """Our credentials were refused: every signed message would fail the same way, so delivery pauses."""

    status: int
    result: ClassVar[Result] = Result.AUTH


Outcome = Delivered | Retry | Dead | PauseAuth


class Upstream(Protocol):
    """What the flusher needs from an upstream API. Nothing else about the API leaks past this line."""

    def ordering_key(self, message: Message) -> str:
        """The lane of ``message``: messages with the same key are delivered one at a time, in order.

        Messages with different keys may be delivered concurrently and overtake each other, so the key
        must group every message whose order the upstream can observe (for example all updates of one
        user). The key may contain an email address: use it for grouping, never log it.
        """
        ...

    @property
    def credentials_hint(self) -> str:
        """How an operator gives the credentials, for the warning logged while signed messages wait for them."""
        ...

    def needs_credentials(self, message: Message) -> bool:
        """Whether ``build_request`` needs our credentials for ``message``.

        False for requests signed elsewhere (pre-signed payloads), which can therefore still be delivered
        while our own credentials are missing or paused after an auth failure.
        """
        ...

    def build_request(self, queued: QueuedMessage, credentials: Credentials | None, now: float) -> HttpRequest:
        """The request that delivers ``queued``, signed at ``now`` (wall-clock Unix seconds, injected).

        Call it afresh for every attempt, so that a retry carries a fresh signature time. Every request carries
        ``queued.idempotency_key`` as ``Idempotency-Key``, so a redelivery after a crash can be
        deduplicated. Raises ``ValueError`` if the message needs credentials and ``credentials`` is None.
        """
        ...

    def classify(
        self, message: Message, status: int, headers: Mapping[str, str], body: bytes, now: float
    ) -> Outcome:
        """What an HTTP response to ``message`` means for it, and for the endpoint.

        ``headers`` are looked up case-insensitively; ``now`` (wall-clock Unix seconds) resolves an
        HTTP-date ``Retry-After``. Connection-level failures never reach here: delivery turns those into
        a ``Retry`` itself (``TIMEOUT``, ``CONNECT``, ``TLS``).
        """
        ...


def sign(secret: bytes, path: str, json_text: str, time: str) -> str:
    """``X-LS-Auth``: base64(HMAC-SHA512(secret, path + json_text + time)), as all vendor clients compute it.

    The signature covers the exact JSON text whose base64 is sent, so ``json_text`` must be the very
    string that is encoded into the body.
    """
    digest = hmac.new(secret, (path + json_text + time).encode("utf-8"), hashlib.sha512).digest()
    return base64.b64encode(digest).decode("ascii")


class TurretUpstream(Upstream):
    """The Turret.IO API as its five official clients speak it (see ``turretio-api.md``).

    ``retry_after_cap`` bounds any server-requested delay, in seconds.
    """

    credentials_hint = "set TURRET_API_KEY and TURRET_API_SECRET, or TURRET_API_KEY_FILE and TURRET_API_SECRET_FILE"

    def __init__(self, retry_after_cap: float = 3600.0) -> None:
        self.retry_after_cap = retry_after_cap

    def ordering_key(self, message: Message) -> str:
        if message.kind is Kind.SET:
            return str(message.body["email"]).lower()  # one person, one lane, however the app cased it
        path = str(message.body["path" if message.kind is Kind.POST else "url"])
        # A user's set, post and pre-signed messages share one lane, whatever kind each arrived as.
        user = _USER_PATH.fullmatch(path)
        return user["email"].lower() if user else path

    def needs_credentials(self, message: Message) -> bool:
        return message.kind is not Kind.PRESIGNED

    def build_request(self, queued: QueuedMessage, credentials: Credentials | None, now: float) -> HttpRequest:
        message = queued.message
        if message.kind is Kind.PRESIGNED:
            fields = message.body
            return _post(
                fields["url"], fields["payload"].encode("ascii"), queued.idempotency_key,
                api_key=fields["api_key"], time=fields["time"], signature=fields["signature"],
            )
        if credentials is None:
            raise ValueError(f"a {message.kind.value} message needs API credentials to be signed")
        path, json_text = _path_and_json(message)
        time = str(int(now))
        return _post(
            path, base64.b64encode(json_text.encode("ascii")), queued.idempotency_key,
            api_key=credentials.api_key, time=time, signature=sign(credentials.secret, path, json_text, time),
        )

    def classify(
        self, message: Message, status: int, headers: Mapping[str, str], body: bytes, now: float
    ) -> Outcome:
        if 200 <= status < 300:
            return Delivered(status)
        if status in (401, 403):
            if message.kind is Kind.PRESIGNED:
                # Its signature and time were frozen at enqueue and we cannot re-sign it: after an outage
                # a stale X-LS-Time is the likely cause. Pausing would stall it forever; the dead letter
                # keeps it for `dead retry`.
                return Dead("presigned_rejected", status, body[:DEAD_BODY_BYTES])
            return PauseAuth(status)
        if status == 429:
            return Retry(Result.RATE_LIMITED, "rate limited", self._retry_after(headers, now), endpoint=True)
        if status == 408:
            return Retry(Result.RETRYABLE_HTTP, f"http {status}")
        if 400 <= status < 500:
            return Dead(f"http {status}", status, body[:DEAD_BODY_BYTES])
        if 500 <= status < 600:
            after = self._retry_after(headers, now) if status == 503 else None
            return Retry(Result.RETRYABLE_HTTP, f"http {status}", after, endpoint=True)
        # 1xx, 3xx and nonsense: most likely a misconfigured base URL, which must not dead-letter the backlog.
        return Retry(Result.RETRYABLE_HTTP, f"unexpected http {status}", endpoint=True)

    def _retry_after(self, headers: Mapping[str, str], now: float) -> float | None:
        return parse_retry_after(_header(headers, "Retry-After"), now, self.retry_after_cap)


def _path_and_json(message: Message) -> tuple[str, str]:
    """The path and the JSON text to sign and send for a set or post message.

    Default ``json.dumps`` separators and ``"properties"`` last, like the vendor's Python client: the
    server verifies over the bytes it receives, but matching a reference client keeps the worked vector
    of the API doc reproducible.
    """
    body = message.body
    if message.kind is Kind.SET:
        return f"/latest/user/{body['email']}", json.dumps({**body["attributes"], "properties": body["properties"]})
    return str(body["path"]), json.dumps(body["body"])


def _post(path: str, body: bytes, idempotency_key: str, *, api_key: str, time: str, signature: str) -> HttpRequest:
    """A signed Turret.IO POST; the email in ``path`` stays raw (not URL-encoded), exactly as signed."""
    headers = {
        "X-LS-Key": api_key,
        "X-LS-Time": time,
        "X-LS-Auth": signature,
        "Content-Type": "text/json",
        "Idempotency-Key": idempotency_key,
    }
    return HttpRequest("POST", path, headers, body)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value by case-insensitive name, whatever mapping type the HTTP library handed back."""
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)
