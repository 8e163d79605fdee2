"""turret-forwarder: a local, durable buffer between web apps and the Turret.IO API.

Apps import ``Client`` (and the error classes) from here; nothing else is public API.
"""

from forwarder.client import Client, ForwarderUnavailable
from forwarder.errors import (
    ConfigError,
    ForwarderError,
    InvalidMessage,
    MessageTooLarge,
    OutboxFull,
    Refused,
    ShuttingDown,
    StorageFailed,
)

__all__ = [
    "Client",
    "ConfigError",
    "ForwarderError",
    "ForwarderUnavailable",
    "InvalidMessage",
    "MessageTooLarge",
    "OutboxFull",
    "Refused",
    "ShuttingDown",
    "StorageFailed",
]
__version__ = "0.1.0"
