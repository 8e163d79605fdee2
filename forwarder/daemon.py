"""Wires the daemon together: data-dir lock, start and stop order, signals, reload, health.

Start order: outbox (takes the lock) -> metrics port -> ingest socket -> flusher -> admin socket. The
metrics port comes before the socket so that a taken port fails before apps can see us; until the socket
accepts, ``/healthz`` says so. A resource that cannot be opened is a ``ConfigError`` naming the setting,
and a failed start closes what it opened (no stale socket, the lock released). Stop order is the reverse
of the flow: stop accepting and settle pending acks, let in-flight deliveries finish (bounded), commit the
last removals, close the database, remove the socket. Signal handlers only set a flag (as in gunicorn's
arbiter); the work happens in the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from forwarder import __version__
from forwarder.config import Config, changed_settings, load_config
from forwarder.delivery import Flusher
from forwarder.errors import ConfigError, InvalidMessage, Refused
from forwarder.ingest import IngestServer, SocketOptions
from forwarder.logs import register_secret, setup_logging
from forwarder.metrics import Metrics, MetricsServer, Snapshot
from forwarder.protocol import encode_ok, encode_refusal
from forwarder.reload import ConfigWatcher
from forwarder.store import Limits, Outbox
from forwarder.store.admin import change_for
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
    """One running forwarder: owns every component for the life of ``serve``.

    ``flags`` and ``environ`` are kept so that a reload re-reads the config file and the secret files
    exactly as the start did, with the same precedence. ``loop`` is the one ``run`` will run on: the outbox
    commits on it, so an ack costs no hand-off between threads (without it, the outbox has its own thread).
    """

    def __init__(self, config: Config, flags: Mapping[str, Any], environ: Mapping[str, str],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self._flags, self._environ = dict(flags), dict(environ)
        self._last_reload_error: str | None = None
        self.started_at = time.time()
        self.metrics = Metrics(self._snapshot, __version__)
        try:
            self.outbox = Outbox(config.data_dir, events=self.metrics, limits=limits_of(config), loop=loop)
        except OSError as e:
            raise _unusable(config, "data_dir", f"cannot use {config.data_dir} as the data directory", e,
                            config.data_dir) from None
        try:
            self.upstream = TurretUpstream(config.retry_after_cap)
            self.flusher = Flusher(self.outbox, self.upstream, config, self.metrics, credentials_of(config))
            self.ingest = IngestServer(self.outbox, SocketOptions(config.socket, config.socket_mode,
                                                                  config.socket_group),
                                       self.metrics, config.max_message_bytes, config.idle_timeout, self.status)
        except BaseException:
            self.outbox.close()
            raise
        self._metrics_server: MetricsServer | None = None
        self._flusher_started = False
        self._watcher: ConfigWatcher | None = None

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
        admin = await self._start(loop)
        logger.info("Forwarder ready", extra={"fields": {
            "version": __version__, "data_dir": str(self.config.data_dir), "backlog": self.outbox.stats.messages,
            "credentials": "present" if credentials_of(self.config) else "missing"}})
        await stop.wait()
        timeout = self.config.shutdown_timeout
        logger.info("Shutting down", extra={"fields": {"timeout_seconds": timeout}})
        await self._close(admin, timeout)
        logger.info("Stopped cleanly")

    async def _start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Server:
        """Open everything in start order; if any step fails, close what was opened, then re-raise."""
        admin: asyncio.Server | None = None
        try:
            self._start_metrics()
            try:
                await self.ingest.start()
            except OSError as e:
                raise self._socket_error(e) from None
            self.flusher.start()
            self._flusher_started = True
            admin = await self._start_admin()

            def on_file_change() -> None:  # on the watcher's thread: hand over to the loop
                loop.call_soon_threadsafe(self.reload, "file")

            self._watcher = ConfigWatcher(self._watched_files(), on_file_change, self.config.reload_interval)
            self._watcher.start()
            self.reload("startup")  # a secret rotated between our first read and the watcher's baseline
        except BaseException:
            await self._close(admin, 0.0)
            raise
        return admin

    def _start_metrics(self) -> None:
        if self.config.metrics_addr is None:
            return
        host, port = self.config.metrics_addr
        try:
            self._metrics_server = MetricsServer(host, port, self.metrics, self._healthz, self._readyz)
        except OSError as e:
            raise _unusable(self.config, "metrics_addr", f"cannot listen on {host}:{port}", e, None) from None
        self._metrics_server.start()
        logger.info("Serving metrics", extra={"fields": {"address": f"{host}:{self._metrics_server.address[1]}"}})

    def _socket_error(self, error: OSError) -> ConfigError:
        path = self.config.socket
        if self.ingest.accepting:  # bound, so handing the socket to its group failed (chown: not a member)
            if self.config.socket_group is not None:
                what = f"cannot give {path} to group {self.config.socket_group}"
                return _unusable(self.config, "socket_group", what, error, path)
            return _unusable(self.config, "socket_mode", f"cannot set the mode of {path}", error, path)
        return _unusable(self.config, "socket", f"cannot listen on {path}", error, path)

    async def _start_admin(self) -> asyncio.Server:
        old_umask = os.umask(0o177)  # the admin socket is the daemon user's alone (0600) from its first moment
        try:
            return await asyncio.start_unix_server(self._serve_admin, self.config.admin_socket)
        except OSError as e:  # e.g. a data dir path too long for a Unix socket
            admin_socket = self.config.admin_socket
            raise _unusable(self.config, "data_dir", f"cannot listen on {admin_socket}", e, admin_socket) from None
        finally:
            os.umask(old_umask)

    async def _serve_admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Queue tools' changes, committed by our writer (nobody else may write the data dir)."""
        try:
            while line := await reader.readline():
                writer.write(await self._admin_reply(line))
                await writer.drain()
        except ConnectionError:
            pass  # the operator's command went away; nothing was left half done
        finally:
            writer.close()

    async def _admin_reply(self, line: bytes) -> bytes:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise InvalidMessage("an admin request is a JSON object")
            if request.get("op") == "status":  # `status --data-dir D` finds us here whatever --socket was
                return encode_ok(**self.status())
            count = await self._admin(request)
        except json.JSONDecodeError as e:
            return encode_refusal(InvalidMessage(f"not valid JSON: {e}"))
        except Refused as refusal:
            return encode_refusal(refusal)
        return encode_ok(count=count)

    async def _admin(self, request: dict[str, Any]) -> int:
        op = request.get("op")
        if op == "flush":
            self.flusher.flush()
            return 0
        if op == "compact":
            return await asyncio.wrap_future(self.outbox.compact())
        count = await asyncio.wrap_future(self.outbox.admin(change_for(request)))
        logger.info("Operator changed the outbox", extra={"fields": {"op": op, "messages": count}})
        self.flusher.resync()
        return count

    async def _close(self, admin: asyncio.Server | None, timeout: float) -> None:
        """Stop what was started, in stop order; also undoes a start that failed part way."""
        if self._watcher is not None:
            self._watcher.stop()
        if admin is not None:
            admin.close()
            (self.config.admin_socket).unlink(missing_ok=True)
        await self.ingest.stop(timeout)  # removes the socket only if we bound it, never another's
        if self._flusher_started:
            await asyncio.to_thread(self.flusher.stop, timeout)
        self.outbox.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()

    def _watched_files(self) -> list[Path]:
        config = self.config
        return [path for path in (config.config_file, *config.secret_files) if path is not None]

    def reload(self, reason: str) -> None:
        """Re-read settings and secrets; apply what may change live, report what needs a restart.

        Runs on the event loop (SIGHUP, or the watcher through ``call_soon_threadsafe``). An invalid or
        half-written file keeps the last good settings and is reported once per distinct error.
        """
        try:
            new = load_config(self._flags, self._environ)
        except ConfigError as e:
            self.metrics.reloads.labels("invalid").inc()
            if str(e) != self._last_reload_error:
                self._last_reload_error = str(e)
                logger.error("Reload failed; keeping the last good settings", extra={"fields": {
                    "reason": reason, "error": str(e)}})
            return
        self._last_reload_error = None
        reloadable, fixed = changed_settings(self.config, new)
        if fixed:
            self.metrics.reloads.labels("needs_restart").inc()
            logger.warning("Some changed settings apply only after a restart; they keep their old values",
                           extra={"fields": {"settings": fixed}})
            sources = {**new.sources, **{name: self.config.source_of(name) for name in fixed}}
            new = dataclasses.replace(new, sources=sources, **{name: getattr(self.config, name) for name in fixed})
        if not reloadable:
            self.metrics.reloads.labels("unchanged").inc()
            return
        self._apply(new)
        self.metrics.reloads.labels("applied").inc()
        logger.info("Reloaded settings", extra={"fields": {"reason": reason, "settings": reloadable}})

    def _apply(self, config: Config) -> None:
        self.config = config
        setup_logging(config.log_format, config.log_level, config.log_emails)
        _register_secrets(config)
        self.outbox.limits = limits_of(config)
        self.upstream.retry_after_cap = config.retry_after_cap
        self.ingest.max_message_bytes, self.ingest.idle_timeout = config.max_message_bytes, config.idle_timeout
        self.flusher.apply(config, credentials_of(config))
        if self._watcher is not None:
            self._watcher.watch(self._watched_files())

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
            return False, f"{stats.messages} message(s) wait, the API is reachable, and nothing was delivered " \
                          f"for {int(time.time() - last)} s"
        return True, f"ready ({state})"


def _unusable(config: Config, setting: str, action: str, error: OSError, path: Path | None) -> ConfigError:
    """An ``OSError`` opening what ``setting`` names (``path``), as the one line the CLI prints (exit 2)."""
    if isinstance(error, NotADirectoryError):
        reason = "a parent is not a directory"
    elif isinstance(error, FileExistsError):
        reason = "it exists and is not a directory"
    else:
        reason = error.strerror or str(error)
    if error.filename and Path(error.filename) != path:  # the lock file, or a parent mkdir made
        reason += f" ({error.filename})"
    return ConfigError(setting, config.source_of(setting), f"{action}: {reason}")


def _register_secrets(config: Config) -> None:
    for secret in (config.api_key, config.api_secret):
        if secret is not None:
            register_secret(secret.reveal())


def serve(flags: Mapping[str, Any], environ: Mapping[str, str]) -> None:
    """The ``serve`` command: run the daemon in the foreground until SIGTERM/SIGINT."""
    config = load_config(flags, environ)
    setup_logging(config.log_format, config.log_level, config.log_emails)
    _register_secrets(config)
    with asyncio.Runner() as runner:  # the loop ingest runs on is the one the outbox commits on
        runner.run(Daemon(config, flags, environ, runner.get_loop()).run())
