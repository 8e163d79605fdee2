"""The one table of settings: name, default, parser, help, environment variable, reloadability.

From this table ``config`` derives the argparse flags, the environment lookup, the TOML keys, ``--help``
and the README's settings table, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from forwarder.config.values import (
    choice,
    default_data_dir,
    duration,
    integer,
    parse_address,
    parse_api_key,
    parse_api_secret,
    parse_api_url,
    parse_bool,
    parse_group,
    parse_mode,
    parse_path,
    parse_readable_file,
    parse_socket_path,
    size,
)


@dataclass(frozen=True)
class Derived:
    """A default computed at load time from ``environ`` and the settings above it in the table."""

    text: str  # how --help and the README show it
    compute: Callable[[Mapping[str, str], Mapping[str, Any]], str]


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One row of the table. ``default`` is raw text, parsed like any other source; ``None`` is unset."""

    name: str
    default: str | Derived | None
    parse: Callable[[Any], Any]  # raw str or TOML value -> value; raises ValueError(reason)
    help: str
    env: str | None
    cli: bool = True  # False for credentials: every user can read argv with ps
    reloadable: bool = False
    secret: bool = False  # the value is never echoed, not even in an error
    group: str  # orders --help and the README

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        if isinstance(self.default, Derived):
            return self.default.text
        return "(none)" if self.default is None else self.default


_POSITIVE = duration(at_least="1ms")
_CORE, _UPSTREAM, _DELIVERY, _OPS = "core", "upstream", "delivery", "ops"

SETTINGS: tuple[Setting, ...] = (
    Setting(name="data_dir", group=_CORE, env="FORWARDER_DATA_DIR", parse=parse_path,
            default=Derived("$XDG_STATE_HOME/turret-forwarder or ~/.local/state/turret-forwarder",
                            default_data_dir),
            help="Directory of the outbox database and its lock."),
    Setting(name="socket", group=_CORE, env="FORWARDER_SOCKET", parse=parse_socket_path,
            default=Derived("<data_dir>/forwarder.sock", lambda _, got: f"{got['data_dir']}/forwarder.sock"),
            help="Unix socket the apps write messages to."),
    Setting(name="socket_mode", group=_CORE, env="FORWARDER_SOCKET_MODE", default="0660", parse=parse_mode,
            help="Octal permission mode of the socket."),
    Setting(name="socket_group", group=_CORE, env="FORWARDER_SOCKET_GROUP", default=None, parse=parse_group,
            help="Group (name or gid) owning the socket, so that its members may write."),
    Setting(name="max_message_bytes", group=_CORE, env="FORWARDER_MAX_MESSAGE_BYTES", default="512KiB",
            parse=size(at_least="1KiB", at_most="16MiB"), reloadable=True,
            help="Longest request line (at most 16MiB); longer is too_large."),
    Setting(name="idle_timeout", group=_CORE, env="FORWARDER_IDLE_TIMEOUT", default="60s", parse=_POSITIVE,
            reloadable=True, help="Close a connection that sent nothing for this long."),
    Setting(name="metrics_addr", group=_CORE, env="FORWARDER_METRICS_ADDR", default="127.0.0.1:9464",
            parse=parse_address, help="host:port of /metrics, /healthz and /readyz; off disables them."),
    Setting(name="log_format", group=_CORE, env="FORWARDER_LOG_FORMAT", default="json",
            parse=choice("json", "text"), reloadable=True, help="json (an object a line) or text."),
    Setting(name="log_level", group=_CORE, env="FORWARDER_LOG_LEVEL", default="info",
            parse=choice("debug", "info", "warning", "error"), reloadable=True,
            help="debug, info, warning or error."),
    Setting(name="log_emails", group=_CORE, env="FORWARDER_LOG_EMAILS", default="false", parse=parse_bool,
            reloadable=True, help="Debugging only: log email addresses in clear, not as a short hash."),
    Setting(name="api_url", group=_UPSTREAM, env="TURRET_API_URL", default="https://api.turret.io",
            parse=parse_api_url, reloadable=True, help="Turret.IO API base URL; https only."),
    Setting(name="ca_file", group=_UPSTREAM, env="TURRET_CA_FILE", default=None, parse=parse_readable_file,
            reloadable=True, help="PEM bundle verifying the API's certificate instead of the system's."),
    Setting(name="api_key", group=_UPSTREAM, env="TURRET_API_KEY", default=None, parse=parse_api_key,
            cli=False, reloadable=True, secret=True, help="Turret.IO API key (or api_key_file)."),
    Setting(name="api_secret", group=_UPSTREAM, env="TURRET_API_SECRET", default=None,
            parse=parse_api_secret, cli=False, reloadable=True, secret=True,
            help="Turret.IO API secret, base64 as distributed (or api_secret_file)."),
    Setting(name="api_key_file", group=_UPSTREAM, env="TURRET_API_KEY_FILE", default=None,
            parse=parse_path, reloadable=True, help="File holding the API key, outer spaces stripped."),
    Setting(name="api_secret_file", group=_UPSTREAM, env="TURRET_API_SECRET_FILE", default=None,
            parse=parse_path, reloadable=True, help="File holding the API secret, outer spaces stripped."),
    Setting(name="concurrency", group=_DELIVERY, env="FORWARDER_CONCURRENCY", default="8",
            parse=integer(1, 256), help="Requests in flight at once (distinct ordering keys)."),
    Setting(name="window_messages", group=_DELIVERY, env="FORWARDER_WINDOW_MESSAGES", default="10000",
            parse=integer(1), help="Messages the flusher reads ahead from the outbox."),
    Setting(name="connect_timeout", group=_DELIVERY, env="TURRET_CONNECT_TIMEOUT", default="5s",
            parse=_POSITIVE, reloadable=True, help="TCP and TLS connect timeout of an attempt."),
    Setting(name="read_timeout", group=_DELIVERY, env="TURRET_READ_TIMEOUT", default="30s",
            parse=_POSITIVE, reloadable=True, help="How long an attempt waits for the API's response."),
    Setting(name="backoff_base", group=_DELIVERY, env="FORWARDER_BACKOFF_BASE", default="1s",
            parse=_POSITIVE, reloadable=True, help="First retry delay; doubles each attempt, with jitter."),
    Setting(name="backoff_cap", group=_DELIVERY, env="FORWARDER_BACKOFF_CAP", default="300s",
            parse=_POSITIVE, reloadable=True, help="Longest retry delay."),
    Setting(name="retry_after_cap", group=_DELIVERY, env="FORWARDER_RETRY_AFTER_CAP", default="1h",
            parse=_POSITIVE, reloadable=True, help="Longest Retry-After of the API that is honoured."),
    Setting(name="max_age", group=_DELIVERY, env="FORWARDER_MAX_AGE", default="5d", parse=_POSITIVE,
            reloadable=True, help="A message older than this becomes a dead letter."),
    Setting(name="max_attempts", group=_DELIVERY, env="FORWARDER_MAX_ATTEMPTS", default="0",
            parse=integer(0), reloadable=True, help="Attempts before a dead letter; 0 means no cap."),
    Setting(name="auth_probe_interval", group=_DELIVERY, env="FORWARDER_AUTH_PROBE_INTERVAL", default="60s",
            parse=_POSITIVE, reloadable=True, help="While credentials are refused, how often one probes."),
    Setting(name="stall_after", group=_DELIVERY, env="FORWARDER_STALL_AFTER", default="5m", parse=_POSITIVE,
            reloadable=True, help="/readyz fails if a backlog waits and nothing was delivered this long."),
    Setting(name="max_backlog_messages", group=_OPS, env="FORWARDER_MAX_BACKLOG_MESSAGES", default="1000000",
            parse=integer(1), reloadable=True, help="Outbox message count at which new ones are full."),
    Setting(name="max_backlog_bytes", group=_OPS, env="FORWARDER_MAX_BACKLOG_BYTES", default="1GiB",
            parse=size(at_least="1KiB"), reloadable=True, help="Outbox size at which new ones are full."),
    Setting(name="min_free_bytes", group=_OPS, env="FORWARDER_MIN_FREE_BYTES", default="64MiB",
            parse=size(at_least="0"), reloadable=True, help="Free disk below which new messages are full."),
    Setting(name="shutdown_timeout", group=_OPS, env="FORWARDER_SHUTDOWN_TIMEOUT", default="5s",
            parse=duration(at_least="0s"), help="How long a stop waits for requests in flight."),
    Setting(name="reload_interval", group=_OPS, env="FORWARDER_RELOAD_INTERVAL", default="10s",
            parse=_POSITIVE, help="Period of the config and secret files' content check, besides watching."),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}
CREDENTIALS = ("api_key", "api_secret")  # each has a <name>_file twin setting
