"""What the flusher schedules and what its threads pass each other: lanes, jobs, their results, signals."""

from __future__ import annotations

import collections
import enum
import queue
from dataclasses import dataclass, field

from forwarder.message import QueuedMessage
from forwarder.store import Op
from forwarder.turretio import Credentials, Outcome


@dataclass(eq=False)
class Lane:
    """One ordering key's messages, in id order; only the head is ever in flight."""

    key: str
    messages: collections.deque[QueuedMessage] = field(default_factory=collections.deque)
    failures: int = 0  # consecutive message-level failures of the head, for its backoff
    busy: bool = False  # head in flight, delayed, or parked: not in the ready queue
    in_flight: bool = False
    resynced: bool = False  # an operator changed the outbox while the head was in flight


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


class Removals:
    """Delivered or dead-lettered messages whose removal the writer has not settled yet.

    A re-read from the start of the outbox (a resync) still finds them stored, and must not send them
    again. Kept in submission order, the order the writer settles them in.
    """

    def __init__(self) -> None:
        self._ops: collections.OrderedDict[int, Op] = collections.OrderedDict()

    def add(self, message_id: int, removal: Op) -> None:
        ops = self._ops
        while ops and next(iter(ops.values())).settled:
            ops.popitem(last=False)
        ops[message_id] = removal

    def unsettled(self) -> set[int]:
        """Take it before a read: a removal committed while the read runs is not in its snapshot. A row whose
        removal had settled before is news (a dead letter retried under its id, or a removal that failed for
        good: sent again, at least once)."""
        return {message_id for message_id, removal in self._ops.items() if not removal.settled}


class Signal(enum.Enum):
    WAKE = "wake"  # new messages were committed
    CREDENTIALS = "credentials"  # credentials were reloaded
    FLUSH = "flush"  # operator: retry everything now, re-read the outbox from the start
    RESYNC = "resync"  # operator changed the outbox (hold, release, purge, dead retry): re-read it
    STOP = "stop"


class Doorbell:
    """How commits reach the flusher: every commit is noted, but only a flusher that listens is woken.

    ``ring`` runs on the writer's loop after each commit that added messages. Waking the flusher for every
    commit cost ingest a thread switch and a wait for the GIL per batch (about a fifth of an ack's latency,
    ``bench/README.md``). A flusher that could not send new messages now (window full, every slot busy, the
    endpoint gate closed) does not listen: it reads them at its next step, which a reply or a timer brings.
    """

    def __init__(self, events: queue.SimpleQueue[Done | Signal]) -> None:
        self._events = events
        self._unread = False  # messages committed since the last ``take``
        self._listening = False

    def ring(self) -> None:
        self._unread = True  # before looking: a flusher that starts listening now sees it
        if self._listening:
            self._listening = False
            self._events.put(Signal.WAKE)

    def take(self) -> bool:
        """Whether messages were committed since the last take; call before reading the outbox."""
        unread, self._unread = self._unread, False
        return unread

    def wait(self, listen: bool, timeout: float) -> Done | Signal:
        """The next event (``queue.Empty`` after ``timeout``); a commit wakes us only if ``listen``."""
        self._listening = listen
        if listen and self._unread:  # committed between the last read and now
            self._listening = False
            return Signal.WAKE
        try:
            return self._events.get(timeout=timeout)
        finally:
            self._listening = False
