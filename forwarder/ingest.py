"""The ingest source: an asyncio Unix-socket server that hands each request to the outbox.

Owns the socket file (hygiene, mode, group, stale-file replacement), framing (one JSON request per line,
pipelining, in-order replies) and per-connection error handling: a bad request gets a precise refusal on
that connection and disturbs nothing else. An ``ok`` reply is written only after the outbox's writer
committed the message. Never imports ``delivery``: the two meet only in the store.

Each connection is an ``asyncio.Protocol``, not a pair of stream tasks: bytes arrive in a callback, whole
lines are handled at once, and replies leave in one write per batch. Streams cost a task switch, a timer
and a queue hop per request, which was the largest share of the daemon's CPU under many producers
(``bench/README.md``, item 6).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forwarder.errors import AlreadyRunning, ForwarderError, InvalidMessage, MessageTooLarge, Refused, ShuttingDown
from forwarder.metrics import OPS, REFUSAL_REASONS, Metrics
from forwarder.protocol import Ping, StatusRequest, encode_ok, encode_refusal, parse_frame
from forwarder.store import Outbox, call_soon_any_thread

logger = logging.getLogger(__name__)
_PIPELINE_DEPTH = 1024  # unanswered requests per connection before we stop reading it (backpressure)

Reply = bytes | asyncio.Future[bytes]  # written as soon as it and every reply before it are ready


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """Where and how the socket file is made; fixed for the life of the daemon."""

    path: Path
    mode: int = 0o660
    gid: int | None = None


class IngestServer:
    """Accepts connections and turns request lines into stored messages and reply lines."""

    def __init__(self, outbox: Outbox, options: SocketOptions, metrics: Metrics,
                 max_message_bytes: int, idle_timeout: float, status: Callable[[], dict[str, Any]]) -> None:
        self.outbox = outbox
        self.status = status
        self.options = options
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes  # reloadable: read each time lines are taken
        self.idle_timeout = idle_timeout  # reloadable: read each time a connection's idle timer fires
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._in_flight: set[asyncio.Future[bytes]] = set()
        self._connections: set[_Connection] = set()
        self._settled: collections.deque[tuple[_Connection, asyncio.Future[bytes], bytes]] = collections.deque()
        self._wake_scheduled = False
        # The labelled children, looked up once: ``labels()`` per request was a measurable share of the CPU.
        self._received = {op: metrics.received.labels(op) for op in OPS}
        self._refused = {code: metrics.refused.labels(code) for code in REFUSAL_REASONS}

    @property
    def accepting(self) -> bool:
        return self._server is not None and self._server.is_serving() and not self._closing

    async def start(self) -> None:
        """Bind the socket (replacing a stale one), set its mode and group, start serving."""
        loop = self._loop = asyncio.get_running_loop()
        path = self.options.path
        _clear_stale_socket(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o177)  # never a moment where the socket is wider than 0600
        try:
            # The kernel's cap (net.core.somaxconn), not asyncio's 100: a burst of web workers connecting
            # while the loop is busy waits in the queue instead of failing with EAGAIN.
            self._server = await loop.create_unix_server(lambda: _Connection(self, loop), path,
                                                         backlog=socket.SOMAXCONN)
        finally:
            os.umask(old_umask)
        if self.options.gid is not None:
            os.chown(path, -1, self.options.gid)
        os.chmod(path, self.options.mode)
        logger.info("Listening", extra={"fields": {"socket": str(path), "mode": f"{self.options.mode:04o}"}})

    async def stop(self, timeout: float) -> None:
        """Refuse new requests, wait up to ``timeout`` for pending acks, then close and remove the socket."""
        self._closing = True
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.options.path.unlink()
        closed = [connection.finish() for connection in list(self._connections)]
        if closed:
            await asyncio.wait(closed, timeout=timeout)
        for connection in list(self._connections):
            connection.abort()  # a peer that would not take its replies within the timeout

    def handle(self, line: bytes, connection: _Connection) -> Reply:
        """The reply to one request line: ready bytes, or a future settled after the commit."""
        if self._closing:
            return self.refuse(ShuttingDown("the forwarder is shutting down; retry against the new instance"))
        received = time.perf_counter()
        try:
            request = parse_frame(line)
        except Refused as refusal:
            return self.refuse(refusal)
        if isinstance(request, Ping):
            self._received["ping"].inc()
            return encode_ok()
        if isinstance(request, StatusRequest):
            return encode_ok(**self.status())
        self._received[request.kind.value].inc()
        assert self._loop is not None
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._in_flight.add(future)
        self.outbox.put(request, lambda result: self._settle(connection, future, result, received))
        return future

    def refuse(self, refusal: Refused) -> bytes:
        """Count a refusal and encode its reply line."""
        self._refused[refusal.code].inc()
        return encode_refusal(refusal)

    def _settle(self, connection: _Connection, future: asyncio.Future[bytes], result: int | Refused,
                received: float) -> None:
        """Called by the writer after the commit (on our loop in the daemon): the replies go out in one pass."""
        if isinstance(result, Refused):
            self._refused[result.code].inc()
            reply = encode_refusal(result)
        else:
            self.metrics.ack_latency.observe(time.perf_counter() - received)
            reply = encode_ok(result)
        self._settled.append((connection, future, reply))
        if not self._wake_scheduled:
            self._wake_scheduled = True
            assert self._loop is not None
            call_soon_any_thread(self._loop, self._resolve_settled)

    def _resolve_settled(self) -> None:
        self._wake_scheduled = False  # before draining: a settle racing with us schedules another pass
        ready: dict[_Connection, None] = {}  # insertion-ordered set: each connection writes once per pass
        while self._settled:
            connection, future, reply = self._settled.popleft()
            future.set_result(reply)
            self._in_flight.discard(future)
            ready[connection] = None
        for connection in ready:
            connection.flush()


class _Connection(asyncio.Protocol):
    """One client: cuts its bytes into request lines and writes the replies back in request order.

    Our own line buffer rather than a stream's ``readuntil``: ``max_message_bytes`` is reloadable and must
    refuse a long line before its newline ever arrives. Lines are handled only while fewer than
    ``_PIPELINE_DEPTH`` replies are owed and the peer takes what we write; the rest waits in the buffer,
    with reading paused, so a client that never reads bounds what it costs (one read and the socket buffers).
    """

    def __init__(self, server: IngestServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._scanned = 0  # bytes at the start of the buffer known to hold no newline
        self._replies: collections.deque[Reply] = collections.deque()
        self._open = True  # False once an oversize line, an idle timeout or shutdown ended the requests
        self._eof = False  # the peer sent everything: handle the complete lines left, then close
        self._write_paused = False
        self._read_paused = False
        self._last_read = loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server._connections.add(self)
        self._idle_timer = self._loop.call_later(self._server.idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        if self._open:  # after an oversize line, the rest of the connection is not read
            self._buffer += data
            self.flush()

    def eof_received(self) -> bool:
        self._eof = True  # the complete lines and their replies still go; a half line is refused, not stored
        self.flush()
        return True  # keep the transport: the close happens in flush once every reply is out

    def flush(self) -> None:
        """Handle the lines there is room for, write the replies that are ready; close once nothing is owed."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        try:
            while self._take_lines() | self._write_ready(transport):
                pass
        except Exception:
            logger.exception("Connection handler failed")
            self._server.metrics.internal_errors.inc()
            self._open = False
        if not self._open and not self._replies:
            transport.close()
        else:
            self._steer_reading(transport)

    def _has_room(self) -> bool:
        return self._open and not self._write_paused and len(self._replies) < _PIPELINE_DEPTH

    def _take_lines(self) -> bool:
        """Hand the complete lines in the buffer to the server while there is room; True if any was."""
        buffer, limit, start = self._buffer, self._server.max_message_bytes, 0
        while self._has_room():
            end = buffer.find(b"\n", max(start, self._scanned))
            if end < 0:
                if len(buffer) - start > limit:
                    self._refuse_too_large(limit)
                self._scanned = len(buffer) - start
                break
            if end - start > limit:
                self._refuse_too_large(limit)
                break
            self._replies.append(self._server.handle(bytes(buffer[start:end]), self))
            start = end + 1
        else:
            self._scanned = 0  # stopped for room, not for a missing newline
        del buffer[:start]
        if self._eof and self._open and b"\n" not in buffer:
            self._open = False  # only a half line is left, and nothing more will come
            if buffer.strip():
                self._replies.append(self._server.refuse(InvalidMessage(
                    "the stream ended inside a request line (no newline after it); it was not stored")))
        return start > 0

    def _refuse_too_large(self, limit: int) -> None:
        self._replies.append(self._server.refuse(MessageTooLarge(
            f"request line exceeds max_message_bytes ({limit}); closing the connection")))
        self._open = False

    def _write_ready(self, transport: asyncio.Transport) -> bool:
        """Write every reply that is ready and has none pending before it, in one write; True if any."""
        replies, out = self._replies, []
        while replies:
            head = replies[0]
            if not isinstance(head, bytes):
                if not head.done():
                    break
                head = head.result()
            out.append(head)
            replies.popleft()
        if out:
            transport.write(b"".join(out))
        return bool(out)

    def _steer_reading(self, transport: asyncio.Transport) -> None:
        """Backpressure: read only while lines can be handled; the buffer holds at most one read meanwhile."""
        hold = not self._has_room() or self._eof
        if hold != self._read_paused:
            self._read_paused = hold
            (transport.pause_reading if hold else transport.resume_reading)()

    def pause_writing(self) -> None:  # called from inside transport.write: flag only, no re-entrant flush
        self._write_paused = True
        if self._transport is not None:
            self._steer_reading(self._transport)

    def resume_writing(self) -> None:
        self._write_paused = False
        self.flush()

    def _check_idle(self) -> None:
        """Drop a client that sent nothing for ``idle_timeout``, without a timer armed per read.

        Time with reading paused by our own backpressure does not count: that client is waiting on us.
        """
        now = self._loop.time()
        if self._read_paused and not self._eof:
            self._last_read = now
        remaining = self._last_read + self._server.idle_timeout - now
        if remaining > 0:
            self._idle_timer = self._loop.call_later(remaining, self._check_idle)
            return
        self._idle_timer = None
        self.finish()

    def finish(self) -> asyncio.Future[None]:
        """Handle no more lines; close once the replies still owed are written. Resolves when gone."""
        self._open = False
        self.flush()
        return self._closed

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._server._connections.discard(self)
        if not self._closed.done():
            self._closed.set_result(None)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a crashed daemon; refuse if it is live or not a socket at all."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ForwarderError(f"{path} exists and is not a socket; refusing to touch it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        logger.info("Replaced a stale socket file", extra={"fields": {"socket": str(path)}})
        return
    except OSError as e:
        raise ForwarderError(f"cannot check whether {path} is in use: {e}") from e
    finally:
        probe.close()
    raise AlreadyRunning(f"a live forwarder already answers on {path}; leaving it alone")
