"""The ingest source: an asyncio Unix-socket server that hands each request to the outbox.

Owns the socket file (hygiene, mode, group, stale-file replacement), framing (one JSON request per line,
pipelining, in-order replies) and per-connection error handling: a bad request gets a precise refusal on
that connection and disturbs nothing else. An ``ok`` reply is written only after the outbox's writer
committed the message. Never imports ``delivery``: the two meet only in the store.
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

from forwarder.errors import AlreadyRunning, ForwarderError, MessageTooLarge, Refused, ShuttingDown
from forwarder.metrics import Metrics
from forwarder.protocol import Ping, StatusRequest, encode_ok, encode_refusal, parse_frame
from forwarder.store import Outbox

logger = logging.getLogger(__name__)
_READ_CHUNK = 1 << 16
_PIPELINE_DEPTH = 1024  # unanswered requests per connection before we stop reading it (backpressure)


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
        self.max_message_bytes = max_message_bytes  # reloadable: read per connection
        self.idle_timeout = idle_timeout  # reloadable
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._in_flight: set[asyncio.Future[bytes]] = set()
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}  # handler -> its stream
        self._settled: collections.deque[tuple[asyncio.Future[bytes], bytes]] = collections.deque()
        self._wake_scheduled = False

    @property
    def accepting(self) -> bool:
        return self._server is not None and self._server.is_serving() and not self._closing

    async def start(self) -> None:
        """Bind the socket (replacing a stale one), set its mode and group, start serving."""
        self._loop = asyncio.get_running_loop()
        path = self.options.path
        _clear_stale_socket(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o177)  # never a moment where the socket is wider than 0600
        try:
            self._server = await asyncio.start_unix_server(self._serve, path)
        finally:
            os.umask(old_umask)
        if self.options.gid is not None:
            os.chown(path, -1, self.options.gid)
        os.chmod(path, self.options.mode)
        logger.info("Listening", extra={"fields": {"socket": str(path), "mode": oct(self.options.mode)}})

    async def stop(self, timeout: float) -> None:
        """Refuse new requests, wait up to ``timeout`` for pending acks, then close and remove the socket."""
        self._closing = True
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.options.path.unlink()
        await self._close_connections(timeout)

    async def _close_connections(self, timeout: float) -> None:
        """Close every open connection and let its handler finish (its read loop sees EOF).

        Left open, ``asyncio.run`` would cancel the handlers, and Python 3.11's stream callback logs a
        cancelled handler as an error with a traceback.
        """
        for writer in self._connections.values():
            writer.close()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._connections[handler] = writer
        replies: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue(_PIPELINE_DEPTH)
        sender = asyncio.create_task(self._send_replies(replies, writer))
        try:
            await self._read_requests(reader, replies)
        except Exception:
            logger.exception("Connection handler failed")
            self.metrics.internal_errors.inc()
        finally:
            await replies.put(None)
            await sender
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            del self._connections[handler]

    async def _read_requests(self, reader: asyncio.StreamReader,
                             replies: asyncio.Queue[asyncio.Future[bytes] | None]) -> None:
        buffer = bytearray()
        while True:
            try:
                line = await self._next_line(reader, buffer)
            except (ConnectionError, TimeoutError):
                return  # a reset, or an idle client
            except MessageTooLarge as refusal:
                await replies.put(self._refuse(refusal))
                return
            if line is None:
                return  # EOF: a half line stores nothing
            await replies.put(self._handle(line, time.perf_counter()))

    async def _next_line(self, reader: asyncio.StreamReader, buffer: bytearray) -> bytes | None:
        """The next request line without its newline, or None at EOF.

        Our own buffer rather than ``readuntil``: the stream's limit is fixed when the server starts, while
        ``max_message_bytes`` is reloadable and must refuse a long line before its newline ever arrives.
        """
        scanned = 0
        while (end := buffer.find(b"\n", scanned)) < 0:
            scanned = len(buffer)
            if scanned > self.max_message_bytes:
                break
            chunk = await asyncio.wait_for(reader.read(_READ_CHUNK), self.idle_timeout)
            if not chunk:
                return None
            buffer += chunk
        if end < 0 or end > self.max_message_bytes:
            raise MessageTooLarge(
                f"request line exceeds max_message_bytes ({self.max_message_bytes}); closing the connection")
        line = bytes(buffer[:end])
        del buffer[:end + 1]
        return line

    def _handle(self, line: bytes, received: float) -> asyncio.Future[bytes]:
        if self._closing:
            return self._refuse(ShuttingDown("the forwarder is shutting down; retry against the new instance"))
        try:
            request = parse_frame(line)
        except Refused as refusal:
            return self._refuse(refusal)
        if isinstance(request, Ping):
            self.metrics.received.labels("ping").inc()
            return self._done(encode_ok())
        if isinstance(request, StatusRequest):
            return self._done(encode_ok(**self.status()))
        self.metrics.received.labels(request.kind.value).inc()
        future = self._new_future()
        self._in_flight.add(future)
        future.add_done_callback(self._in_flight.discard)
        self.outbox.put(request, lambda result: self._settle_threadsafe(future, result, received))
        return future

    def _settle_threadsafe(self, future: asyncio.Future[bytes], result: int | Refused, received: float) -> None:
        """Called on the writer thread after the commit: hand the reply to the loop, one wake-up per batch."""
        if isinstance(result, Refused):
            self.metrics.refused.labels(result.code).inc()
            reply = encode_refusal(result)
        else:
            self.metrics.ack_latency.observe(time.perf_counter() - received)
            reply = encode_ok(result)
        self._settled.append((future, reply))
        if not self._wake_scheduled:
            self._wake_scheduled = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._resolve_settled)

    def _resolve_settled(self) -> None:
        self._wake_scheduled = False  # before draining: a settle racing with us schedules another pass
        while self._settled:
            future, reply = self._settled.popleft()
            if not future.done():
                future.set_result(reply)

    def _refuse(self, refusal: Refused) -> asyncio.Future[bytes]:
        self.metrics.refused.labels(refusal.code).inc()
        return self._done(encode_refusal(refusal))

    def _done(self, reply: bytes) -> asyncio.Future[bytes]:
        future = self._new_future()
        future.set_result(reply)
        return future

    def _new_future(self) -> asyncio.Future[bytes]:
        assert self._loop is not None
        return self._loop.create_future()

    @staticmethod
    async def _send_replies(replies: asyncio.Queue[asyncio.Future[bytes] | None],
                            writer: asyncio.StreamWriter) -> None:
        """Write replies in request order; keeps draining after the peer left so producers are settled."""
        broken = False
        while (future := await replies.get()) is not None:
            reply = await future
            if broken:
                continue
            try:
                writer.write(reply)
                if replies.empty():
                    await writer.drain()
            except ConnectionError:
                broken = True


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
