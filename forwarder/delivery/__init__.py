"""Deliver: the flusher replays the outbox to the upstream over HTTPS, in per-user order, many users at once.

``flusher`` schedules (endpoint gate, credential pause, outcomes) over ``lanes``; ``sender`` sends one request.
"""

from forwarder.delivery.flusher import Flusher

__all__ = ["Flusher"]
