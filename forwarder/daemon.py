"""Wires the daemon together: data-dir lock, start and stop order, signals, reload, health.

Start order follows the data: outbox (takes the lock) -> ingest socket -> flusher -> metrics. Stop order is
the reverse of the flow: stop accepting and settle pending acks, let in-flight deliveries finish (bounded),
commit the last removals, close the database, remove the socket. Signal handlers only set a flag (as in
gunicorn's arbiter); the work happens in the loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from prometheus_client import CollectorRegistry

from forwarder import __version__
from forwarder.config import Config
from forwarder.delivery import Flusher
from forwarder.ingest import IngestServer, SocketOptions
from forwarder.logs import register_secret, setup_logging
from forwarder.metrics import Metrics, MetricsServer, Snapshot
from forwarder.store import Limits, Outbox
from forwarder.turretio import Credentials, TurretUpstream

logger = logging.getLogger(__name__)


def credentials_of(config: Config) -> Credentials | None:
    """Our signing credentials, or None while either half is missing (messages then wait, never drop)."""
    if config.api_key is None or config.api_secret is None:
        return None
    return Credentials.from_base64(config.api_key.reveal(), config.api_secret.reveal())


def limits_of(config: Config) -> Limits:
    return Limits(config.max_backlog_messages, config.max_backlog_bytes, config.min_free_bytes)


class Daemon:
    """One running forwarder: owns every component for the life of ``serve``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics(CollectorRegistry(), self._snapshot, __version__)
        self.outbox = Outbox(config.data_dir, events=self.metrics, limits=limits_of(config))
        try:
            self.flusher = Flusher(self.outbox, TurretUpstream(config.retry_after_cap), config, self.metrics,
                                   credentials_of(config))
            self.ingest = IngestServer(self.outbox, SocketOptions(config.socket, config.socket_mode,
                                                                  config.socket_group),
                                       self.metrics, config.max_message_bytes, config.idle_timeout, self.status)
        except BaseException:
            self.outbox.close()
            raise
        self._metrics_server: MetricsServer | None = None

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await self.ingest.start()
        except BaseException:
            self.outbox.close()
            raise
        self.flusher.start()
        self._start_metrics()
        logger.info("Forwarder ready", extra={"fields": {
            "version": __version__, "data_dir": str(self.config.data_dir), "backlog": self.outbox.stats.messages,
            "credentials": "present" if credentials_of(self.config) else "missing"}})
        await stop.wait()
        await self._shutdown()

    def _start_metrics(self) -> None:
        if self.config.metrics_addr is None:
            return
        host, port = self.config.metrics_addr
        self._metrics_server = MetricsServer(host, port, self.metrics, self._healthz, self._readyz)
        self._metrics_server.start()
        logger.info("Serving metrics", extra={"fields": {"address": f"{host}:{self._metrics_server.address[1]}"}})

    async def _shutdown(self) -> None:
        timeout = self.config.shutdown_timeout
        logger.info("Shutting down", extra={"fields": {"timeout_seconds": timeout}})
        await self.ingest.stop(timeout)
        await asyncio.to_thread(self.flusher.stop, timeout)
        self.outbox.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        logger.info("Stopped cleanly")

    def _snapshot(self) -> Snapshot:
        stats = self.outbox.stats
        return Snapshot(stats.messages, stats.bytes, stats.oldest_enqueued_at, stats.dead_letters,
                        self.flusher.state, self.flusher.last_delivery_at)

    def status(self) -> dict[str, Any]:
        """What ``turret-forwarder status`` shows of a running daemon (never an email or a secret)."""
        stats = self.outbox.stats
        oldest = stats.oldest_enqueued_at
        return {"backlog": stats.messages, "bytes": stats.bytes, "dead_letters": stats.dead_letters,
                "oldest_age_seconds": round(max(0.0, time.time() - oldest), 3) if oldest is not None else 0.0,
                "delivery_state": self.flusher.state, "credentials": credentials_of(self.config) is not None}

    def _healthz(self) -> tuple[bool, str]:
        if not self.ingest.accepting:
            return False, "the socket is not accepting connections"
        return True, "alive"

    def _readyz(self) -> tuple[bool, str]:
        if not self.outbox.commit_healthy:
            return False, "the outbox cannot commit (see forwarder_outbox_storage_errors_total)"
        stats, state = self.outbox.stats, self.flusher.state
        last = max(self.flusher.last_delivery_at or 0.0, self.started_at)
        if stats.messages and state == "running" and time.time() - last > self.config.stall_after:
            return False, f"{stats.messages} messages wait, the API is reachable, and nothing was delivered " \
                          f"for {int(time.time() - last)} s"
        return True, f"ready ({state})"


def serve(config: Config) -> None:
    """The ``serve`` command: run the daemon in the foreground until SIGTERM/SIGINT."""
    setup_logging(config.log_format, config.log_level, config.log_emails)
    for secret in (config.api_key, config.api_secret):
        if secret is not None:
            register_secret(secret.reveal())
    daemon = Daemon(config)
    asyncio.run(daemon.run())
