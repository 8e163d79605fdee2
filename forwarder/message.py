"""The message: what an app handed us, as it is stored and later delivered.

Owns the stored record format (a JSON object, never pickle) and its decoding. Knows nothing of
sockets, SQL or HTTP; ``protocol`` builds messages from the wire, ``store`` keeps their records,
``turretio`` turns them into requests.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Kind(enum.StrEnum):
    """What the app asked for; decides how the upstream builds the request."""

    SET = "set"  # create-or-update a user, signed at send time with our credentials
    POST = "post"  # any other /latest/... POST, signed at send time
    PRESIGNED = "presigned"  # the vendor's queue_set payload, replayed verbatim


_FIELDS: dict[Kind, frozenset[str]] = {
    Kind.SET: frozenset({"email", "attributes", "properties"}),
    Kind.POST: frozenset({"path", "body"}),
    Kind.PRESIGNED: frozenset({"url", "api_key", "time", "signature", "payload"}),
}


@dataclass(frozen=True, slots=True)
class Message:
    """One accepted message.

    ``body`` holds the kind's fields exactly (see ``_FIELDS``); it is validated by ``protocol`` before
    a ``Message`` exists, so everything downstream may trust it. ``key`` is the app's optional
    idempotency key; it is kept beside the message by the store, not in the record.
    """

    kind: Kind
    body: Mapping[str, Any]
    key: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The JSON-serialisable object the store keeps for this message."""
        return {"kind": self.kind.value, **self.body}


def message_from_record(record: Any) -> Message:
    """Rebuild a message from a stored record; ``ValueError`` means the row is corrupt."""
    if not isinstance(record, dict):
        raise ValueError("stored record is not a JSON object")
    try:
        kind = Kind(str(record.get("kind", "")))
    except ValueError:
        raise ValueError(f"stored record has unknown kind {record.get('kind')!r}") from None
    body = {k: v for k, v in record.items() if k != "kind"}
    if set(body) != _FIELDS[kind]:
        raise ValueError(f"stored {kind.value} record has fields {sorted(body)}")
    return Message(kind, body)


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message as the flusher sees it: with its outbox id, enqueue time and attempt count."""

    id: int
    message: Message
    enqueued_at: float  # wall-clock seconds (time.time()) at commit, survives restarts
    attempts: int = 0
    size: int = 0  # bytes of the stored record

    @property
    def idempotency_key(self) -> str:
        """Sent as ``Idempotency-Key`` on every attempt, so a redelivery after a crash can be deduplicated."""
        return str(self.id)
