"""The endpoint gate: failures of the whole API back off the endpoint, not every lane on its own schedule.

When a request fails in a way that concerns the API (connection errors, 5xx, 429), the gate closes for a
backoff delay (or the API's ``Retry-After``); after it, one probe at a time is sent until one gets an
answer. Owned by the flusher thread, like the rest of the scheduling state.
"""

from __future__ import annotations

import logging
import random
import time

from forwarder.backoff import Backoff
from forwarder.turretio import Retry

logger = logging.getLogger(__name__)


class EndpointGate:
    """Open, closed until a time, or half open (one probe in flight)."""

    def __init__(self, rng: random.Random) -> None:
        self.failures = 0  # probes that failed since the gate closed; 0 while it is open
        self.probing = False  # a probe (of the gate or of refused credentials) is in flight
        self._until = 0.0  # monotonic; after it, one probe at a time until one gets through
        self._since = 0.0
        self._rng = rng

    def closed(self, now: float) -> bool:
        return bool(self.failures) and (now < self._until or self.probing)

    def timer(self, now: float) -> float | None:
        """Seconds until a probe may go, if the flusher has to wake up for it."""
        return self._until - now if self.failures and not self.probing else None

    def failed(self, outcome: Retry, probe: bool, backoff: Backoff) -> None:
        """A request failed for the whole API: close the gate, or keep it closed longer."""
        now = time.monotonic()
        if not self.failures:
            self._since = now
            logger.warning("Upstream failing; backing off the endpoint (messages are kept)",
                           extra={"fields": {"result": outcome.result.value, "reason": outcome.reason}})
        # One backoff step per probe: the other requests in flight when the gate closed fail in the same
        # round, and counting each would multiply the first wait by 2**concurrency.
        if probe or not self.failures:
            self.failures += 1
        delay = outcome.after if outcome.after is not None else backoff.delay(self.failures, self._rng)
        self._until = max(self._until, now + delay)

    def answered(self, probe: bool) -> None:
        """The API answered; only a probe reopens a closed gate.

        A request sent before the gate closed may be answered after other requests failed: that answer is
        older news than the failure, and letting it reopen the gate made an outage log flap.
        """
        if self.failures and probe:
            logger.info("Upstream reachable again", extra={"fields": {
                "failed_attempts": self.failures, "seconds": round(time.monotonic() - self._since, 1)}})
            self.reset()

    def reset(self) -> None:
        """Open the gate: a probe got an answer."""
        self.failures, self._until = 0, 0.0

    def probe_now(self) -> None:
        """An operator's flush: end the wait; the next request is a probe, and its answer reopens the gate
        (and logs the outage's end, as any other answer would)."""
        self._until = 0.0
