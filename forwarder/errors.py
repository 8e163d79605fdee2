"""The exception tree: everything turret-forwarder raises on purpose.

Owns the wire codes of refusals, so the daemon, the protocol and the client agree on one catalogue
(gunicorn's ``http/errors.py`` idea: each error class carries its own code). Imports nothing from the
package.
"""

from __future__ import annotations


class ForwarderError(Exception):
    """Base of every error raised on purpose; anything else reaching ``cli.main`` is a bug."""


class ConfigError(ForwarderError, ValueError):
    """A setting has a bad value. The text is one line that names the setting and where it came from."""

    def __init__(self, setting: str, source: str, reason: str) -> None:
        super().__init__(f"{setting} ({source}): {reason}")
        self.setting = setting
        self.source = source
        self.reason = reason


class AlreadyRunning(ForwarderError):
    """Another live daemon owns the data directory or answers on the socket path."""


class Refused(ForwarderError):
    """A request the daemon did not accept; ``code`` is what goes on the wire as ``error``."""

    code = "refused"


class InvalidMessage(Refused, ValueError):
    """The request cannot be delivered as written (bad JSON, bad email, unsafe path, ...)."""

    code = "invalid"


class MessageTooLarge(Refused):
    """The request line is longer than ``max_message_bytes``; the connection is closed after the reply."""

    code = "too_large"


class OutboxFull(Refused):
    """A backlog limit or the free-disk floor is reached; nothing stored is touched."""

    code = "full"


class StorageFailed(Refused):
    """SQLite could not commit the batch (disk full, I/O error); nothing of that batch was stored."""

    code = "storage"


class ShuttingDown(Refused):
    """The daemon is stopping and accepts no new messages."""

    code = "shutting_down"


REFUSALS: tuple[type[Refused], ...] = (InvalidMessage, MessageTooLarge, OutboxFull, StorageFailed, ShuttingDown)
"""Every wire code the daemon can send, in one closed set (metrics labels come from here)."""


def refusal_for_code(code: str) -> type[Refused]:
    """Map a wire code back to its class, so an app can write ``except OutboxFull``."""
    for cls in REFUSALS:
        if cls.code == code:
            return cls
    return Refused
