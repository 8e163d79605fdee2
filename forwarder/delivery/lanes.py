"""What the flusher schedules and what its threads pass each other: lanes, jobs, their results, signals."""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field

from forwarder.message import QueuedMessage
from forwarder.turretio import Credentials, Outcome


@dataclass(eq=False)
class Lane:
    """One ordering key's messages, in id order; only the head is ever in flight."""

    key: str
    messages: collections.deque[QueuedMessage] = field(default_factory=collections.deque)
    failures: int = 0  # consecutive message-level failures of the head, for its backoff
    busy: bool = False  # head in flight, delayed, or parked: not in the ready queue
    in_flight: bool = False


@dataclass(frozen=True, slots=True)
class Job:
    lane: Lane
    queued: QueuedMessage
    credentials: Credentials | None
    probe: bool  # sent while the endpoint gate or the credentials pause allows one request at a time


@dataclass(frozen=True, slots=True)
class Done:
    job: Job
    outcome: Outcome


class Signal(enum.Enum):
    WAKE = "wake"  # new messages were committed
    CREDENTIALS = "credentials"  # credentials were reloaded
    FLUSH = "flush"  # operator: retry everything now, re-read the outbox from the start
    RESYNC = "resync"  # operator changed the outbox (hold, release, purge, dead retry): re-read it
    STOP = "stop"
