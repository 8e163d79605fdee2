"""A stand-in web app that sends user updates to the forwarder: the standard library only, no client.

It runs in docker-compose.yml next to the forwarder (and in tests/test_container.py) as its own uid, a
member of the forwarder's group, with the socket volume mounted read-only: exactly how a real app
container shares the socket. Each message is one short connection (connect, one request line, one reply
line, close), the pattern of a web request, so a forwarder restart costs at most one failed send.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

DEFAULT_SOCKET = "/run/turret-forwarder/forwarder.sock"


def send(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request, one reply: ``{"ok": true, "id": ...}`` arrives only once the message is on disk."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply: dict[str, Any] = json.loads(sock.makefile("rb").readline())
        return reply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=0, help="stop after this many messages (default: never)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between messages")
    args = parser.parse_args()
    path = os.environ.get("FORWARDER_SOCKET", DEFAULT_SOCKET)
    sent = 0
    while args.count == 0 or sent < args.count:
        request = {"op": "set", "email": f"user{sent % 10}@example.com", "attributes": {"plan": "pro"},
                   "properties": {"source": "sample-app"}}
        try:
            reply = send(path, request)
        except OSError as e:  # the forwarder is restarting: a real app would fall back or retry later
            reply = {"ok": False, "error": "unavailable", "detail": str(e)}
        print(json.dumps(reply), flush=True)
        if not reply["ok"] and args.count:
            return 1
        sent += 1
        if args.count == 0 or sent < args.count:
            time.sleep(args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
