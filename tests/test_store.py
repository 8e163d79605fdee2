"""Tests of forwarder.store in-process: pragmas, group commit, failed batches, limits, stats, corrupt rows.

Each test opens its own ``Outbox`` on a temporary data dir. ``_Recorder`` is an ``Events`` that counts
commits and can hold the writer thread inside a commit, so that what producers submit meanwhile is
known to form the next batch: batching is asserted exactly, not hoped for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.errors import AlreadyRunning, OutboxFull, Refused, StorageFailed
from forwarder.message import Kind, Message
from forwarder.store import Limits, Outbox, Stats, open_readonly, read_stats, schema
from forwarder.store.writer import DEFER_SECONDS, KEY_RETENTION
from tests.test_ingest import stored_ids

WAIT = 20.0  # seconds; only a bound on a wait for an event, never a measurement


class _Recorder:
    """An ``Events`` that records what the writer reports; ``hold()`` parks it in the next commit."""

    def __init__(self) -> None:
        self.commits: list[int] = []
        self.storage_errors: list[str] = []
        self.dead_letters: list[str] = []
        self._changed = threading.Condition()
        self._release: threading.Event | None = None
        self.holding = threading.Event()

    def committed(self, ops: int, seconds: float) -> None:
        with self._changed:
            self.commits.append(ops)
            self._changed.notify_all()
        release, self._release = self._release, None
        if release is not None:
            self.holding.set()
            assert release.wait(WAIT)

    def storage_error(self, kind: str) -> None:
        self.storage_errors.append(kind)

    def dead_letter(self, reason: str) -> None:
        self.dead_letters.append(reason)

    def hold(self) -> threading.Event:
        """Park the writer after its next commit until the returned event is set."""
        self._release = threading.Event()
        return self._release

    def wait_for_ops(self, total: int) -> None:
        """Wait until ``total`` ops in all were committed (for ops nobody waits on, like removals)."""
        with self._changed:
            assert self._changed.wait_for(lambda: sum(self.commits) >= total, WAIT), self.commits


@pytest.fixture
def recorder() -> _Recorder:
    return _Recorder()


@pytest.fixture
def outbox(data_dir: Path, recorder: _Recorder) -> Iterator[Outbox]:
    with Outbox(data_dir, events=recorder) as opened:
        yield opened


def _message(n: int, key: str | None = None) -> Message:
    body = {"email": f"user{n}@example.com", "attributes": {"n": str(n)}, "properties": {}}
    return Message(Kind.SET, body, key)


def _submit(outbox: Outbox, message: Message) -> concurrent.futures.Future[int | Refused]:
    """Put without waiting; the future resolves when the writer settles the put."""
    future: concurrent.futures.Future[int | Refused] = concurrent.futures.Future()
    outbox.put(message, future.set_result)
    return future


def _put(outbox: Outbox, message: Message) -> int | Refused:
    return _submit(outbox, message).result(WAIT)


def _size(message: Message) -> int:
    return len(schema.encode_record(message.to_record()))


def _disk_stats(data_dir: Path) -> Stats:
    conn = open_readonly(data_dir)
    try:
        return read_stats(conn)
    finally:
        conn.close()


def _execute(data_dir: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Run one statement on a connection of the test's own, as another process could."""
    conn = sqlite3.connect(data_dir / schema.DB_FILE, isolation_level=None)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_writer_connection_is_wal_with_synchronous_full(outbox: Outbox) -> None:
    conn = outbox._writer._conn
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,)


def test_pragmas_hold_again_after_a_reopen(data_dir: Path) -> None:
    Outbox(data_dir).close()
    with Outbox(data_dir) as reopened:
        conn = reopened._writer._conn
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental


def test_put_returns_the_id_after_the_commit_and_the_message_reads_back(outbox: Outbox,
                                                                          data_dir: Path) -> None:
    assert _put(outbox, _message(1)) == 1
    assert _put(outbox, _message(2)) == 2
    assert stored_ids(data_dir) == [1, 2]
    window = outbox.read_window(0, 10)
    assert [(q.id, q.message, q.attempts, q.size) for q in window.messages] == [
        (1, Message(Kind.SET, _message(1).body), 0, _size(_message(1))),
        (2, Message(Kind.SET, _message(2).body), 0, _size(_message(2)))]
    assert (window.last_id, window.full) == (2, False)


def test_read_window_pages_after_an_id(outbox: Outbox) -> None:
    for n in range(1, 4):
        assert _put(outbox, _message(n)) == n
    first = outbox.read_window(0, 2)
    assert ([q.id for q in first.messages], first.last_id, first.full) == ([1, 2], 2, True)
    rest = outbox.read_window(first.last_id, 2)
    assert ([q.id for q in rest.messages], rest.last_id, rest.full) == ([3], 3, False)
    empty = outbox.read_window(rest.last_id, 2)
    assert (empty.messages, empty.last_id, empty.full) == ([], 3, False)


def test_group_commit_puts_everything_submitted_during_a_commit_into_the_next_one(
        outbox: Outbox, recorder: _Recorder) -> None:
    futures: list[concurrent.futures.Future[int | Refused]] = []
    lock = threading.Lock()

    def produce(thread: int) -> None:
        for n in range(100):
            future = _submit(outbox, _message(thread * 1000 + n))
            with lock:
                futures.append(future)

    with _one_batch(outbox, recorder):
        producers = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
        for producer in producers:
            producer.start()
        for producer in producers:
            producer.join()
    ids = {future.result(WAIT) for future in futures}
    assert ids == set(range(2, 802))  # 1 is the parked message
    assert recorder.commits == [1, 800]  # 801 puts, 2 commits: 2 fsyncs instead of 801
    assert outbox.stats.messages == 801


def test_failed_commit_refuses_every_put_of_its_batch_and_stores_none(
        outbox: Outbox, recorder: _Recorder, data_dir: Path) -> None:
    assert _put(outbox, _message(1)) == 1
    # An honest SQLite error inside the transaction: a trigger aborts the insert of a marked message.
    _execute(data_dir, f"""CREATE TRIGGER poison BEFORE INSERT ON {schema.TABLE}
        WHEN CAST(NEW.data AS TEXT) LIKE '%poison%' BEGIN SELECT RAISE(ABORT, 'injected failure'); END""")
    with _one_batch(outbox, recorder):
        batch = [_submit(outbox, message) for message in (_message(3), _poisoned(4), _message(5))]
    refusals = [future.result(WAIT) for future in batch]
    assert [type(refusal) for refusal in refusals] == [StorageFailed] * 3
    assert all(str(refusal) == "storage error: injected failure" for refusal in refusals)
    assert recorder.storage_errors == ["io"]
    assert outbox.commit_healthy is False
    assert stored_ids(data_dir) == [1, 2]  # 2 is the parked message, committed before the failed batch
    assert outbox.stats.messages == _disk_stats(data_dir).messages == 2
    assert _put(outbox, _message(6)) == 3
    assert outbox.commit_healthy is True


def test_a_change_that_raises_fails_its_batch_and_the_writer_carries_on(
        outbox: Outbox, recorder: _Recorder, data_dir: Path) -> None:
    # A key SQLite cannot encode (ingest refuses it; this goes around ingest) raises UnicodeEncodeError.
    with _one_batch(outbox, recorder):
        batch = [_submit(outbox, message) for message in (_message(3), _message(4, key="\ud800"))]
    assert [type(future.result(WAIT)) for future in batch] == [StorageFailed] * 2
    assert outbox.commit_healthy is False
    assert _put(outbox, _message(5)) == 2  # 1 is the parked message
    assert outbox.commit_healthy is True
    assert stored_ids(data_dir) == [1, 2]


def _poisoned(n: int) -> Message:
    return Message(Kind.SET, {"email": f"user{n}@example.com", "attributes": {"marker": "poison"},
                              "properties": {}})


@contextlib.contextmanager
def _one_batch(outbox: Outbox, recorder: _Recorder) -> Iterator[None]:
    """Whatever is submitted inside the block forms exactly one batch: the writer is parked meanwhile.

    It is parked after committing one extra message, ``_message(-1)``, which takes the next id.
    """
    release = recorder.hold()
    parked = _submit(outbox, _message(-1))
    assert recorder.holding.wait(WAIT)
    recorder.holding.clear()
    yield
    release.set()
    assert isinstance(parked.result(WAIT), int)


def test_full_outbox_refuses_new_messages_and_keeps_what_is_stored(data_dir: Path) -> None:
    with Outbox(data_dir, limits=Limits(max_messages=2)) as outbox:
        assert _put(outbox, _message(1)) == 1
        assert _put(outbox, _message(2)) == 2
        refusal = _put(outbox, _message(3))
        assert isinstance(refusal, OutboxFull)
        assert str(refusal) == "backlog is at its limit of 2 messages"
        assert stored_ids(data_dir) == [1, 2]
        assert outbox.stats.messages == 2
        outbox.limits = Limits(max_messages=3)  # reloadable: read once per batch
        assert _put(outbox, _message(3)) == 3


def test_limit_is_counted_within_one_batch(data_dir: Path, recorder: _Recorder) -> None:
    with Outbox(data_dir, events=recorder, limits=Limits(max_messages=3)) as outbox:
        with _one_batch(outbox, recorder):
            batch = [_submit(outbox, _message(n)) for n in range(1, 5)]
        results = [future.result(WAIT) for future in batch]
        assert results[:2] == [2, 3]
        assert [type(result) for result in results[2:]] == [OutboxFull, OutboxFull]
        assert recorder.commits == [1, 4]  # the refusals did not fail the batch
        assert stored_ids(data_dir) == [1, 2, 3]


def test_byte_limit_refuses_the_message_that_would_cross_it(data_dir: Path) -> None:
    limit = _size(_message(1)) + _size(_message(2))
    with Outbox(data_dir, limits=Limits(max_bytes=limit)) as outbox:
        assert _put(outbox, _message(1)) == 1
        assert _put(outbox, _message(2)) == 2
        refusal = _put(outbox, _message(3))
        assert isinstance(refusal, OutboxFull)
        assert str(refusal) == f"backlog is at its limit of {limit} bytes"
        assert outbox.stats.bytes == limit


def test_free_disk_floor_refuses_new_messages(data_dir: Path) -> None:
    with Outbox(data_dir, limits=Limits(min_free_bytes=1 << 62)) as outbox:
        refusal = _put(outbox, _message(1))
        assert isinstance(refusal, OutboxFull)
        assert str(refusal) == f"free disk space on the data volume is below {1 << 62} bytes"
        assert stored_ids(data_dir) == []


def test_stats_follow_puts_and_removals(outbox: Outbox, recorder: _Recorder, data_dir: Path) -> None:
    assert outbox.stats == Stats(0, 0, None, 0)
    before = time.time()
    for n in range(1, 4):
        assert _put(outbox, _message(n)) == n
    after = time.time()
    queued = outbox.read_window(0, 10).messages
    sizes = [_size(_message(n)) for n in range(1, 4)]
    assert before <= queued[0].enqueued_at <= queued[1].enqueued_at <= after
    assert outbox.stats == Stats(3, sum(sizes), queued[0].enqueued_at, 0)
    assert _disk_stats(data_dir) == outbox.stats

    outbox.remove(1)
    outbox.remove(99)  # not there: changes nothing
    recorder.wait_for_ops(5)
    assert outbox.stats == Stats(2, sizes[1] + sizes[2], queued[1].enqueued_at, 0)
    assert _disk_stats(data_dir) == outbox.stats

    outbox.remove(2)
    outbox.remove(3)
    recorder.wait_for_ops(7)
    assert outbox.stats == Stats(0, 0, None, 0)
    assert _disk_stats(data_dir) == outbox.stats


def test_removals_in_one_batch_of_any_size_leave_exactly_the_rest_and_its_stats(
        outbox: Outbox, recorder: _Recorder, data_dir: Path) -> None:
    """Removals are written in chunks of power-of-two sizes: 300 crosses several, with a retry and strays."""
    ids = [_submit(outbox, _message(n)) for n in range(1, 401)]
    assert [future.result(WAIT) for future in ids] == list(range(1, 401))
    outbox.record_attempt(5, "HTTP 503")  # delivery state that must leave with its message
    with _one_batch(outbox, recorder):  # the parked message takes id 401
        for message_id in [*range(1, 301), 5, 999]:  # 5 twice (a redelivery), 999 not there
            outbox.remove(message_id)
        kept = _submit(outbox, _message(402))
    assert kept.result(WAIT) == 402
    recorder.wait_for_ops(400 + 2 + 302 + 1)
    assert stored_ids(data_dir) == list(range(301, 403))
    rest = [_message(n) for n in range(301, 401)] + [_message(-1), _message(402)]
    assert (outbox.stats.messages, outbox.stats.bytes) == (102, sum(_size(m) for m in rest))
    assert _disk_stats(data_dir) == outbox.stats
    assert _execute(data_dir, "SELECT count(*) FROM message_state") == [(0,)]


def test_ids_of_removed_newest_messages_are_never_given_again_nor_after_a_reopen(data_dir: Path) -> None:
    recorder = _Recorder()
    with Outbox(data_dir, events=recorder) as outbox:
        assert [_put(outbox, _message(n)) for n in range(1, 4)] == [1, 2, 3]
        outbox.remove(3)
        outbox.remove(2)
        recorder.wait_for_ops(5)
        assert _put(outbox, _message(4)) == 4
        outbox.remove(4)
        recorder.wait_for_ops(7)
    with Outbox(data_dir) as reopened:
        assert _put(reopened, _message(5)) == 5
    assert stored_ids(data_dir) == [1, 5]


def test_stats_survive_a_reopen(data_dir: Path) -> None:
    with Outbox(data_dir) as outbox:
        assert _put(outbox, _message(1)) == 1
        stats = outbox.stats
    with Outbox(data_dir) as reopened:
        assert reopened.stats == stats == Stats(1, _size(_message(1)), stats.oldest_enqueued_at, 0)


@pytest.mark.parametrize("corrupt", [b"\xff\xfe not even UTF-8", b"not json", b'["a", "list"]',
                                     b'{"kind": "delete"}', b'{"kind": "set", "email": "a@b.c"}'])
def test_corrupt_row_is_dead_lettered_and_the_rows_around_it_are_delivered(
        outbox: Outbox, recorder: _Recorder, data_dir: Path, corrupt: bytes) -> None:
    for n in range(1, 4):
        assert _put(outbox, _message(n)) == n
    size = _size(_message(2))
    # Same length, so the byte counter stays exact: JSON allows the trailing spaces.
    _execute(data_dir, f"UPDATE {schema.TABLE} SET data = ? WHERE _id = 2", corrupt.ljust(size))
    window = outbox.read_window(0, 10)
    assert [q.id for q in window.messages] == [1, 3]
    assert (window.last_id, window.full) == (3, False)
    recorder.wait_for_ops(4)
    assert recorder.dead_letters == ["corrupt"]
    assert outbox.stats == Stats(2, _size(_message(1)) + _size(_message(3)),
                                 window.messages[0].enqueued_at, 1)
    assert _disk_stats(data_dir) == outbox.stats
    assert stored_ids(data_dir) == [1, 3]
    dead = _execute(data_dir, "SELECT message_id, data, reason, attempts FROM dead_letters")
    assert dead == [(2, corrupt.ljust(size), "corrupt", 0)]


def test_same_idempotency_key_stores_one_message(outbox: Outbox, data_dir: Path) -> None:
    assert _put(outbox, _message(1, key="signup-1")) == 1
    assert _put(outbox, _message(2, key="signup-1")) == 1
    assert _put(outbox, _message(3, key="signup-2")) == 2
    assert stored_ids(data_dir) == [1, 2]
    assert outbox.stats.messages == 2


def test_same_idempotency_key_twice_in_one_batch_stores_one_message(
        outbox: Outbox, recorder: _Recorder, data_dir: Path) -> None:
    with _one_batch(outbox, recorder):
        batch = [_submit(outbox, message)
                 for message in (_message(1, key="k"), _message(2, key="k"), _message(3))]
    assert [future.result(WAIT) for future in batch] == [2, 2, 3]
    assert recorder.commits == [1, 3]
    assert stored_ids(data_dir) == [1, 2, 3]


def test_idempotency_key_is_remembered_across_a_reopen(data_dir: Path) -> None:
    with Outbox(data_dir) as outbox:
        assert _put(outbox, _message(1, key="k")) == 1
    with Outbox(data_dir) as reopened:
        assert _put(reopened, _message(1, key="k")) == 1
        assert stored_ids(data_dir) == [1]


def test_idempotency_keys_older_than_the_retention_are_forgotten_and_younger_ones_kept(data_dir: Path) -> None:
    with Outbox(data_dir) as outbox:
        assert _put(outbox, _message(1, key="old")) == 1
        assert _put(outbox, _message(2, key="young")) == 2
    with sqlite3.connect(data_dir / schema.DB_FILE) as conn:  # "old" was stored just past the retention
        conn.execute("UPDATE idempotency_keys SET created = created - ? WHERE key = 'old'",
                     (KEY_RETENTION + 60,))
    conn.close()
    with Outbox(data_dir) as reopened:
        assert _put(reopened, _message(3, key="old")) == 3  # a new message: the key was forgotten
        assert _put(reopened, _message(4, key="young")) == 2
    assert stored_ids(data_dir) == [1, 2, 3]


def test_second_outbox_on_the_same_data_dir_is_refused_naming_the_holder(outbox: Outbox,
                                                                           data_dir: Path) -> None:
    with pytest.raises(AlreadyRunning) as caught:
        Outbox(data_dir)
    assert str(caught.value) == f"another turret-forwarder (pid {os.getpid()}) is using data dir {data_dir}"
    assert _put(outbox, _message(1)) == 1  # the first one is untouched


def test_lock_is_released_on_close(data_dir: Path) -> None:
    Outbox(data_dir).close()
    with Outbox(data_dir) as reopened:
        assert _put(reopened, _message(1)) == 1


def test_close_commits_every_put_submitted_before_it(data_dir: Path) -> None:
    outbox = Outbox(data_dir)
    futures = [_submit(outbox, _message(n)) for n in range(500)]
    outbox.close()
    assert [future.result(0) for future in futures] == list(range(1, 501))
    assert stored_ids(data_dir) == list(range(1, 501))


def test_on_the_callers_loop_acks_cross_no_thread_and_close_commits_what_still_waits(data_dir: Path) -> None:
    """The daemon's arrangement: ingest and the writer share one loop, so an ack never changes thread."""
    async def scenario() -> tuple[list[int | Refused], set[int], bool, int | Refused]:
        loop = asyncio.get_running_loop()
        outbox = Outbox(data_dir, loop=loop)
        settled_on: set[int] = set()

        def put(n: int) -> asyncio.Future[int | Refused]:
            future: asyncio.Future[int | Refused] = loop.create_future()

            def done(result: int | Refused) -> None:
                settled_on.add(threading.get_ident())
                future.set_result(result)
            outbox.put(_message(n), done)
            return future

        acked = list(await asyncio.gather(put(1), put(2)))
        await asyncio.to_thread(outbox.remove, 1)  # from another thread, as the flusher does
        writer_thread = any(thread.name == "outbox-writer" for thread in threading.enumerate())
        waiting = put(3)  # not committed yet: the loop has not run since
        outbox.close()
        return acked, settled_on, writer_thread, waiting.result()

    acked, settled_on, writer_thread, last = asyncio.run(scenario())
    assert acked == [1, 2]
    assert settled_on == {threading.get_ident()}  # asyncio.run's loop runs on this thread
    assert not writer_thread
    assert last == 3
    assert stored_ids(data_dir) == [2, 3]


def test_a_removal_waits_for_a_commit_to_ride_and_a_put_never_waits_for_it(data_dir: Path,
                                                                            recorder: _Recorder) -> None:
    """A delivered message's removal is not worth an fsync of its own: it rides the next commit, or one
    ``DEFER_SECONDS`` later. The daemon's loop runs here a turn at a time, on a clock the test moves."""
    loop = asyncio.new_event_loop()
    clock = [loop.time()]
    loop.time = lambda: clock[0]  # type: ignore[method-assign]

    def turn() -> list[int]:
        loop.run_until_complete(asyncio.sleep(0))
        return list(recorder.commits)

    try:
        outbox = Outbox(data_dir, events=recorder, loop=loop)
        first, second = _submit(outbox, _message(1)), _submit(outbox, _message(2))
        puts = turn()
        outbox.remove(1)
        alone = turn()  # no commit for it yet
        third = _submit(outbox, _message(3))
        along = turn()  # the put commits at once and takes the removal along
        outbox.remove(2)
        turn()
        clock[0] += DEFER_SECONDS
        deferred = turn()
        outbox.close()
    finally:
        loop.close()
    assert (puts, alone, along, deferred) == ([2], [2], [2, 2], [2, 2, 1])
    assert [put.result(0) for put in (first, second, third)] == [1, 2, 3]
    assert stored_ids(data_dir) == [3]


def test_a_put_after_close_is_refused_not_left_waiting(data_dir: Path) -> None:
    outbox = Outbox(data_dir)
    outbox.close()
    refused = _put(outbox, _message(1))
    assert isinstance(refused, StorageFailed)
    assert str(refused) == "the outbox is closed; the daemon is stopping"


def test_truncating_the_wal_gives_up_at_once_while_a_reader_holds_an_older_snapshot(
        outbox: Outbox, data_dir: Path) -> None:
    """The writer runs on the daemon's event loop: a checkpoint waiting for a reader (``check`` on a large
    file) would hold every ack and ping for the busy timeout (30 s). It gives up, and maintenance retries."""
    assert _put(outbox, _message(1)) == 1
    reader = sqlite3.connect(data_dir / schema.DB_FILE, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute(f"SELECT count(*) FROM {schema.TABLE}").fetchone() == (1,)
        assert _put(outbox, _message(2)) == 2  # committed after the reader's snapshot
        writer = outbox._writer
        assert writer.truncate_wal() is False
        reader.execute("COMMIT")
        assert writer.truncate_wal() is True
    finally:
        reader.close()
    assert (data_dir / f"{schema.DB_FILE}-wal").stat().st_size == 0


def test_commit_listeners_hear_of_every_commit_that_added_messages(outbox: Outbox,
                                                                    recorder: _Recorder) -> None:
    heard: list[int] = []
    outbox.on_commit(lambda: heard.append(outbox.stats.messages))
    assert _put(outbox, _message(1)) == 1
    with _one_batch(outbox, recorder):
        outbox.remove(1)
        outbox.remove(2)  # the parked message
        added = [_submit(outbox, _message(3)), _submit(outbox, _message(4))]
    assert [future.result(WAIT) for future in added] == [3, 4]
    recorder.wait_for_ops(6)
    outbox.remove(3)
    recorder.wait_for_ops(7)
    assert heard == [1, 2, 2]  # the batch of 2 removals and 2 puts added messages too; a lone removal did not
