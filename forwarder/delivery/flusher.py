"""Scheduling: a bounded window of the backlog split into lanes by ordering key, many lanes at once.

At most one request is in flight per lane (per-user order). Whole-API failures close the endpoint gate
(one probe at a time until one gets through); refused credentials pause signed messages. All scheduling
state belongs to the flusher thread; worker threads only call the ``Sender`` and report back.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import queue
import random
import threading
import time

from forwarder.backoff import Backoff
from forwarder.config import Config
from forwarder.delivery.gate import EndpointGate
from forwarder.delivery.lanes import Done, Doorbell, Job, Lane, Removals, Signal
from forwarder.delivery.sender import Sender
from forwarder.logs import RateLimitedLog
from forwarder.message import QueuedMessage
from forwarder.metrics import Metrics
from forwarder.store import Outbox
from forwarder.turretio import Credentials, Dead, Delivered, PauseAuth, Result, Retry, Upstream

logger = logging.getLogger(__name__)
_NO_CREDENTIALS_LOG_EVERY = 300.0  # seconds between the repeated "no credentials" warnings


class Flusher:
    """Delivers the backlog; ``start``/``stop``/``apply``/``flush`` are safe from any thread."""

    def __init__(self, outbox: Outbox, upstream: Upstream, config: Config, metrics: Metrics,
                 credentials: Credentials | None, rng: random.Random | None = None) -> None:
        self.outbox = outbox
        self.upstream = upstream
        self.metrics = metrics
        self.last_delivery_at: float | None = None
        self._config = config
        self._credentials = credentials
        self._rng = rng or random.Random()
        self._events: queue.SimpleQueue[Done | Signal] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lanes: dict[str, Lane] = {}
        self._ready: collections.deque[Lane] = collections.deque()
        self._delayed: list[tuple[float, int, Lane]] = []
        self._parked: list[Lane] = []  # heads that need credentials we lack, or that the API refused
        self._seq = itertools.count()
        self._loaded: set[int] = set()
        self._removals = Removals()
        self._cursor = 0
        self._more = True  # the outbox may hold messages after the cursor
        self._in_flight = 0
        self._gate = EndpointGate(self._rng)
        self._auth_paused = False
        self._next_auth_probe = 0.0
        self._next_no_credentials_warning = 0.0  # monotonic
        self._stop_deadline = 0.0
        self._dead_log = RateLimitedLog(logger)
        self._sender = Sender(upstream, metrics, config.concurrency)
        self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)
        # Daemon threads: a request hanging at shutdown is abandoned (its message stays queued), never waited on.
        self._workers = [threading.Thread(target=self._work, name=f"send-{i}", daemon=True)
                         for i in range(config.concurrency)]
        self._doorbell = Doorbell(self._events)
        outbox.on_commit(self._doorbell.ring)

    def start(self) -> None:
        for worker in self._workers:
            worker.start()
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop sending; in-flight requests get ``timeout`` to finish, then are abandoned (kept queued)."""
        self._stop_deadline = time.monotonic() + timeout
        self._events.put(Signal.STOP)
        self._thread.join(timeout + 1.0)
        for _ in self._workers:
            self._jobs.put(None)

    def apply(self, config: Config, credentials: Credentials | None) -> None:
        """New reloadable settings and credentials; new credentials lift a credentials pause at once."""
        changed = credentials != self._credentials
        self._config, self._credentials = config, credentials
        if changed:
            self._events.put(Signal.CREDENTIALS)

    def flush(self) -> None:
        """Retry everything now: end every backoff (the endpoint's with a probe) and re-read the outbox."""
        self._events.put(Signal.FLUSH)

    def resync(self) -> None:
        """The outbox was changed by an operator: re-read the window so holds and retries apply."""
        self._events.put(Signal.RESYNC)

    @property
    def state(self) -> str:
        """running, backing_off, paused_auth or paused_no_credentials (the delivery_state gauge)."""
        if self._auth_paused:
            return "paused_auth"
        if self._credentials is None and self._parked:
            return "paused_no_credentials"
        if self._gate.failures:
            return "backing_off"
        return "running"

    # -- the flusher thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                stopping = self._step()
            except Exception:
                logger.exception("Flusher step failed; carrying on")
                self.metrics.internal_errors.inc()
                time.sleep(1.0)
        self._finish_in_flight()

    def _step(self) -> bool:
        """One round: refill, release due lanes, send what may be sent, wait for the next event."""
        self._refill()
        now = time.monotonic()
        self._release_delayed(now)
        self._probe_credentials(now)
        self._dispatch(now)
        self._warn_no_credentials(now)
        try:
            now = time.monotonic()
            listen = self._has_room() and self._in_flight < self._config.concurrency and not self._gate.closed(now)
            event = self._doorbell.wait(listen, self._next_timer(now))
        except queue.Empty:
            return False
        while True:
            if self._handle(event):
                return True
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return False

    def _handle(self, event: Done | Signal) -> bool:
        if isinstance(event, Done):
            self._on_done(event)
        elif event is Signal.WAKE:
            self._more = True
        elif event is Signal.CREDENTIALS:
            self._next_no_credentials_warning = 0.0  # should they go missing again, say so at once
            self._resume_credentials("credentials reloaded")
        elif event is Signal.FLUSH:
            self._flush_now()
        elif event is Signal.RESYNC:
            self._resync()
        return event is Signal.STOP

    def _finish_in_flight(self) -> None:
        while self._in_flight:
            remaining = self._stop_deadline - time.monotonic()
            if remaining <= 0:
                logger.warning("Abandoned in-flight requests at shutdown; their messages stay queued",
                               extra={"fields": {"requests": self._in_flight}})
                return
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                continue
            if isinstance(event, Done):
                self._on_done(event)

    def _next_timer(self, now: float) -> float:
        timers = [60.0]
        if self._delayed:
            timers.append(self._delayed[0][0] - now)
        gate = self._gate.timer(now)
        if gate is not None:
            timers.append(gate)
        if self._auth_paused and self._parked:
            timers.append(self._next_auth_probe - now)
        if self._credentials is None and self._parked:
            timers.append(self._next_no_credentials_warning - now)
        return max(0.0, min(timers))

    def _has_room(self) -> bool:
        """A refill is worth a read: a quarter of the window is free."""
        window = self._config.window_messages
        return window - len(self._loaded) >= max(1, window // 4)

    def _refill(self) -> None:
        self._more = self._doorbell.take() or self._more
        if not self._more or not self._has_room():
            return
        unremoved = self._removals.unsettled()
        batch = self.outbox.read_window(self._cursor, self._config.window_messages - len(self._loaded))
        self._more = batch.full
        self._cursor = max(self._cursor, batch.last_id)
        for queued in batch.messages:
            if queued.id not in self._loaded and queued.id not in unremoved:
                self._loaded.add(queued.id)
                self._enqueue(queued)

    def _enqueue(self, queued: QueuedMessage) -> None:
        key = self.upstream.ordering_key(queued.message)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(key)
        lane.messages.append(queued)
        if len(lane.messages) == 1 and not lane.busy:
            self._ready.append(lane)

    def _release_delayed(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, lane = heapq.heappop(self._delayed)
            self._ready.append(lane)

    def _dispatch(self, now: float) -> None:
        while self._ready and self._in_flight < self._config.concurrency and not self._gate.closed(now):
            lane = self._ready.popleft()
            head = lane.messages[0]
            if self._expired(head):
                self._expire(lane)
            elif self.upstream.needs_credentials(head.message) and (self._auth_paused or not self._credentials):
                self._park(lane)
            else:
                self._send(lane, head, probe=bool(self._gate.failures))

    def _expired(self, queued: QueuedMessage) -> bool:
        return time.time() - queued.enqueued_at > self._config.max_age

    def _expire(self, lane: Lane) -> None:
        self._dead_letter(lane, "expired", counts_attempt=False)

    def _dead_letter(self, lane: Lane, reason: str, status: int | None = None, response: bytes = b"",
                     counts_attempt: bool = True) -> None:
        """Move the lane's head to the dead letters and go on with its next message.

        Logged, but with a count per reason at most once a minute: a bad deploy can reject thousands.
        """
        message_id = lane.messages[0].id
        self._dead_log.warn(f"dead:{reason}", "Message moved to the dead letters; see `dead list`",
                            {"id": message_id, "reason": reason, "status": status})
        self._removals.add(message_id, self.outbox.dead_letter(message_id, reason, status, response, counts_attempt))
        self._advance(lane)

    def _send(self, lane: Lane, queued: QueuedMessage, probe: bool) -> None:
        lane.busy = lane.in_flight = True
        self._gate.probing = self._gate.probing or probe
        self._in_flight += 1
        self._jobs.put(Job(lane, queued, self._credentials, probe))

    def _park(self, lane: Lane) -> None:
        lane.busy = True
        self._parked.append(lane)

    def _warn_no_credentials(self, now: float) -> None:
        """While messages wait for credentials we lack: a warning at once, then one per interval, not per message."""
        if self._credentials is None and self._parked and now >= self._next_no_credentials_warning:
            self._next_no_credentials_warning = now + _NO_CREDENTIALS_LOG_EVERY
            logger.warning("No API credentials: signed messages wait (pre-signed ones still flow); "
                           + self.upstream.credentials_hint, extra={"fields": {"waiting_users": len(self._parked)}})

    def _probe_credentials(self, now: float) -> None:
        """While paused on refused credentials, send one parked head now and then to see if they work again."""
        if (self._auth_paused and self._parked and self._credentials and not self._gate.probing
                and now >= self._next_auth_probe and self._in_flight < self._config.concurrency):
            self._next_auth_probe = now + self._config.auth_probe_interval
            lane = self._parked.pop(0)
            if self._expired(lane.messages[0]):  # parked heads age too: never send one past max_age
                self._expire(lane)
            else:
                self._send(lane, lane.messages[0], probe=True)

    def _resume_credentials(self, why: str) -> None:
        was_paused = self._auth_paused
        self._auth_paused = False
        if was_paused:
            logger.info("Resuming signed deliveries", extra={"fields": {"reason": why}})
        self._ready.extend(self._parked)
        self._parked.clear()

    def _flush_now(self) -> None:
        logger.info("Flush requested: retrying everything now")
        self._gate.probe_now()
        self._next_auth_probe = 0.0
        self._resync()

    def _resync(self) -> None:
        """Forget the window, except heads in flight, and re-read it from the start of the outbox."""
        in_flight = {key: lane for key, lane in self._lanes.items() if lane.in_flight}
        for lane in self._lanes.values():
            for queued in list(lane.messages)[1 if lane.in_flight else 0:]:
                self._loaded.discard(queued.id)
        for lane in in_flight.values():
            lane.messages = collections.deque([lane.messages[0]])
            lane.resynced = True
        self._lanes = in_flight
        self._ready.clear()
        self._delayed.clear()
        self._parked.clear()
        self._cursor, self._more = 0, True

    def _advance(self, lane: Lane) -> None:
        """The head is done (delivered or dead-lettered): the lane's next message may go."""
        head = lane.messages.popleft()
        self._loaded.discard(head.id)
        lane.failures, lane.busy = 0, False
        if lane.messages:
            self._ready.append(lane)
        else:
            del self._lanes[lane.key]

    def _delay(self, lane: Lane, seconds: float) -> None:
        heapq.heappush(self._delayed, (time.monotonic() + seconds, next(self._seq), lane))

    # -- outcomes ------------------------------------------------------------------------------------

    def _on_done(self, done: Done) -> None:
        self._in_flight -= 1
        job, outcome = done.job, done.outcome
        job.lane.in_flight = False
        resynced, job.lane.resynced = job.lane.resynced, False
        if job.probe:
            self._gate.probing = False
        self.metrics.attempts.labels(outcome.result.value).inc()
        if isinstance(outcome, Delivered):
            self._on_delivered(job)
        elif isinstance(outcome, Dead):
            self._gate.answered(job.probe)
            self._dead_letter(job.lane, outcome.reason, outcome.status, outcome.body)
        elif resynced and not self.outbox.deliverable(job.queued.id):
            self._on_withdrawn(job, outcome)
        elif isinstance(outcome, PauseAuth):
            self._on_auth_refused(job, outcome)
        else:
            self._on_retry(job, outcome)

    def _on_delivered(self, job: Job) -> None:
        self._removals.add(job.queued.id, self.outbox.remove(job.queued.id))
        self.last_delivery_at = time.time()
        self.metrics.delivered.inc()
        self.metrics.end_to_end.observe(max(0.0, self.last_delivery_at - job.queued.enqueued_at))
        self._gate.answered(job.probe)
        if self._auth_paused and job.credentials is not None and job.credentials == self._credentials:
            self._resume_credentials("the API accepted the credentials again")
        self._advance(job.lane)

    def _on_withdrawn(self, job: Job, outcome: Retry | PauseAuth) -> None:
        """Purged or held by an operator while its request was in flight (the resync kept its lane): the
        endpoint still hears of the failure, but the message is not tried again."""
        if isinstance(outcome, Retry) and outcome.endpoint:
            self._gate.failed(outcome, job.probe, Backoff(self._config.backoff_base, self._config.backoff_cap))
        self._advance(job.lane)

    def _on_auth_refused(self, job: Job, outcome: PauseAuth) -> None:
        if job.credentials != self._credentials:  # refused with credentials that were replaced meanwhile
            job.lane.busy = False
            self._ready.append(job.lane)
            return
        if not self._auth_paused:
            logger.error("The API refused our credentials; pausing signed deliveries (nothing is dropped)",
                         extra={"fields": {"status": outcome.status}})
        self._auth_paused = True
        self._next_auth_probe = time.monotonic() + self._config.auth_probe_interval
        self._park(job.lane)

    def _on_retry(self, job: Job, outcome: Retry) -> None:
        lane, queued = job.lane, job.queued
        config = self._config
        backoff = Backoff(config.backoff_base, config.backoff_cap)
        if outcome.endpoint:
            self._gate.failed(outcome, job.probe, backoff)
        if outcome.result is Result.RATE_LIMITED:  # the API's limit, not this message's fault: no budget spent
            lane.busy = False
            self._ready.append(lane)
            return
        lane.failures += 1
        if config.max_attempts and queued.attempts + lane.failures >= config.max_attempts:
            self._dead_letter(lane, "max_attempts", response=outcome.reason.encode())
            return
        delay = max(outcome.after or 0.0, backoff.delay(lane.failures, self._rng))
        self.outbox.record_attempt(queued.id, outcome.reason, time.time() + delay)
        self._delay(lane, delay)

    # -- worker threads --------------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                outcome = self._sender.attempt(job.queued, job.credentials, self._config)
            except Exception:  # a bug must not lose the lane: report it as a retryable failure
                logger.exception("Delivery attempt failed unexpectedly")
                self.metrics.internal_errors.inc()
                outcome = Retry(Result.CONNECT, "internal error", endpoint=True)
            self._events.put(Done(job, outcome))
