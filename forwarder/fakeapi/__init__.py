"""A local Turret.IO-compatible HTTPS server with fault injection, for tests, the demo and users' trials.

Owns its own signature check, written from the shared API doc and never imported from ``turretio``, so one
misreading of the doc cannot hide on both sides. Imports only the stdlib, ``forwarder.errors`` and, lazily
when it must generate a certificate, ``trustme``. It keeps every request in memory: not for production.
"""

from forwarder.fakeapi.control import ControlServer, main
from forwarder.fakeapi.server import FakeTurretIO
from forwarder.fakeapi.wire import DEMO_API_KEY, DEMO_API_SECRET, Mode, Received, Respond

__all__ = ["DEMO_API_KEY", "DEMO_API_SECRET", "ControlServer", "FakeTurretIO", "Mode", "Received", "Respond", "main"]
