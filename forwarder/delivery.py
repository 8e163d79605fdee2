"""The flusher: replays the outbox to the upstream over HTTPS, in per-user order, many users at once.

Owns scheduling (a bounded window of the backlog split into lanes by ordering key; at most one request
in flight per lane), the endpoint gate (whole-API failures back off the endpoint, with one probe at a
time), the credential pause, and sending. It is the only module that imports ``requests``, and
``_transport_outcome`` is the one place a ``requests`` exception becomes an ``Outcome``. What a response
means is the upstream's business (``turretio.Upstream.classify``); delivery never sees a path or header.
All scheduling state belongs to the flusher thread; worker threads only send and report.
"""

from __future__ import annotations

import collections
import enum
import errno
import heapq
import itertools
import logging
import queue
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import requests
from requests.adapters import HTTPAdapter

from forwarder.backoff import Backoff
from forwarder.config import Config
from forwarder.message import QueuedMessage
from forwarder.metrics import Metrics
from forwarder.store import Outbox
from forwarder.turretio import Credentials, Dead, Delivered, Outcome, PauseAuth, Result, Retry, Upstream

logger = logging.getLogger(__name__)
_NO_CREDENTIALS_LOG_EVERY = 300.0  # seconds between the repeated "no credentials" warnings


@dataclass(eq=False)
class _Lane:
    """One ordering key's messages, in id order; only the head is ever in flight."""

    key: str
    messages: collections.deque[QueuedMessage] = field(default_factory=collections.deque)
    failures: int = 0  # consecutive message-level failures of the head, for its backoff
    busy: bool = False  # head in flight, delayed, or parked: not in the ready queue
    in_flight: bool = False


@dataclass(frozen=True, slots=True)
class _Job:
    lane: _Lane
    queued: QueuedMessage
    credentials: Credentials | None
    probe: bool  # sent while the endpoint gate or the credentials pause allows one request at a time


@dataclass(frozen=True, slots=True)
class _Done:
    job: _Job
    outcome: Outcome


class _Signal(enum.Enum):
    WAKE = "wake"  # new messages were committed
    CREDENTIALS = "credentials"  # credentials were reloaded
    FLUSH = "flush"  # operator: retry everything now, re-read the outbox from the start
    RESYNC = "resync"  # operator changed the outbox (hold, release, purge, dead retry): re-read it
    STOP = "stop"


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
        self._events: queue.SimpleQueue[_Done | _Signal] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lanes: dict[str, _Lane] = {}
        self._ready: collections.deque[_Lane] = collections.deque()
        self._delayed: list[tuple[float, int, _Lane]] = []
        self._parked: list[_Lane] = []  # heads that need credentials we lack, or that the API refused
        self._seq = itertools.count()
        self._loaded: set[int] = set()
        self._cursor = 0
        self._more = True  # the outbox may hold messages after the cursor
        self._in_flight = 0
        self._gate_until = 0.0  # monotonic; after it, one probe at a time until one gets through
        self._gate_failures = 0
        self._gate_since = 0.0
        self._probing = False
        self._auth_paused = False
        self._next_auth_probe = 0.0
        self._no_credentials_logged_at = -_NO_CREDENTIALS_LOG_EVERY
        self._stop_deadline = 0.0
        self._session = _session(config.concurrency)
        self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)
        # Daemon threads: a request hanging at shutdown is abandoned (its message stays queued), never waited on.
        self._workers = [threading.Thread(target=self._work, name=f"send-{i}", daemon=True)
                         for i in range(config.concurrency)]
        outbox.on_commit(lambda: self._events.put(_Signal.WAKE))

    def start(self) -> None:
        for worker in self._workers:
            worker.start()
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop sending; in-flight requests get ``timeout`` to finish, then are abandoned (kept queued)."""
        self._stop_deadline = time.monotonic() + timeout
        self._events.put(_Signal.STOP)
        self._thread.join(timeout + 1.0)
        for _ in self._workers:
            self._jobs.put(None)

    def apply(self, config: Config, credentials: Credentials | None) -> None:
        """New reloadable settings and credentials; new credentials lift a credentials pause at once."""
        changed = credentials != self._credentials
        self._config, self._credentials = config, credentials
        if changed:
            self._events.put(_Signal.CREDENTIALS)

    def flush(self) -> None:
        """Retry everything now: forget every backoff and re-read the outbox."""
        self._events.put(_Signal.FLUSH)

    def resync(self) -> None:
        """The outbox was changed by an operator: re-read the window so holds and retries apply."""
        self._events.put(_Signal.RESYNC)

    @property
    def state(self) -> str:
        """running, backing_off, paused_auth or paused_no_credentials (the delivery_state gauge)."""
        if self._auth_paused:
            return "paused_auth"
        if self._credentials is None and self._parked:
            return "paused_no_credentials"
        if self._gate_failures:
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
        try:
            event = self._events.get(timeout=self._next_timer(time.monotonic()))
        except queue.Empty:
            return False
        while True:
            if self._handle(event):
                return True
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return False

    def _handle(self, event: _Done | _Signal) -> bool:
        if isinstance(event, _Done):
            self._on_done(event)
        elif event is _Signal.WAKE:
            self._more = True
        elif event is _Signal.CREDENTIALS:
            self._resume_credentials("credentials reloaded")
        elif event is _Signal.FLUSH:
            self._flush_now()
        elif event is _Signal.RESYNC:
            self._resync()
        return event is _Signal.STOP

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
            if isinstance(event, _Done):
                self._on_done(event)

    def _next_timer(self, now: float) -> float:
        timers = [60.0]
        if self._delayed:
            timers.append(self._delayed[0][0] - now)
        if self._gate_failures and not self._probing:
            timers.append(self._gate_until - now)
        if self._auth_paused and self._parked:
            timers.append(self._next_auth_probe - now)
        return max(0.0, min(timers))

    def _refill(self) -> None:
        window = self._config.window_messages
        room = window - len(self._loaded)
        if not self._more or room < max(1, window // 4):
            return
        batch = self.outbox.read_window(self._cursor, room)
        self._more = batch.full
        self._cursor = max(self._cursor, batch.last_id)
        for queued in batch.messages:
            if queued.id not in self._loaded:
                self._loaded.add(queued.id)
                self._enqueue(queued)

    def _enqueue(self, queued: QueuedMessage) -> None:
        key = self.upstream.ordering_key(queued.message)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key)
        lane.messages.append(queued)
        if len(lane.messages) == 1 and not lane.busy:
            self._ready.append(lane)

    def _release_delayed(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, lane = heapq.heappop(self._delayed)
            self._ready.append(lane)

    def _gate_closed(self, now: float) -> bool:
        return bool(self._gate_failures) and (now < self._gate_until or self._probing)

    def _dispatch(self, now: float) -> None:
        while self._ready and self._in_flight < self._config.concurrency and not self._gate_closed(now):
            lane = self._ready.popleft()
            head = lane.messages[0]
            if self._expired(head):
                self.outbox.dead_letter(head.id, "expired", counts_attempt=False)
                self._advance(lane)
            elif self.upstream.needs_credentials(head.message) and (self._auth_paused or not self._credentials):
                self._park(lane)
            else:
                self._send(lane, head, probe=bool(self._gate_failures))

    def _expired(self, queued: QueuedMessage) -> bool:
        return time.time() - queued.enqueued_at > self._config.max_age

    def _send(self, lane: _Lane, queued: QueuedMessage, probe: bool) -> None:
        lane.busy = lane.in_flight = True
        self._probing = self._probing or probe
        self._in_flight += 1
        self._jobs.put(_Job(lane, queued, self._credentials, probe))

    def _park(self, lane: _Lane) -> None:
        lane.busy = True
        self._parked.append(lane)
        if self._credentials is None:
            self._log_no_credentials()

    def _log_no_credentials(self) -> None:
        now = time.monotonic()
        if now - self._no_credentials_logged_at >= _NO_CREDENTIALS_LOG_EVERY:
            self._no_credentials_logged_at = now
            logger.warning("No API credentials: signed messages wait (pre-signed ones still flow); set "
                           "TURRET_API_KEY/TURRET_API_SECRET or their _FILE variants",
                           extra={"fields": {"waiting_users": len(self._parked)}})

    def _probe_credentials(self, now: float) -> None:
        """While paused on refused credentials, send one parked head now and then to see if they work again."""
        if (self._auth_paused and self._parked and self._credentials and not self._probing
                and now >= self._next_auth_probe and self._in_flight < self._config.concurrency):
            self._next_auth_probe = now + self._config.auth_probe_interval
            lane = self._parked.pop(0)
            self._send(lane, lane.messages[0], probe=True)

    def _resume_credentials(self, why: str) -> None:
        was_paused = self._auth_paused
        self._auth_paused = False
        if was_paused:
            logger.info("Resuming signed deliveries", extra={"fields": {"reason": why}})
        for lane in self._parked:
            self._ready.append(lane)
        self._parked.clear()

    def _flush_now(self) -> None:
        logger.info("Flush requested: retrying everything now")
        self._gate_failures, self._gate_until, self._next_auth_probe = 0, 0.0, 0.0
        self._resync()

    def _resync(self) -> None:
        """Forget the window, except heads in flight, and re-read it from the start of the outbox."""
        in_flight = {key: lane for key, lane in self._lanes.items() if lane.in_flight}
        for lane in self._lanes.values():
            for queued in list(lane.messages)[1 if lane.in_flight else 0:]:
                self._loaded.discard(queued.id)
        for lane in in_flight.values():
            lane.messages = collections.deque([lane.messages[0]])
        self._lanes = in_flight
        self._ready.clear()
        self._delayed.clear()
        self._parked.clear()
        self._cursor, self._more = 0, True

    def _advance(self, lane: _Lane) -> None:
        """The head is done (delivered or dead-lettered): the lane's next message may go."""
        head = lane.messages.popleft()
        self._loaded.discard(head.id)
        lane.failures, lane.busy = 0, False
        if lane.messages:
            self._ready.append(lane)
        else:
            del self._lanes[lane.key]

    def _delay(self, lane: _Lane, seconds: float) -> None:
        heapq.heappush(self._delayed, (time.monotonic() + seconds, next(self._seq), lane))

    # -- outcomes ------------------------------------------------------------------------------------

    def _on_done(self, done: _Done) -> None:
        self._in_flight -= 1
        job, outcome = done.job, done.outcome
        job.lane.in_flight = False
        if job.probe:
            self._probing = False
        self.metrics.attempts.labels(outcome.result.value).inc()
        if isinstance(outcome, Delivered):
            self._on_delivered(job)
        elif isinstance(outcome, Dead):
            self._endpoint_ok()
            self.outbox.dead_letter(job.queued.id, outcome.reason, outcome.status, outcome.body)
            self._advance(job.lane)
        elif isinstance(outcome, PauseAuth):
            self._on_auth_refused(job, outcome)
        else:
            self._on_retry(job, outcome)

    def _on_delivered(self, job: _Job) -> None:
        self.outbox.remove(job.queued.id)
        self.last_delivery_at = time.time()
        self.metrics.delivered.inc()
        self.metrics.end_to_end.observe(max(0.0, self.last_delivery_at - job.queued.enqueued_at))
        self._endpoint_ok()
        if self._auth_paused and job.credentials is not None and job.credentials == self._credentials:
            self._resume_credentials("the API accepted the credentials again")
        self._advance(job.lane)

    def _endpoint_ok(self) -> None:
        if self._gate_failures:
            logger.info("Upstream reachable again", extra={"fields": {
                "failed_attempts": self._gate_failures, "seconds": round(time.monotonic() - self._gate_since, 1)}})
        self._gate_failures, self._gate_until = 0, 0.0

    def _on_auth_refused(self, job: _Job, outcome: PauseAuth) -> None:
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

    def _on_retry(self, job: _Job, outcome: Retry) -> None:
        lane, queued = job.lane, job.queued
        config = self._config
        backoff = Backoff(config.backoff_base, config.backoff_cap)
        if outcome.endpoint:
            self._close_gate(outcome, backoff)
        if outcome.result is Result.RATE_LIMITED:  # the API's limit, not this message's fault: no budget spent
            lane.busy = False
            self._ready.append(lane)
            return
        lane.failures += 1
        if config.max_attempts and queued.attempts + lane.failures >= config.max_attempts:
            self.outbox.dead_letter(queued.id, "max_attempts", response=outcome.reason.encode())
            self._advance(lane)
            return
        delay = max(outcome.after or 0.0, backoff.delay(lane.failures, self._rng))
        self.outbox.record_attempt(queued.id, outcome.reason, time.time() + delay)
        self._delay(lane, delay)

    def _close_gate(self, outcome: Retry, backoff: Backoff) -> None:
        now = time.monotonic()
        if not self._gate_failures:
            self._gate_since = now
            logger.warning("Upstream failing; backing off the endpoint (messages are kept)",
                           extra={"fields": {"result": outcome.result.value, "reason": outcome.reason}})
        self._gate_failures += 1
        delay = outcome.after if outcome.after is not None else backoff.delay(self._gate_failures, self._rng)
        self._gate_until = max(self._gate_until, now + delay)

    # -- worker threads --------------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                outcome = self._attempt(job)
            except Exception:  # a bug must not lose the lane: report it as a retryable failure
                logger.exception("Delivery attempt failed unexpectedly")
                self.metrics.internal_errors.inc()
                outcome = Retry(Result.CONNECT, "internal error", endpoint=True)
            self._events.put(_Done(job, outcome))

    def _attempt(self, job: _Job) -> Outcome:
        config = self._config
        request = self.upstream.build_request(job.queued, job.credentials, time.time())
        started = time.monotonic()
        try:
            with self._session.post(
                config.api_url + request.path, data=request.body, headers=request.headers,
                timeout=(config.connect_timeout, config.read_timeout), allow_redirects=False, stream=True,
                # Per request, not on the session: requests lets REQUESTS_CA_BUNDLE override Session.verify.
                verify=str(config.ca_file) if config.ca_file else True,
            ) as response:
                body = _read_capped(response)
                status, headers = response.status_code, response.headers
        except requests.RequestException as error:
            return _transport_outcome(error)
        finally:
            self.metrics.request_duration.observe(time.monotonic() - started)
        return self.upstream.classify(job.queued.message, status, headers, body, time.time())


def _session(concurrency: int) -> requests.Session:
    """One keep-alive pool sized to the concurrency; retries are ours, never urllib3's (it skips POST)."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=concurrency, max_retries=0, pool_block=False)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


_MAX_RESPONSE_BYTES = 65536


def _read_capped(response: requests.Response) -> bytes:
    """The response body up to a bound: a misbehaving server cannot make us buffer gigabytes."""
    chunks, size = [], 0
    for chunk in response.iter_content(8192):
        chunks.append(chunk)
        size += len(chunk)
        if size >= _MAX_RESPONSE_BYTES:
            break
    return b"".join(chunks)[:_MAX_RESPONSE_BYTES]


def _transport_outcome(error: requests.RequestException) -> Retry:
    """The one place a ``requests`` exception becomes an ``Outcome``; the reason never holds the URL."""
    causes = list(_causes(error))
    if isinstance(error, requests.exceptions.SSLError) or any(isinstance(c, ssl.SSLError) for c in causes):
        tls = next((c for c in causes if isinstance(c, ssl.SSLError)), None)
        return Retry(Result.TLS, f"tls: {getattr(tls, 'reason', None) or 'handshake failed'}", endpoint=True)
    if isinstance(error, requests.Timeout) or any(isinstance(c, TimeoutError) for c in causes):
        return Retry(Result.TIMEOUT, "timeout", endpoint=True)
    return Retry(Result.CONNECT, _connect_reason(causes), endpoint=True)


def _connect_reason(causes: list[BaseException]) -> str:
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            return "dns lookup failed"
        if isinstance(cause, OSError) and cause.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
            return "connection refused" if cause.errno == errno.ECONNREFUSED else "connection reset"
    return "connection failed"


def _causes(error: BaseException) -> list[BaseException]:
    """The exception and everything it wraps (urllib3 nests the real cause a few levels down)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [error]
    while todo and len(seen) < 16:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo += [e for e in (current.__cause__, current.__context__, getattr(current, "reason", None),
                             *current.args) if isinstance(e, BaseException)]
    return seen
