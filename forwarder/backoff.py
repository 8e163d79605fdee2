"""How long to wait before the next attempt: capped exponential backoff with full jitter, and Retry-After.

Pure functions of their arguments: the random source and the wall clock are passed in, so the flusher
stays deterministic under test. Knows nothing of messages, HTTP libraries or the outbox; it only turns a
failure count or a header value into seconds.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

_DELTA_SECONDS = re.compile(r"-?[0-9]+")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter (the AWS "full jitter" scheme).

    Full jitter rather than a fixed doubling, so that many messages (or many daemons) failing together
    against one endpoint spread their retries instead of hammering it in lockstep.
    """

    base: float = 1.0
    cap: float = 300.0

    def __post_init__(self) -> None:
        if not self.base > 0:
            raise ValueError(f"backoff base must be positive, got {self.base!r}")
        if not self.cap >= 0:
            raise ValueError(f"backoff cap must not be negative, got {self.cap!r}")

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after ``failures`` consecutive failures: uniform in [0, min(cap, base * 2**(n-1))].

        No failure yet means no wait. ``ldexp`` raises instead of returning infinity once the exponent
        is huge (a message failing for weeks), and by then the ceiling is the cap anyway.
        """
        if failures < 1:
            return 0.0
        try:
            ceiling = min(self.cap, math.ldexp(self.base, failures - 1))
        except OverflowError:
            ceiling = self.cap
        return rng.uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: float, cap: float) -> float | None:
    """Seconds a server asked us to wait, from a ``Retry-After`` header, clamped to [0, cap].

    Accepts delta-seconds (``"7"``) and an HTTP-date, measured against ``now`` (wall-clock Unix seconds,
    since an HTTP-date is wall-clock too). A date in the past or a negative delay means "now": 0. An
    absent or unreadable header gives None, and the caller falls back to its own backoff; the cap keeps
    a hostile or broken server from parking the outbox for years.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        # float() and not int(): a thousand-digit value becomes inf instead of tripping the int-digit limit.
        seconds = float(text)
    else:
        when = _parse_http_date(text)
        if when is None:
            return None
        seconds = when - now
    return min(cap, max(0.0, seconds))


def _parse_http_date(text: str) -> float | None:
    """Unix seconds of an HTTP-date, or None if it is not one; a date without a zone is taken as UTC."""
    try:
        when = parsedate_to_datetime(text)
    except (ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
