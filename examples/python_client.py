"""Send from a Python app with the forwarder's own client (``pip install turret-forwarder``).

The client keeps one connection, is thread-safe, reconnects after a forwarder restart, and raises the
error class of each refusal, so an app decides per case: an outage of the forwarder itself is
``ForwarderUnavailable`` (within the 1-second connect timeout), a full backlog is ``OutboxFull``.
"""

from __future__ import annotations

import os
import sys

from forwarder import Client, ForwarderError, OutboxFull
from forwarder.client import ForwarderUnavailable

SOCKET = os.environ.get("FORWARDER_SOCKET", "/run/turret-forwarder/forwarder.sock")


def main() -> int:
    with Client(SOCKET, timeout=5) as client:
        try:
            # ``key`` makes a retry safe: the same key is stored once and returns the first message's id.
            message_id = client.set("alice@example.com", {"plan": "pro"}, properties={"source": "signup"},
                                    key="signup-alice")
            client.post("/latest/target/vip", {"attributes": [{"name": "plan", "value": "pro"}]})
        except (ForwarderUnavailable, OutboxFull) as e:
            print(f"not stored, try again later: {e}", file=sys.stderr)
            return 1
        except ForwarderError as e:  # InvalidMessage and friends: this request can never be delivered
            print(f"refused: {e}", file=sys.stderr)
            return 1
    print(f"stored as message {message_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
