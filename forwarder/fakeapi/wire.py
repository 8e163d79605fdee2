"""What the fake API speaks: modes, scripted answers, received requests, its own signature check, its certificate.

The signature check is written from the shared API doc and never imported from ``turretio``, so one
misreading of the doc cannot hide on both sides.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

from forwarder.errors import ConfigError, ForwarderError

DEMO_API_KEY = "demo-key"
DEMO_API_SECRET = base64.b64encode(b"demo-secret-bytes").decode("ascii")


class Mode(enum.StrEnum):
    """How the server treats new connections and the next request on open ones (fault injection)."""

    UP = "up"  # answer normally
    REFUSE = "refuse"  # listening socket closed, so connects get ECONNREFUSED; open connections are closed
    RESET = "reset"  # drop with RST (SO_LINGER 0); a new connection at its ClientHello, before any TLS
    HANG = "hang"  # do nothing more; the connection is closed without an answer when the hang ends
    STALL_BODY = "stall_body"  # send status line and headers, never the body


@dataclass(frozen=True, slots=True)
class Respond:
    """One answer to send; ``FakeTurretIO.script()`` queues these ahead of the signature-based default."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds, added to the server-wide delay

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599 or self.delay < 0:
            raise ValueError(f"bad response: status {self.status}, delay {self.delay}")


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the server read it, and the status line it sent back (0 if none was sent).

    A ``stall_body`` answer counts with its status: a real server would have applied that request, which is
    what makes a retry of it a duplicate. ``path`` is the request target as sent, not URL-decoded. From
    ``at`` to ``answered_at`` the request was in flight: a later request's ``at`` past an earlier one's
    ``answered_at`` proves the client waited for that answer before sending.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json_text: str | None  # the base64-decoded body, None when it is not base64 of UTF-8 text
    signature_valid: bool  # the HMAC alone; a stale X-LS-Time under max_skew does not make it False
    status: int
    idempotency_key: str | None
    connection: int  # serial number of the TCP connection, so a test can see keep-alive
    at: float  # time.monotonic() when the request was read
    answered_at: float | None = None  # time.monotonic() just before the status line went out; None if none did

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300


OK = Respond(200, b'{"status": "ok"}', {"Content-Type": "application/json"})
UNAUTHORIZED = Respond(401, b"Unauthorized", {"Content-Type": "text/plain"})
NOT_FOUND = Respond(404, b"Not Found", {"Content-Type": "text/plain"})


def decode_secret(secret_b64: str, source: str) -> bytes:
    """The HMAC key: the vendor distributed secrets base64-encoded."""
    try:
        return base64.b64decode(secret_b64, validate=True)
    except binascii.Error:
        raise ConfigError("api_secret", source, "is not valid base64") from None


def verify_signature(secret: bytes, target: str, signed: bytes, stamp: str, auth: str) -> bool:
    """X-LS-Auth = base64(HMAC-SHA512(secret, path + json_text + time)), over the bytes as received."""
    # http.server decoded the request line and headers as latin-1, so encoding back gives the wire bytes.
    message = target.split("?", 1)[0].encode("latin-1") + signed + stamp.encode("latin-1")
    expected = base64.b64encode(hmac.new(secret, message, hashlib.sha512).digest())
    return hmac.compare_digest(expected, auth.encode("latin-1"))


def generate_certificate(directory: Path) -> tuple[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost: (CA file, cert+key file)."""
    try:
        import trustme
    except ImportError:
        raise ForwarderError(
            "fake-api needs a certificate: pass --cert and --key, or install turret-forwarder[demo]"
        ) from None
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file, server_file = directory / "ca.pem", directory / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(server_file))
    return str(ca_file), str(server_file)
