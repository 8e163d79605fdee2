"""The one committer: group commit of everything that arrived while the previous commit ran.

Owns the write connection. Producers (ingest, the flusher, admin commands) submit ``Op`` values; the
writer takes all that is waiting (up to ``MAX_BATCH``), applies them in one transaction, commits (one
fsync for the whole batch), then settles each op: an ack is sent only after ``COMMIT`` returned. If the
commit fails, every put of the batch is refused with ``StorageFailed`` and nothing of it is stored.

It commits on an event loop's thread. The daemon gives it the loop ingest runs on: a message is then read,
committed and acked on one thread, with no hand-off to another thread and back (two wake-ups per ack,
and a wait for the GIL after every statement, were most of an ack's latency: ``bench/README.md``, item 6).
Batches still form: while a commit runs, the loop reads nothing, so every request that arrives meanwhile
waits in its socket and goes into the next batch. Without a loop (tools, tests) it runs a private one on
its own thread. The cost: the loop does not read while it commits, so a slow disk delays pings as well.

Ops that may wait (the delivery's removals and attempts, ``Op.may_wait``) get no commit of their own: they
ride the next one, or one ``DEFER_SECONDS`` later. One fsync per delivered message, on the loop, was a
quarter of the drain rate at concurrency 1 (``bench/README.md``, item 4); a crash now resends at most the
deliveries of the last ``DEFER_SECONDS``, with their keys.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from forwarder.errors import Refused, StorageFailed
from forwarder.logs import RateLimitedLog
from forwarder.store import schema
from forwarder.store.batch import Batch, Op
from forwarder.store.reserve import RESERVE_BYTES, RESERVE_FILE, Reserve

logger = logging.getLogger(__name__)
MAX_BATCH = 4096
_MAINTENANCE_EVERY = 30.0  # seconds between WAL truncations while the writer is idle
_RECLAIM_MIN_PAGES = 256  # free pages below which giving them back is not worth a write
_RECLAIM_STEP = 1024  # pages per incremental vacuum: bounds the work between two batches, and the WAL
KEY_RETENTION = 7 * 86400.0  # seconds an idempotency key is remembered: past any app's retry horizon
_PRUNE_STEP = 10_000  # keys looked at per pass, so a pass never holds the write lock for long
_LOCK_RETRY = 0.01  # seconds between two tries at a write lock another process holds
DEFER_SECONDS = 0.02  # the longest an op that may wait (``Op.may_wait``) waits for a commit to ride


@dataclass(frozen=True, slots=True)
class Limits:
    """Where ingest is refused with ``full``; reloadable, read once per batch."""

    max_messages: int = 1_000_000
    max_bytes: int = 1 << 30
    min_free_bytes: int = 64 << 20


@dataclass(frozen=True, slots=True)
class Stats:
    """A consistent snapshot taken right after a commit; metrics and status read this, never SQLite."""

    messages: int = 0
    bytes: int = 0
    oldest_enqueued_at: float | None = None
    dead_letters: int = 0


class Events(Protocol):
    """What the writer reports; the daemon wires it to metrics. Documented here, once."""

    def committed(self, ops: int, seconds: float) -> None:
        """A batch of ``ops`` changes was committed in ``seconds``."""

    def storage_error(self, kind: str) -> None:
        """A commit failed; ``kind`` is ``disk_full`` or ``io``."""

    def dead_letter(self, reason: str) -> None:
        """A message moved to the dead letters for ``reason``."""


class Writer:
    """The committer and the ops waiting for it."""

    def __init__(self, db_path: Path, events: Events, limits: Limits,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.limits = limits
        self._db_path = db_path
        self._events = events
        self._conn = schema.connect(db_path)
        self._conn.execute("PRAGMA busy_timeout = 0")  # never wait for a lock on the loop: see _lock_held_elsewhere
        self._locked_since: float | None = None  # monotonic: since when BEGIN finds the write lock taken
        self._lock_retry_at = 0.0
        self._waiting: collections.deque[Op] = collections.deque()  # appended from any thread
        self._scheduled = False  # a commit pass is due on the loop: one wake-up however many ops arrive
        self._deferred = False  # a pass is due in DEFER_SECONDS, for ops that may wait
        self._stopped = False
        self._retry: list[Op] = []
        self._listeners: list[Callable[[], None]] = []
        self._last_maintenance = time.monotonic()
        self._reclaim = True  # a removal was committed since the free pages were last given back
        self._reclaimed = False  # pages were given back in this round of reclaiming: truncate the WAL after
        self._reserve = Reserve(db_path.parent / RESERVE_FILE)
        self._reserve.take(self._free_bytes())  # best effort: nothing at start-up may need free space
        self.stats = self._read_stats()
        # Ours to hand out: no other process writes the data dir (its lock), and a failed batch gives none away.
        self._next_id: int = self._conn.execute(schema.NEXT_ID).fetchone()[0]
        self.commit_healthy = True  # False from a failed commit until the next successful one
        self._failures_log = RateLimitedLog(logger)
        self._prune_keys()  # keys of a daemon that was down for days go now, not at its next busy moment
        # The caller's loop, whose thread must then call ``stop``; or a private one, run by ``start``.
        self._loop = loop or asyncio.new_event_loop()
        self._thread = None if loop else threading.Thread(target=self._loop.run_forever, name="outbox-writer",
                                                          daemon=True)

    def start(self) -> None:
        """Start the private thread, if the writer has one."""
        if self._thread is not None:
            self._thread.start()

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (cheap, non-blocking) after every commit that added messages."""
        self._listeners.append(listener)

    def submit(self, op: Op) -> None:
        """Queue ``op`` for the next commit; from any thread."""
        if self._stopped:
            op.settle(StorageFailed("the outbox is closed; the daemon is stopping"))
            return
        self._waiting.append(op)
        if self._scheduled:
            return
        if not op.may_wait:
            self._scheduled = True
            call_soon_any_thread(self._loop, self._commit_waiting)
        elif not self._deferred:
            self._deferred = True
            call_soon_any_thread(self._loop, self._arm_deferred)

    def stop(self) -> None:
        """Commit everything submitted so far, then close the connection (and the private thread)."""
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
        self._stopped = True
        while self._waiting or self._retry:  # a failed batch is retried once, a locked one waits its limit
            time.sleep(max(0.0, self._lock_retry_at - time.monotonic()))
            self._commit(self._next_batch())
        self._conn.close()

    def _read_stats(self) -> Stats:
        messages, size = self._conn.execute(schema.STATS).fetchone()
        oldest = self._conn.execute(schema.OLDEST).fetchone()
        dead = self._conn.execute(schema.COUNT_DEAD).fetchone()[0]
        return Stats(messages, size, oldest[0] if oldest else None, dead)

    def _arm_deferred(self) -> None:
        self._loop.call_later(DEFER_SECONDS, self._commit_deferred)

    def _commit_deferred(self) -> None:
        """The pass for ops that may wait, unless one already due takes them along."""
        self._deferred = False
        if not self._scheduled:
            self._scheduled = True
            self._commit_waiting()

    def _commit_waiting(self) -> None:
        """One pass on the loop: commit what waits; when nothing does, one step of maintenance."""
        self._scheduled = False  # before taking the ops: one submitted from now on schedules another pass
        if self._stopped:  # a pass left on the caller's loop after ``stop`` committed everything
            return
        cut = False
        try:
            batch = self._next_batch()
            cut = len(batch) >= MAX_BATCH
            if batch:
                self._commit(batch)
            more = bool(self._waiting or self._retry) or self._maintain()
        except Exception:  # a bug in a settle or a listener: say so, and keep committing what comes next
            self.commit_healthy = False
            logger.exception("Outbox writer failed")
            more = bool(self._waiting)
        # Ops that may wait, submitted during this pass, armed the deferred pass: they wait for it, and so
        # does more maintenance. What a batch cut at MAX_BATCH or a failed commit left goes next.
        if more and not self._scheduled and (cut or self._retry or not self._deferred):
            self._scheduled = True
            delay = self._lock_retry_at - time.monotonic()
            if delay > 0:  # the batch waits for another process's write lock; ingest reads on meanwhile
                self._loop.call_later(delay, self._commit_waiting)
            else:
                self._loop.call_soon(self._commit_waiting)

    def _next_batch(self) -> list[Op]:
        batch, self._retry = self._retry, []
        waiting = self._waiting
        for _ in range(min(len(waiting), MAX_BATCH - len(batch))):
            batch.append(waiting.popleft())
        return batch

    def _commit(self, batch_ops: list[Op]) -> None:
        ops = [op for op in batch_ops if op.in_transaction]
        if ops:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                if self._lock_held_elsewhere(e):
                    self._retry = batch_ops  # all of it, in order, its tries unspent: nothing failed yet
                    return
                self._fail(ops, e)
            else:
                self._locked_since = None
                self._commit_transaction(ops)
        for op in batch_ops:
            if not op.in_transaction:
                self._run_alone(op)

    def _run_alone(self, op: Op) -> None:
        try:
            op.apply(Batch(self._conn, time.time(), self._room, self._free_bytes, self._next_id))
        except sqlite3.Error as e:
            self._fail([op], e)
            return
        op.settle(None)

    def _lock_held_elsewhere(self, error: sqlite3.OperationalError) -> bool:
        """Whether BEGIN found the write lock taken by another process and the batch should wait for it.

        Nothing else in this daemon writes, but an operator's ``sqlite3`` shell or a backup tool can. A
        BEGIN that waited for the lock (SQLite's busy timeout) would hold the event loop, and every ack,
        ping and ``status`` with it. Instead the batch is tried again every ``_LOCK_RETRY`` seconds while
        ingest reads on; after ``schema.BUSY_TIMEOUT_MS`` it fails like any commit ("database is locked").
        """
        now = time.monotonic()
        if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
            return False
        self._locked_since = self._locked_since or now
        if now - self._locked_since >= schema.BUSY_TIMEOUT_MS / 1000:
            self._locked_since = None
            return False
        self._lock_retry_at = now + _LOCK_RETRY
        return True

    def _commit_transaction(self, ops: list[Op]) -> None:
        """Apply ``ops`` inside the transaction ``_commit`` began, commit, settle them."""
        started = time.monotonic()
        batch = Batch(self._conn, time.time(), self._room, self._free_bytes, self._next_id)
        try:
            results = [self._apply(op, batch) for op in ops]
            batch.write_pending()
            if batch.messages or batch.bytes:
                self._conn.execute(schema.ADD_STATS, (batch.messages, batch.bytes))
            self._conn.execute("COMMIT")
        except Exception as e:  # sqlite3.Error, or a bug in an op: it fails this batch, never the thread
            self._rollback()
            if not isinstance(e, sqlite3.Error):
                logger.exception("A change failed inside a commit batch; the batch was rolled back")
            self._fail(ops, e)
            return
        seconds = time.monotonic() - started
        self.commit_healthy = True
        self._next_id = batch.next_id
        self._reclaim = self._reclaim or batch.removed
        self._refresh_stats(batch)
        for op, refusal in zip(ops, results, strict=True):
            op.settle(refusal)
        for reason in batch.dead_reasons:
            self._events.dead_letter(reason)
        if batch.inserted:  # not the net count: a batch of as many removals as puts still brought new ones
            for listener in self._listeners:
                listener()
        self._events.committed(len(ops), seconds)  # last, so whoever hears of it sees the stats and the settles

    @staticmethod
    def _apply(op: Op, batch: Batch) -> Refused | None:
        try:
            op.apply(batch)
        except Refused as refusal:
            return refusal
        return None

    def _free_bytes(self) -> int:
        vfs = os.statvfs(self._db_path.parent)
        return vfs.f_bavail * vfs.f_frsize

    def _room(self, messages: int, size: int, free: int) -> str | None:
        """Why ``messages`` more messages of ``size`` bytes in all would not fit, or None."""
        stats, limits = self.stats, self.limits
        if stats.messages + messages > limits.max_messages:
            return f"backlog is at its limit of {limits.max_messages} messages"
        if stats.bytes + size > limits.max_bytes:
            return f"backlog is at its limit of {limits.max_bytes} bytes"
        if free < limits.min_free_bytes:
            return f"free disk space on the data volume is below {limits.min_free_bytes} bytes"
        if not self._reserve.take(free):
            return "the data volume is full; new messages wait until removals of delivered ones free space"
        return None

    def _rollback(self) -> None:
        # Raises when there is no transaction left: SQLite already rolled back on the failed statement.
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")

    def _fail(self, ops: list[Op], error: Exception) -> None:
        kind = "disk_full" if getattr(error, "sqlite_errorname", "") == "SQLITE_FULL" else "io"
        self.commit_healthy = False
        self._events.storage_error(kind)
        # A full disk fails every batch until space is freed: one line a minute with a count, not thousands.
        self._failures_log.warn(kind, "Commit failed; the batch was rolled back and its producers refused",
                                {"kind": kind, "ops": len(ops), "error": str(error)})
        failure = StorageFailed(f"{'disk full' if kind == 'disk_full' else 'storage error'}: {error}")
        if kind == "disk_full" and any(op.frees_space for op in ops) and self._reserve.release():
            logger.warning("The data volume is full: released the outbox's reserve, so that delivered "
                           "messages can still be removed; new ones are refused until there is room",
                           extra={"fields": {"reserve_bytes": RESERVE_BYTES}})
        for op in ops:
            op.tries += 1
            if op.retry_on_failure and op.tries < 2:
                self._retry.append(op)
            else:
                op.settle(failure)

    def _refresh_stats(self, batch: Batch) -> None:
        old = self.stats
        oldest = old.oldest_enqueued_at
        if batch.removed or oldest is None:
            row = self._conn.execute(schema.OLDEST).fetchone()
            oldest = row[0] if row else None
        self.stats = Stats(old.messages + batch.messages, old.bytes + batch.bytes, oldest,
                           old.dead_letters + batch.dead_delta)

    def _maintain(self) -> bool:
        """When nothing waits: give freed pages back, and now and then truncate the WAL; True for another step."""
        try:
            if self._reclaim and self._reclaim_step():
                return True
            if time.monotonic() - self._last_maintenance >= _MAINTENANCE_EVERY:
                self._last_maintenance = time.monotonic()
                self._prune_keys()
                self.truncate_wal()
        except sqlite3.Error as e:
            self._failures_log.warn("maintenance", "Outbox maintenance failed; will try again",
                                    {"error": str(e)})
        return False

    def _prune_keys(self) -> None:
        """Forget idempotency keys older than ``KEY_RETENTION``, one bounded step per call (best effort).

        Without this the key table would grow with every keyed message for the life of the data dir. A
        failure (the volume is full, say) only postpones the pruning: it never stops the writer.
        """
        try:
            self._conn.execute(schema.PRUNE_KEYS, (time.time() - KEY_RETENTION, _PRUNE_STEP))
        except sqlite3.Error as e:
            self._failures_log.warn("maintenance", "Pruning old idempotency keys failed; will try again",
                                    {"error": str(e)})

    def truncate_wal(self) -> bool:
        """Checkpoint the WAL and truncate it, unless a reader needs it: False then, and no wait.

        A reader inside a transaction on an older snapshot (``check`` on a large file, say) would make a
        TRUNCATE checkpoint wait, and on the daemon's event loop every ack and ping would wait with it: the
        writer's connection has no busy timeout, and maintenance tries again at its next turn instead.
        """
        return not self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]

    def _reclaim_step(self) -> bool:
        """Return the pages of removed messages to the filesystem, one bounded step; True if it took one.

        Only once free pages are at least half the file: new messages reuse free pages, so a busy backlog
        needs nothing, while a drained one (after an outage) shrinks to its live pages. A step relocates
        at most ``_RECLAIM_STEP`` pages from the end of the file; a batch that arrives waits one step at most.
        ``executescript``, because ``execute`` steps ``incremental_vacuum`` once, which frees a single page.
        """
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        if free < _RECLAIM_MIN_PAGES or 2 * free < self._conn.execute("PRAGMA page_count").fetchone()[0]:
            self._reclaim = False
            if self._reclaimed:  # the file is down to its live pages: the WAL too
                self._reclaimed = False
                self.truncate_wal()
            return False
        self._conn.executescript(f"PRAGMA incremental_vacuum({_RECLAIM_STEP})")
        self._reclaimed = True
        return True


def call_soon_any_thread(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """Schedule ``callback`` on ``loop``: a plain ``call_soon`` on its own thread (no wake-up write)."""
    try:
        on_loop = asyncio.get_running_loop() is loop
    except RuntimeError:  # no loop runs on this thread
        on_loop = False
    (loop.call_soon if on_loop else loop.call_soon_threadsafe)(callback)
